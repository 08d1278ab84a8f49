"""Where captions and precomputed negatives live on disk: webdataset shards and caption files.

One home for the formats: the `<key>.neg.json` member (name, writer, reader), webdataset's
key/extension split, reading the captions of shards, caption files and OpenCLIP CSVs, and the one
vocabulary builder that both the trainer (`--hn-vocabulary train-data`) and the CLI
(`negatives vocabulary`) use. Plain Python, no torch.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from ..argtypes import InputError
from ..files import shard_paths
from .lexicon import VocabularyError, words_of
from .parse import unusable_reason

NEGATIVES_EXTENSION = "neg.json"  # member `<key>.neg.json`: a JSON list of {"text", "type"}


def split_key(name: str) -> tuple[str, str]:
    """webdataset's sample key and extension: 'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg'); the
    extension in lower case, as webdataset reads it ('a.JPG', 'a.TXT' train as jpg and txt)."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def negatives_member(key: str, negatives: list, template: tarfile.TarInfo
                     ) -> tuple[tarfile.TarInfo, bytes]:
    """The `<key>.neg.json` member holding a sample's negatives (mtime taken from `template`)."""
    data = json.dumps(negatives, ensure_ascii=False).encode("utf-8")
    info = tarfile.TarInfo(f"{key}.{NEGATIVES_EXTENSION}")
    info.size, info.mtime, info.mode = len(data), template.mtime, 0o644
    return info, data


def read_negatives(raw: bytes) -> list:
    """A `neg.json` payload; ValueError (JSON or UTF-8) when it is not one."""
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


def member_end(member: tarfile.TarInfo) -> int:
    """The byte after `member`'s data, padded to tar's block: where the next header starts."""
    return member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


_COMPRESSIONS = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}  # magic -> tarfile's name


def compression(path: str) -> str:
    """'gz', 'bz2' or 'xz' for a compressed tar (by its first bytes), '' for a plain one."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    return next((name for magic, name in _COMPRESSIONS.items() if head.startswith(magic)), "")


def trailing_damage(path: str, end: int, size: int) -> list[str]:
    """What is wrong after the last member (byte `end` of the tar, decompressed where the file
    is compressed; `size` the file's size), if anything.

    tarfile stops without a word at the first header it cannot read, as if the archive ended
    there. A whole tar ends in at least two zero blocks; a file cut at a member boundary lacks
    them (a valid-looking but short archive), and bytes that are not zeros are data tarfile
    skipped because no header could be read in them (garbage, or damaged members at the end).
    """
    if compression(path):
        with tarfile.open(path, "r:*") as compressed:  # its file object: the decompressed tar
            return _tail_damage(compressed.fileobj, end, "the decompressed tar")
    with open(path, "rb") as handle:
        return _tail_damage(handle, end, "the file", size)


def lacks_end_marker(path: str) -> bool:
    """A plain tar whose last two blocks are not zeros (a whole tar ends in them): a check of
    one 1 KiB read, for many shards at once where `trailing_damage`'s reading of every header
    would scan the data set. A compressed tar is not checked (its end is in the stream)."""
    size = os.path.getsize(path)
    if compression(path):
        return False
    with open(path, "rb") as handle:
        handle.seek(max(0, size - 2 * tarfile.BLOCKSIZE))
        tail = handle.read()
    return size % tarfile.BLOCKSIZE != 0 or len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0") != b""


def _tail_damage(stream, end: int, what: str, size: int | None = None) -> list[str]:
    zeros, length = True, end
    try:
        stream.seek(end)  # forward in a decompressed stream: decompresses up to it
        while block := stream.read(1 << 20):
            length += len(block)
            zeros = zeros and not block.strip(b"\0")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:  # a cut or corrupt compressed stream
        return [f"{what} is cut or corrupt after byte {end} ({err})"]
    length = length if size is None else size
    if length - end < 2 * tarfile.BLOCKSIZE:
        return [f"{what} ends at byte {length} without tar's end-of-archive marker (truncated)"]
    if not zeros:
        return [f"{length - end} bytes after the last readable member (byte {end}) are "
                "not tar's end-of-archive zeros (corrupt or not a tar)"]
    return []


def shard_captions(path: str, caption_key: str) -> Iterator[str]:
    """The captions (members with extension `caption_key`) of one webdataset shard. A shard that
    cannot be read whole is a VocabularyError naming it, after its readable captions: a cut or
    corrupt one would otherwise lose its last captions without a word."""
    try:
        with tarfile.open(path, "r:*") as reader:
            end = 0
            for member in reader:
                end = member_end(member)
                if member.isfile() and split_key(member.name)[1] == caption_key:
                    data = reader.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"{member.name} cut short")
                    yield data.decode("utf-8", errors="replace")
        damage = trailing_damage(path, end, os.path.getsize(path))
    except (tarfile.TarError, EOFError, OSError) as err:
        raise VocabularyError(f"shard {path} cannot be read ({err}); expected a webdataset tar") from err
    if damage:
        raise VocabularyError(f"shard {path} is damaged: {damage[0]}; re-create or re-download it")


class MalformedLine(ValueError):
    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")
        self.line = line


CAPTION_FILE_SUFFIXES = ("", ".txt", ".csv", ".tsv", ".jsonl")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes read with errors="surrogateescape"


def read_captions(path: str, caption_key: str, key_flag: str = "--caption-key"
                  ) -> Iterator[str | MalformedLine]:
    """Captions of a txt/csv/tsv/jsonl file in order; malformed lines come as MalformedLine."""
    return (caption for _, caption in numbered_captions(path, caption_key, key_flag))


def numbered_captions(path: str, caption_key: str, key_flag: str = "--caption-key"
                      ) -> Iterator[tuple[int, str | MalformedLine]]:
    """(line or CSV row number, caption) of a txt/csv/tsv/jsonl file in order, where the number
    ties an output back to its input; malformed lines (not UTF-8, invalid JSON, a caption that
    is not text) come as MalformedLine. `key_flag` is the flag that sets `caption_key`, named
    where the column or key is missing. A UTF-8 byte-order mark is skipped; lines end at
    '\n' only (a stray '\r' inside a caption does not split it).

    A .csv whose header holds a tab is read as tab-separated: OpenCLIP's own CSVs are (its
    --csv-separator default), whatever their extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in CAPTION_FILE_SUFFIXES:
        raise InputError(f"{path}: unknown caption file format {suffix!r}; pass a .txt (one caption "
                         "per line), .csv, .tsv or .jsonl file")
    if suffix in (".csv", ".tsv"):
        yield from _csv_captions(path, suffix, caption_key, key_flag)
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                yield number, MalformedLine(number, f"not UTF-8 text (byte {err.start})")
                continue
            yield number, (_jsonl_caption(number, line, caption_key, key_flag) if suffix == ".jsonl"
                           else line)


CSV_FIELD_LIMIT = (1 << 31) - 1  # the csv module's default, 128 KiB, ended on one long caption
# with a traceback; pandas (OpenCLIP's reader) has no such limit, and too long a caption is
# masked by the generator like any other unusable one


def _csv_captions(path: str, suffix: str, caption_key: str, key_flag: str
                  ) -> Iterator[tuple[int, str | MalformedLine]]:
    # bytes that are not UTF-8 come through as lone surrogates, so their row is named, not masked
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        tabs = suffix == ".tsv" or "\t" in handle.readline()
        handle.seek(0)
        reader = csv.DictReader(handle, delimiter="\t" if tabs else ",")
        if reader.fieldnames is None or caption_key not in reader.fieldnames:
            raise InputError(f"{path}: no column {caption_key!r} (columns: {reader.fieldnames}); "
                             f"pass {key_flag} NAME")
        read, spanning = reader.line_num, None
        for row in reader:
            first, read = read + 1, reader.line_num  # a quoted caption may span lines: its first
            if read > first and spanning is None:
                spanning = (first, read)
            value = row.get(caption_key)
            if not isinstance(value, str):
                yield first, MalformedLine(first, "missing caption field")
            elif _NOT_UTF8.search(value):
                yield first, MalformedLine(first, "not UTF-8 text")
            else:
                yield first, value
        if spanning is not None:  # legal CSV, but an unclosed quote reads the same way
            print(f"warning: {path}: the row at line {spanning[0]} runs to line {spanning[1]} (a "
                  "quoted field over several lines); if that is an unclosed quote, the rows after "
                  "it were read as its text: close the quote", file=sys.stderr)


def _jsonl_caption(number: int, line: str, caption_key: str, key_flag: str) -> str | MalformedLine:
    if not line.strip():
        return MalformedLine(number, "empty line")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return MalformedLine(number, f"invalid JSON ({err.msg})")
    if not isinstance(record, dict) or caption_key not in record:
        return MalformedLine(number, f"no key {caption_key!r}; pass {key_flag} KEY")
    value = record[caption_key]
    if not isinstance(value, str):
        return MalformedLine(number, f"{caption_key!r} is {json.dumps(value)[:40]}, not text")
    return value


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


def train_data_captions(train_data: str, *, is_csv: bool, csv_separator: str = "\t",
                        csv_caption_key: str = "title", shard_caption_key: str = "txt"
                        ) -> Iterable[str]:
    """The captions of OpenCLIP's `--train-data`: a CSV's caption column or local shards' members.
    A shard pattern that names no shards is a VocabularyError naming --train-data (the trainer
    reads the captions before OpenCLIP reads the pattern)."""
    if is_csv:
        return csv_captions(train_data, csv_separator, csv_caption_key)
    try:
        shards = shard_paths(train_data, "--train-data")
    except ValueError as err:
        raise VocabularyError(str(err)) from None
    remote = [s for s in shards if not os.path.isfile(s)]
    if remote:
        raise VocabularyError(f"reads local shards, and {remote[0]} is not a local file")
    return (c for shard in shards for c in shard_captions(shard, shard_caption_key))


def word_counts(captions: Iterable[str]) -> tuple[Counter[str], int]:
    """(how often each word occurs, how many usable captions) — the one vocabulary builder.
    Captions the generator masks (HTML, web addresses, other scripts) are left out, so their
    pieces ('amp', 'https') never become words a negative may bring in."""
    counts: Counter[str] = Counter()
    total = 0
    for caption in captions:
        if unusable_reason(caption) is None:
            counts.update(words_of(caption))
            total += 1
    return counts, total
