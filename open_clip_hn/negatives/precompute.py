"""`negatives precompute`: shards rewritten with a `<key>.neg.json` per sample, recorded in a manifest.

Each shard is written to a temp file and renamed, then recorded in `manifest.py`'s per-shard
entry, so a killed run resumes by skipping the shards whose entry matches their input. A
truncated or corrupt input shard is reported with counts and not written (unless
`allow_damaged`), and the command exits non-zero. Plain Python (no torch).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import sys
import tarfile
from collections import Counter
from contextlib import contextmanager
from functools import partial
from typing import BinaryIO, Iterator

from ..argtypes import InputError
from ..files import atomic_open, content_identity, remove_stale_temps
from .cli_common import ordered_results, progress, worker_pool
from .generator import NegativeGenerator
from .manifest import (claim_output_dir, generator_settings, input_stamp, record_shard, shard_done,
                       write_sizes)
from .shards import (NEGATIVES_EXTENSION, compression, member_end, negatives_member, split_key,
                     trailing_damage)


class DamagedShard(Exception):
    """An input shard that cannot be read whole: the message says where and how much was read."""


class EmptyShard(Exception):
    """Raised inside the write so that a shard without samples leaves no file and no record."""


def precompute_shard(source: str, output_dir: str, generator: NegativeGenerator, k: int,
                     caption_key: str, allow_damaged: bool = False) -> tuple[str, int, int, str]:
    """Write `output_dir/<name>` with a neg.json per sample, unless the manifest says it is done.

    Returns (status, samples, masked, detail), status one of written, skipped, damaged, empty
    (a tar without samples: nothing is written or recorded, so a rerun does not skip it). A
    truncated or corrupt input is not written (status damaged, detail saying where and how
    much was read) unless `allow_damaged`: then the readable samples are kept, like
    webdataset's warn_and_continue, and the manifest records the damage.
    """
    destination = os.path.join(output_dir, os.path.basename(source))
    identity = content_identity(source)
    if shard_done(output_dir, source, identity):
        return "skipped", 0, 0, ""
    stamp = input_stamp(source)
    try:
        # ignore_zeros: scan past unreadable headers instead of stopping as if the archive ended
        reader = tarfile.open(source, "r:*", ignore_zeros=True)
    except (tarfile.TarError, EOFError, OSError) as err:
        return "damaged", 0, 0, f"0 samples readable; not a tar archive ({err})"
    generator.load()
    samples = masked = 0
    size = identity["size"]
    damage: list[str] = []
    try:
        with reader, atomic_open(destination, "wb") as handle, \
                compressed_like(handle, compression(source)) as stream, \
                tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT) as writer:
            key, caption, last, expected_offset = None, None, None, 0

            def flush() -> None:
                nonlocal samples, masked
                if key is None:
                    return
                negatives = generator.generate(caption, k) if caption is not None else []
                samples += 1
                masked += not negatives
                info, data = negatives_member(key, negatives, last)
                writer.addfile(info, io.BytesIO(data))

            try:
                for member in reader:
                    if member.offset > expected_offset:
                        damage.append(f"{member.offset - expected_offset} corrupt bytes at byte "
                                      f"{expected_offset} skipped (resumed at {member.name})")
                    expected_offset = member_end(member)
                    if not member.isfile():
                        continue
                    member_key, extension = split_key(member.name)
                    if extension == NEGATIVES_EXTENSION:
                        continue  # a rerun on precomputed shards replaces old negatives
                    payload = reader.extractfile(member).read()
                    if len(payload) != member.size:
                        raise tarfile.ReadError(f"{member.name} cut short")
                    if member_key != key:
                        flush()
                        key, caption = member_key, None
                    last = member
                    if extension == caption_key:
                        try:
                            caption = payload.decode("utf-8")
                        except UnicodeDecodeError:
                            print(f"warning: {source}: {member.name} is not UTF-8; sample masked",
                                  file=sys.stderr)
                    writer.addfile(member, io.BytesIO(payload))
                damage += trailing_damage(source, expected_offset, size)
            except (tarfile.TarError, EOFError, OSError, ValueError) as err:
                damage.append(f"unreadable tar data after byte {min(expected_offset, size)} of {size} "
                              f"({err}); "
                              "rest of the shard skipped")
            flush()
            if damage and not allow_damaged:
                raise DamagedShard()
            if not samples:
                raise EmptyShard()
    except EmptyShard:
        return "empty", 0, 0, "no samples (an empty tar)"
    except DamagedShard:
        return "damaged", samples, masked, f"{samples} samples readable; " + "; ".join(damage)
    detail = "; ".join(damage)
    if damage:
        print(f"warning: {source}: damaged, kept the {samples} readable samples (--allow-damaged): "
              f"{detail}", file=sys.stderr)
    record_shard(output_dir, source, identity, samples, masked, detail or None, stamp)
    return "written", samples, masked, detail


@contextmanager
def compressed_like(handle: BinaryIO, kind: str) -> Iterator[BinaryIO]:
    """`handle`, compressed as `kind` ('gz', 'bz2', 'xz' or '' for none): an output shard is
    compressed like its input, which its name (`.tar.gz`) says. No name or time is stored, so the
    same input and settings give the same bytes."""
    if not kind:
        yield handle
        return
    opened = {"gz": lambda: gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0, compresslevel=6),
              "bz2": lambda: bz2.BZ2File(handle, "wb"),
              "xz": lambda: lzma.LZMAFile(handle, "wb")}[kind]()
    with opened as stream:  # closing it flushes into `handle`, which stays open
        yield stream


def _check_caption_key(shard: str, caption_key: str) -> None:
    """Refuse a --caption-key that no sample of the first shard has, before the folder is claimed
    with it: every sample would be written without negatives, and a rerun with the right key
    refused by the folder's settings."""
    seen: set[str] = set()
    try:
        with tarfile.open(shard, "r:*", ignore_zeros=True) as reader:
            for member in reader:
                if not member.isfile():
                    continue
                extension = split_key(member.name)[1]
                if extension == caption_key:
                    return
                seen.add(extension)
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return  # damaged: precompute_shard reports it, with counts
    seen.discard(NEGATIVES_EXTENSION)
    dotted = sorted(e for e in seen if e.endswith("." + caption_key))
    if dotted:
        raise InputError(f"{shard}: the sample keys hold dots (a member '<key>.{dotted[0]}'): "
                         "webdataset splits a member's name at the first dot after the folder, "
                         f"so its extension is '{dotted[0]}', not '{caption_key}', for OpenCLIP too; "
                         "rename the members so that keys have no dots (e.g. 'a.b.txt' -> 'a_b.txt')")
    if seen:
        shown = sorted(seen)
        listed = ", ".join("." + e for e in shown[:8]) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")
        raise InputError(f"--caption-key {caption_key}: no sample of {shard} has a '.{caption_key}' "
                         f"member (its members: {listed}); pass --caption-key with the extension "
                         "holding the captions (e.g. txt)")


def precompute(shards: list[str], output_dir: str, generator: NegativeGenerator, k: int,
               caption_key: str, workers: int = 1, allow_damaged: bool = False,
               vocabulary: str | None = None, lm: str | None = None) -> int:
    """`negatives precompute`: every shard into `output_dir`, recorded in its manifest.

    Returns the exit status: 0, 1 when an input shard is damaged (reported with counts) or no
    sample was found, 2 when the output folder cannot be used (named, with the fix).
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        print(f"error: --output-dir {output_dir} is a file; pass a folder (made when missing)",
              file=sys.stderr)
        return 2
    inside = [s for s in shards if os.path.samefile(os.path.dirname(os.path.abspath(s)),
                                                    output_dir)] \
        if os.path.isdir(output_dir) else []
    if inside:
        print(f"error: --output-dir {output_dir} holds the input shards (e.g. {inside[0]}); "
              "the output would overwrite them: pass another --output-dir", file=sys.stderr)
        return 2
    _check_caption_key(shards[0], caption_key)
    os.makedirs(output_dir, exist_ok=True)
    claim_output_dir(output_dir, generator_settings(
        k, generator.types, generator.seed, vocabulary, lm, caption_key,
        None if generator.plausibility is None else generator.plausibility.identity,
        generator.swap_reorders, generator.exclude, generator.tagger_name))
    remove_stale_temps(output_dir)  # of killed runs; a live job's temps stay
    work = partial(precompute_shard, output_dir=output_dir, generator=generator, k=k,
                   caption_key=caption_key, allow_damaged=allow_damaged)
    if workers > 1:
        with worker_pool(workers) as pool:
            results = list(progress(ordered_results(pool, work, shards), total=len(shards), unit="shard"))
    else:
        results = [work(s) for s in progress(shards, unit="shard")]
    totals = Counter(status for status, *_ in results)
    samples = sum(count for status, count, *_ in results if status == "written")
    masked = sum(empty for status, _, empty, _ in results if status == "written")
    write_sizes(output_dir)  # so OpenCLIP counts the samples without --train-num-samples
    print(f"{totals['written']} shards written, {totals['skipped']} already done (skipped), "
          f"{totals['damaged']} damaged and {totals['empty']} empty (not written); {samples} "
          f"samples, {masked} without "
          f"negatives -> {output_dir}", file=sys.stderr)
    damaged = [(shard, detail) for shard, (status, *_, detail) in zip(shards, results)
               if status == "damaged"]
    for shard, detail in damaged:
        print(f"error: input shard {shard} is damaged: {detail}", file=sys.stderr)
    if damaged:
        print(f"error: {len(damaged)} of {len(shards)} input shard(s) damaged and not written; "
              "re-create or re-download them and rerun (finished shards are kept), or pass "
              "--allow-damaged to keep only their readable samples", file=sys.stderr)
        return 1
    empty = [shard for shard, (status, *_) in zip(shards, results) if status == "empty"]
    if empty:
        print(f"error: {len(empty)} input shard(s) hold no samples and were not written (e.g. "
              f"{empty[0]}); are they webdataset tars? Leave them out of --shards", file=sys.stderr)
        return 1
    if samples and masked == samples:
        print(f"error: none of the {samples} samples got a negative: are their '.{caption_key}' "
              "members plain-text captions (--caption-key)? Training on these shards is refused "
              "(every slot would be masked); precompute again into a new --output-dir",
              file=sys.stderr)
        return 1
    return 0
