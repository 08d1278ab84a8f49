"""Plumbing the negatives commands share (`cli.py`, `audit_cli.py`, `precompute.py`): progress
bars, the shard check (the one `neighbors` makes), where a command reads training captions and
the check of its output file.
Kept apart so that none of them imports another's module (no import circle)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import TYPE_CHECKING, Callable, Iterable

from ..argtypes import InputError, overwritten_input
from ..eval_sets import excluded_captions
from ..files import local_shards
from .lm import LMError
from .shards import shard_captions

if TYPE_CHECKING:
    from .generator import NegativeGenerator


def worker_start(load: Callable[[], object] | None = None) -> None:
    """A negatives command's Pool initializer: SIGTERM back to its default action in the worker.
    The command's own handler (SIGTERM unwinds it, so its temp file and its pool go with it) must
    not run there: the pool ends its workers with SIGTERM, and an exception raised in a worker
    that waits on the task queue's lock hung the pool's end."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if load is not None:
        load()


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


def input_files(args: argparse.Namespace) -> list[str]:
    """Every file a negatives command reads (caption files, shards, --vocabulary,
    --plausibility, --exclude, --reference, and the files directly inside a folder given)."""
    named = [getattr(args, flag, None) for flag in ("input", "vocabulary", "plausibility", "exclude",
                                                    "reference")]
    named += list(getattr(args, "inputs", None) or [])
    if getattr(args, "shards", None):
        named += existing_shards(args.shards)
    files = []
    for path in filter(None, named):
        if os.path.isdir(path):
            files += [os.path.join(path, name) for name in sorted(os.listdir(path))]
        else:
            files.append(path)
    return [path for path in files if os.path.isfile(path)]


def check_output(flag: str, path: str, inputs: Iterable[str]) -> None:
    """Refuse, before any work, an output file that cannot be written where asked: a folder, a
    place without write permission, or one of the command's `inputs` (it would be replaced)."""
    if os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder; name the file to write inside it")
    if overwritten_input([path], inputs):
        raise InputError(f"{flag} {path} is an input of this command, which the output would "
                         "replace; write elsewhere")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # the output's folders are made; the first one there decides
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {folder} is not a folder this user can write; write elsewhere")


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
