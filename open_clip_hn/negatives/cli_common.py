"""Plumbing the negatives commands share (`cli.py`, `audit_cli.py`, `precompute.py`): progress
bars, the shard check (the one `neighbors` makes), where a command reads training captions and
the check of its output file.
Kept apart so that none of them imports another's module (no import circle)."""

from __future__ import annotations

import argparse
import multiprocessing.pool
import os
import signal
import sys
from contextlib import contextmanager
from functools import partial
from multiprocessing import Pool
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from ..argtypes import InputError, overwritten_input
from ..eval_sets import excluded_captions
from ..files import local_shards
from .lm import LMError
from .lexicon import VocabularyError
from .shards import shard_captions

if TYPE_CHECKING:
    from .generator import NegativeGenerator


ABANDONED_POOLS: list = []  # pools left to end with the process (`worker_pool`, `exit_command`)


def _worker_start(load: Callable[[], object] | None) -> None:
    """A pool worker ends with its command: the kernel kills it when the command's process ends
    (Linux's parent-death signal, so no orphan goes on writing output), and it ignores Ctrl-C,
    which a terminal sends the whole group (each worker printed a traceback). SIGTERM keeps its
    default action, which `Pool.terminate` relies on."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if load is not None:
        load()


@contextmanager
def worker_pool(workers: int, load: Callable[[], object] | None = None) -> Iterator[Pool]:
    """A process pool for a negatives command (`load` runs in each worker first). A stop signal
    or Ctrl-C leaves the pool alone, to end with the process (`exit_command`): `Pool.terminate`
    waited forever for a queue lock that a worker killed by the group's signal held."""
    pool = Pool(workers, initializer=_worker_start, initargs=(load,))
    try:
        yield pool
    except (KeyboardInterrupt, Stopped):
        _kill_workers(pool)
        ABANDONED_POOLS.append(pool)
        raise
    except BaseException:
        pool.terminate()
        raise
    pool.close()
    pool.join()


def _kill_workers(pool: Pool) -> None:
    """Kill the pool's workers (SIGKILL: no worker writes or prints after its command stopped),
    after telling its worker handler to start no new ones (it replaces workers a group signal
    ended); killing a worker wakes the handler, which then ends."""
    handler = getattr(pool, "_worker_handler", None)
    if handler is not None:
        handler._state = multiprocessing.pool.TERMINATE
    for _ in range(2):  # again for any worker started while the handler was replacing others
        children = multiprocessing.active_children()
        for child in children:
            child.kill()
        for child in children:  # reaped: a zombie's pid looks alive, so its temp file would stay
            child.join(timeout=1)
        if handler is not None:
            handler.join(timeout=1)


def ordered_results(pool: Pool, work: Callable, items: Sequence, chunksize: int = 1) -> Iterator:
    """`pool.imap(work, items, chunksize)`, its results waited for in short slices. A signal the
    kernel hands to one of the pool's threads runs its Python handler only once the main thread
    runs again: waiting for a result without a timeout, a stopped command never saw SIGTERM."""
    chunks = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
    results = pool.imap(partial(_apply, work), chunks)  # one chunk per task: an IMapIterator
    while True:
        try:
            chunk = results.next(timeout=0.2)
        except multiprocessing.TimeoutError:
            continue
        except StopIteration:
            return
        yield from chunk


def _apply(work: Callable, chunk: Sequence) -> list:
    return [work(item) for item in chunk]


class Stopped(BaseException):
    """SIGTERM reached a negatives command: it unwinds (temp files go; a BaseException, so no
    `except Exception` on the way swallows it) and ends with the signal's status."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum


def exit_command(status: int) -> None:
    """End the command's process with `status`. Where a stop left a pool, past the interpreter's
    exit, output flushed: that would run the pool's exit handler, which can wait forever on a
    queue lock of workers the signal killed; the kernel ends the pool's workers with it."""
    if ABANDONED_POOLS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def progress(iterable, **kwargs):
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread taking tqdm's process-shared lock beside the pools
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def add_caption_source(parser: argparse.ArgumentParser) -> None:
    """Where a command reads training captions: --shards or --input, and --caption-key."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="Webdataset shards, brace pattern: 'in-{000000..000009}.tar'.")
    source.add_argument("--input", help="Caption file: captions.txt (one per line), .csv, .tsv or .jsonl.")
    parser.add_argument("--caption-key", default=None,
                        help="Member extension (shards; default: txt) or column/key (file; default: "
                             "caption) holding the caption.")
    parser.add_argument("--allow-damaged", action="store_true",
                        help="With --shards: read the readable captions of a damaged shard (cut short "
                             "or corrupt), with a warning naming it, instead of stopping at it.")


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
        if args.allow_damaged:
            raise InputError("--allow-damaged applies to --shards (a damaged caption file's "
                             "malformed lines are named and skipped anyway); drop it")
        return read_file(args.input, args.caption_key or "caption")
    key = args.caption_key or "txt"
    read = partial(_readable_captions, key=key) if args.allow_damaged else partial(shard_captions,
                                                                                 caption_key=key)
    return (c for shard in progress(paths, unit="shard") for c in read(shard))


def _readable_captions(shard: str, key: str) -> Iterator[str]:
    """`shard_captions` of a shard that may be damaged: what it yields before the damage is kept."""
    try:
        yield from shard_captions(shard, key)
    except VocabularyError as err:
        print(f"warning: {err} (--allow-damaged: its readable captions are kept)", file=sys.stderr)


def existing_shards(spec: str, unique_because: str | None = None) -> list[str]:
    """The shards of `--shards`, checked as `neighbors` checks them (`files.local_shards`):
    InputError names a bad pattern or a missing shard, with the fix."""
    try:
        return local_shards(spec, unique_because)
    except ValueError as err:
        raise InputError(str(err)) from None


def input_files(args: argparse.Namespace) -> list[str]:
    """Every file a negatives command reads (caption files, shards, --vocabulary,
    --plausibility, --exclude, --reference, --lm, and the files directly inside a folder given)."""
    named = [getattr(args, flag, None) for flag in ("input", "vocabulary", "plausibility", "exclude",
                                                    "reference", "lm")]
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
