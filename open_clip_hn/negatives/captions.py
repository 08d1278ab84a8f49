"""Captions of an OpenCLIP CSV, read the way OpenCLIP reads them, minus the cells it cannot use.

OpenCLIP's `CsvDataset` reads `--train-data` with `pandas.read_csv(path, sep=--csv-separator)`
and trains on `str(cell)`: an empty cell becomes NaN, then the caption "nan". Code that wants
the *words* of the captions (`--hn-vocabulary train-data`) reads the same table, skips those
cells and says how many it skipped, instead of crashing on a float. No torch.
"""

from __future__ import annotations

import logging
import os

from .lexicon import VocabularyError


def csv_captions(path: str, separator: str, caption_key: str) -> list[str]:
    """The captions of column `caption_key` of the CSV at `path`, in row order.

    Empty or NaN cells (pandas reads '', 'NA', 'null', ... as NaN) and blank captions are
    skipped, with one warning naming the file, the count and the first row. Raises
    VocabularyError naming the file and the fix when it cannot be read or lacks the column.
    """
    import pandas

    if not os.path.isfile(path):
        raise VocabularyError(f"caption file {path} not found (--train-data)")
    try:
        table = pandas.read_csv(path, sep=separator)
    except (pandas.errors.ParserError, pandas.errors.EmptyDataError, UnicodeDecodeError,
            ValueError) as err:
        raise VocabularyError(f"{path} cannot be read as a CSV with separator {separator!r} "
                              f"({err}); check --csv-separator") from None
    if caption_key not in table.columns:
        raise VocabularyError(f"{path} has no column {caption_key!r} (columns, split at "
                              f"{separator!r}: {list(table.columns)}); set --csv-caption-key "
                              "and --csv-separator")
    captions, skipped = [], []
    for row, value in enumerate(table[caption_key].tolist()):
        text = "" if pandas.isna(value) else str(value)
        if text.strip():
            captions.append(text)
        else:
            skipped.append(row)
    if skipped:
        # row numbers as in the file: 1-based, after the header line
        logging.warning("%s: skipped %d of %d row(s) with an empty caption in column %r "
                        "(first: data row %d); OpenCLIP trains on them as the text 'nan'",
                        path, len(skipped), len(table), caption_key, skipped[0] + 1)
    return captions
