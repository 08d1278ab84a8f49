"""Plumbing the negatives commands share (`cli.py`, `audit_cli.py`, `precompute.py`): progress
bars, the shard check (the one `neighbors` makes) and where a command reads training captions.
Kept apart so that none of them imports another's module (no import circle)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Callable, Iterable

from ..argtypes import InputError
from ..eval_sets import excluded_captions
from ..files import local_shards
from .lm import LMError
from .shards import shard_captions

if TYPE_CHECKING:
    from .generator import NegativeGenerator


def progress(iterable, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def add_caption_source(parser: argparse.ArgumentParser) -> None:
    """Where a command reads training captions: --shards or --input, and --caption-key."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="Webdataset shards, brace pattern: 'in-{000000..000009}.tar'.")
    source.add_argument("--input", help="Caption file: captions.txt (one per line), .csv, .tsv or .jsonl.")
    parser.add_argument("--caption-key", default=None,
                        help="Member extension (shards; default: txt) or column/key (file; default: "
                             "caption) holding the caption.")


def source_files(args: argparse.Namespace) -> list[str]:
    """The files `add_caption_source`'s flags name (the shards, or the caption file), all there;
    InputError names the flag and the fix."""
    if args.shards is not None:  # an empty --shards (an unset variable) is named, not skipped
        return existing_shards(args.shards)
    if not os.path.isfile(args.input):
        raise InputError(f"--input {args.input}: caption file not found; pass a .txt (one caption "
                         "per line), .csv, .tsv or .jsonl file")
    return [args.input]


def source_captions(args: argparse.Namespace, read_file: Callable[[str, str], Iterable[str]]
                    ) -> Iterable[str]:
    """The captions `add_caption_source`'s flags name (a file read with `read_file(path, key)`);
    InputError names a bad pattern or a missing shard or file."""
    paths = source_files(args)
    if args.shards is None:
        return read_file(args.input, args.caption_key or "caption")
    key = args.caption_key or "txt"
    return (c for shard in progress(paths, unit="shard") for c in shard_captions(shard, key))


def existing_shards(spec: str, unique_because: str | None = None) -> list[str]:
    """The shards of `--shards`, checked as `neighbors` checks them (`files.local_shards`):
    InputError names a bad pattern or a missing shard, with the fix."""
    try:
        return local_shards(spec, unique_because)
    except ValueError as err:
        raise InputError(str(err)) from None


def excluded(args: argparse.Namespace) -> tuple[str, ...]:
    """--exclude's captions (an evaluation folder or a .txt), read before any work; InputError
    names the flag and the fix; no flag (or 'none') excludes nothing."""
    try:
        return excluded_captions(args.exclude, "--exclude")
    except ValueError as err:
        raise InputError(str(err)) from None


def loaded(generator: "NegativeGenerator") -> "NegativeGenerator":
    """`generator` with its WordNet tables, tagger and --lm loaded in this process, before any
    output is touched: a worker that fails to load (a Pool initializer is restarted forever)
    or a lazy load mid-run would name no flag."""
    try:
        return generator.load()
    except LMError as err:
        raise InputError(f"--lm {err}") from None
