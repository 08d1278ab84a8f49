"""What a `precompute` output folder holds: generator settings, and per shard its input and counts.

Layout inside `--output-dir`:
  .precompute/settings.json       the generator settings every shard of the folder was made with
                                  (num, types, seed, vocabulary digest, lm, caption key,
                                  plausibility model identity, swap reorders dropped, excluded
                                  captions' digest, version)
  .precompute/<shard>.json        one entry per finished shard: the input's identity (size and a
                                  digest of its ends; its modification time and a digest of it
                                  all), samples, masked, skipped (damaged) data and the output's
                                  size; written after the shard, so its presence (matching input
                                  and output) is what "done" means

One entry file per shard means concurrent jobs writing disjoint shards never touch the same
file; only the settings are read-checked-written, under an `fcntl.flock`. Plain Python (no
torch), like the rest of `negatives/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tarfile
from typing import Any, Iterator

from .. import __version__
from ..argtypes import InputError
from ..files import atomic_write_json, file_sha256
from .shards import NEGATIVES_EXTENSION, split_key
from .taxonomy import RULES_REVISION

MANIFEST_DIR = ".precompute"
SETTINGS = "settings.json"
FORMAT_VERSION = 1
_FLAGS = {"num": "--num", "types": "--types", "seed": "--seed", "vocabulary": "--vocabulary",
          "lm": "--lm", "caption_key": "--caption-key", "version": "open_clip_hn version",
          "format": "manifest format", "plausibility": "--plausibility (model identity)",
          "swap_reorders": "--swap-reorders", "exclude": "--exclude (captions' digest)",
          "tagger": "POS tagger (nltk where its data is installed, else lexicon)",
          "rules": "generator rules revision"}


# what a setting absent from a folder's settings.json means: reorders kept (recorded only when
# dropped); a plausibility filter not recorded by an older version, so unknown and never equal;
# the rules before they were recorded
_UNRECORDED: dict[str, Any] = {"swap_reorders": "keep",
                               "plausibility": "not recorded (an older version's folder)",
                               "tagger": "not recorded (an older version's folder)",
                               "rules": 1}


class ManifestError(InputError):
    """An output folder or precomputed shard that does not match what was asked."""


def _digest_file(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def generator_settings(num: int, types: tuple[str, ...], seed: int, vocabulary: str | None,
                       lm: str | None, caption_key: str, plausibility: str | None = None,
                       swap_reorders: bool = True, exclude: frozenset[str] = frozenset(),
                       tagger: str | None = None) -> dict[str, Any]:
    """Everything the output of `precompute` is a function of (besides the input shards).

    The vocabulary enters by content (its file may be rewritten under the same name), the
    plausibility filter by its model's identity (a digest of its captions); the LM by path, as a
    local model folder has no cheap content digest, the excluded captions by a digest of their
    normalised set, the POS tagger by name (a rerun on a machine with the other one would mix
    two parsers' negatives in one folder). Reorders dropped and exclusions are recorded only when
    asked, so folders written before those options keep matching.
    """
    excluded = {} if not exclude else {
        "exclude": hashlib.sha256("\n".join(sorted(exclude)).encode("utf-8")).hexdigest()}
    return {"format": FORMAT_VERSION, "version": __version__, "rules": RULES_REVISION, "num": num,
            "types": list(types),
            "seed": seed, "vocabulary": None if vocabulary is None else _digest_file(vocabulary),
            "lm": None if lm is None else os.path.abspath(lm), "caption_key": caption_key,
            "plausibility": plausibility, **({} if swap_reorders else {"swap_reorders": "drop"}),
            **excluded, **({} if tagger is None else {"tagger": tagger})}


def _entry_path(output_dir: str, name: str) -> str:
    return os.path.join(output_dir, MANIFEST_DIR, name + ".json")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None  # absent or unreadable: treated as "not done", the shard is made again


@contextlib.contextmanager
def _locked(output_dir: str) -> Iterator[None]:
    folder = os.path.join(output_dir, MANIFEST_DIR)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim_output_dir(output_dir: str, settings: dict[str, Any]) -> None:
    """Record `settings` as the folder's, or refuse when it was made with others.

    A folder mixing two configurations would train on both without a trace; checked and
    written under a lock, so two jobs starting together agree on one.
    """
    with _locked(output_dir):
        path = os.path.join(output_dir, MANIFEST_DIR, SETTINGS)
        stored = _read_json(path)
        if stored is None:
            atomic_write_json(path, settings, indent=1)
            return
    def value(recorded: dict[str, Any], key: str) -> Any:
        return recorded.get(key, _UNRECORDED.get(key))
    differing = [f"{_FLAGS.get(k, k)} {_show(value(settings, k))} (folder: {_show(value(stored, k))})"
                 for k in sorted(set(settings) | set(stored)) if value(settings, k) != value(stored, k)]
    if differing:
        fix = "Pass another --output-dir for these settings, or rerun with the folder's settings to finish it"
        if value(settings, "rules") != value(stored, "rules"):  # no flag brings the old rules back
            fix = ("The folder was written by another release of open_clip_hn, whose generator writes "
                   "other negatives: pass another --output-dir, or finish it with that release")
        raise ManifestError(f"--output-dir {output_dir} holds negatives made with other settings: "
                            f"{'; '.join(differing)}. {fix}")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, str) and len(value) == 64:
        return f"sha256 {value[:12]}…"
    return "none" if value is None else str(value)


def shard_done(output_dir: str, source: str, identity: dict[str, Any]) -> bool:
    """Whether `output_dir` holds a finished output of `source` as it is now: same identity
    (size, ends), and the same modification time or, where that changed (a copy, an edit in
    place that kept the size: a fixed caption), the same digest of the whole file."""
    name = os.path.basename(source)
    entry = _read_json(_entry_path(output_dir, name))
    output = os.path.join(output_dir, name)
    if not (isinstance(entry, dict) and entry.get("input") == identity
            and os.path.isfile(output) and os.path.getsize(output) == entry.get("output_size")):
        return False
    return (entry.get("input_mtime_ns") == os.stat(source).st_mtime_ns
            or entry.get("input_sha256") == file_sha256(source))


def input_stamp(source: str) -> dict[str, Any]:
    """The input's modification time and whole-file digest, taken before it is read (so that an
    edit while it is read is not taken as done), for `record_shard`."""
    return {"input_mtime_ns": os.stat(source).st_mtime_ns, "input_sha256": file_sha256(source)}


def record_shard(output_dir: str, source: str, identity: dict[str, Any], samples: int,
                 masked: int, damaged: str | None, stamp: dict[str, Any]) -> None:
    """Mark the shard finished (after its output was renamed into place); `stamp`: the input's
    `input_stamp` from before it was read."""
    name = os.path.basename(source)
    atomic_write_json(_entry_path(output_dir, name), {
        "input": identity, "input_path": os.path.abspath(source), **stamp,
        "samples": samples, "masked": masked,
        "damaged": damaged, "output_size": os.path.getsize(os.path.join(output_dir, name))}, indent=1)


SIZES = "sizes.json"  # OpenCLIP's count of a folder's samples per shard (get_dataset_size)


def write_sizes(output_dir: str) -> str:
    """Write the folder's `sizes.json` ({shard: samples}) from the manifest's finished shards,
    as OpenCLIP reads it when `--train-num-samples` is not given; returns its path."""
    sizes = {}
    folder = os.path.join(output_dir, MANIFEST_DIR)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json") or name == SETTINGS:
            continue
        shard = name[: -len(".json")]
        entry = _read_json(os.path.join(folder, name))
        if (isinstance(entry, dict) and isinstance(entry.get("samples"), int)
                and os.path.isfile(os.path.join(output_dir, shard))):
            sizes[shard] = entry["samples"]
    path = os.path.join(output_dir, SIZES)
    atomic_write_json(path, sizes, indent=1)
    return path


def _keys_without_negatives(path: str) -> tuple[int, int]:
    """(samples, samples without a neg.json member) of one shard, from its tar headers."""
    keys: dict[str, bool] = {}
    try:
        with tarfile.open(path, "r:*") as reader:
            for member in reader:
                if member.isfile():
                    key, extension = split_key(member.name)
                    keys[key] = keys.get(key, False) or extension == NEGATIVES_EXTENSION
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ManifestError(f"--hn-negatives precomputed: shard {path} cannot be read ({err}); "
                            "it is damaged: precompute it again") from None
    return len(keys), sum(not has for has in keys.values())


OPENCLIP_CAPTION_KEY = "txt"  # the member OpenCLIP's webdataset loader reads as the caption
SAMPLED_NEGATIVES = 256  # samples read for the settings of shards that lost their manifest


def _negatives_seen(path: str, limit: int = SAMPLED_NEGATIVES) -> tuple[int, int, set[str]]:
    """(samples read, most negatives of one, types seen) over the first `limit` neg.json
    members of a shard: the settings of precomputed shards copied without `.precompute/`."""
    read, most, types = 0, 0, set()
    try:
        with tarfile.open(path, "r:*") as reader:
            for member in reader:
                if read >= limit:
                    break
                if not (member.isfile() and split_key(member.name)[1] == NEGATIVES_EXTENSION):
                    continue
                try:
                    negatives = json.loads(reader.extractfile(member).read())
                except ValueError:
                    continue  # the loader masks a malformed one and counts it
                read += 1
                if isinstance(negatives, list):
                    most = max(most, len(negatives))
                    types.update(n["type"] for n in negatives if isinstance(n, dict)
                                 and isinstance(n.get("type"), str))
    except (tarfile.TarError, EOFError, OSError):
        return 0, 0, set()  # check_precomputed_shards names a damaged shard
    return read, most, types


def check_precomputed_settings(shards: list[str], num_negatives: int,
                               types: tuple[str, ...] | None, num_is_default: bool = False) -> None:
    """Refuse a run that asks the precomputed folders for more than they hold: more negatives
    per caption than precompute's `--num` (the extra slots would all be masked), a type it
    did not generate (`types`: the run's `--hn-types` when not every type; None: any type), or
    negatives of another caption member than the `.txt` OpenCLIP trains on. A folder without
    precompute's settings (shards copied without `.precompute/`) is judged by the negatives of
    its first shard's first samples."""
    folders: dict[str, str] = {}
    for shard in shards:
        if os.path.isfile(shard):
            folders.setdefault(os.path.dirname(os.path.abspath(shard)), shard)
    default = " (the default)" if num_is_default else ""
    for folder, first in sorted(folders.items()):
        stored = _read_json(os.path.join(folder, MANIFEST_DIR, SETTINGS))
        if isinstance(stored, dict):
            key = stored.get("caption_key")
            if isinstance(key, str) and key != OPENCLIP_CAPTION_KEY:
                raise ManifestError(
                    f"--hn-negatives precomputed: the shards in {folder} hold negatives of their "
                    f"'.{key}' captions (precompute --caption-key {key}), but OpenCLIP trains on "
                    f"the '.{OPENCLIP_CAPTION_KEY}' caption; write the captions as .txt and "
                    f"precompute again into a new --output-dir")
            num, made = stored.get("num"), stored.get("types")
            made, where = (made if isinstance(made, list) else None), f"precompute --num {num}"
            seen = f"precompute --types {','.join(made)}" if made else ""
        else:
            read, num, made_set = _negatives_seen(first)
            if not read:
                continue  # no negatives to judge by: the per-shard check covers it
            made = sorted(made_set)
            where = f"the most among the first {read} samples of {first}; its .precompute/ folder is absent"
            seen = f"types among the first {read} samples of {first}: {', '.join(made) or 'none'}"
        if isinstance(num, int) and num_negatives > num:
            raise ManifestError(
                f"--hn-num-negatives {num_negatives}{default}: the precomputed shards in {folder} "
                f"hold at most {num} negatives per caption ({where}), so {num_negatives - num} of "
                f"every {num_negatives} slots would be masked; pass --hn-num-negatives {num}, or "
                f"precompute again into a new --output-dir with --num {num_negatives}")
        missing = [t for t in types or () if made is not None and t not in made]
        if missing:
            raise ManifestError(
                f"--hn-types {','.join(types)}: the precomputed shards in {folder} hold no "
                f"{', '.join(missing)} negatives ({seen}); pass --hn-types among those, or "
                f"precompute again into a new --output-dir with --types {','.join(types)}")


def check_precomputed_shards(shards: list[str]) -> None:
    """Refuse training on precomputed shards unless EVERY local shard is complete.

    A shard with a manifest entry must still have the size it was written with; a shard
    without one (made by another tool or an older version) must have a neg.json member for
    every sample. Remote shards (URLs, pipes) cannot be checked here and are skipped: the
    loader's own check covers them while streaming. Shards whose manifest entries all record
    every sample masked are refused too: the run would train with no negative at all.
    """
    fix = ("write them with `python -m open_clip_hn.negatives precompute --shards '<raw "
           "shards>' --output-dir DIR` and train on DIR, or use --hn-negatives online")
    recorded = masked = 0  # samples, and those without a negative, by the manifest entries
    entries = 0
    for shard in shards:
        if not os.path.isfile(shard):
            continue
        folder, name = os.path.split(os.path.abspath(shard))
        entry = _read_json(_entry_path(folder, name))
        if isinstance(entry, dict) and entry.get("output_size") == os.path.getsize(shard):
            entries += 1
            recorded += entry.get("samples") or 0
            masked += entry.get("masked") or 0
            continue
        if isinstance(entry, dict):
            raise ManifestError(f"--hn-negatives precomputed: shard {shard} is "
                                f"{os.path.getsize(shard)} bytes, but precompute wrote "
                                f"{entry.get('output_size')}: it changed since; {fix}")
        samples, missing = _keys_without_negatives(shard)
        if missing:
            raise ManifestError(f"--hn-negatives precomputed: shard {shard} has no neg.json "
                                f"members for {missing} of its {samples} samples (a raw shard?); "
                                f"{fix}")
    if entries == len(shards) and recorded and masked == recorded:
        raise ManifestError(f"--hn-negatives precomputed: precompute's manifest records no negative "
                            f"for any of the {recorded} samples of the {len(shards)} shard(s) (e.g. "
                            f"{shards[0]}), so every negative slot would be masked: their captions "
                            "were not under precompute's --caption-key, or no type could change them. "
                            "Precompute them again into a new --output-dir with the captions' "
                            "--caption-key, or use --hn-negatives online")
