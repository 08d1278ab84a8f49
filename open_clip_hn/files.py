"""Local files: atomic writes (readers and resumed runs never see half a file) and shard specs.

Plain Python (no torch), so the negatives CLI and loader workers can use it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
from collections import Counter
from typing import IO, Iterator

TMP_PREFIX = ".tmp-"  # temp files beside their destination: .tmp-<host>-<pid>-<random><name>
_TMP_OWNER = re.compile(re.escape(TMP_PREFIX) + r"(?P<host>[^/]*?)-(?P<pid>\d+)-")
IDENTITY_SPAN = 1 << 16  # bytes hashed at each end of a file by `content_identity`


def _temp_prefix() -> str:
    """Names the writing process, so a cleanup can tell a killed writer's temp from a live one's."""
    return f"{TMP_PREFIX}{socket.gethostname().replace('-', '_')}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None
                ) -> Iterator[IO]:
    """Open a temp file beside `path`; on success it is synced to disk and replaces `path`, on
    error it is removed. A kill at any moment leaves the old file (or none), never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(), suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not land before the data
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on folders; the rename still happened
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | os.PathLike, every_writer_gone: bool = False) -> list[str]:
    """Remove the temp files in `folder` left by killed writers on this host; return their names.

    Temps of live processes (another job writing into the same folder) and of other hosts
    (whose processes cannot be checked from here) are kept, unless `every_writer_gone`: the
    caller holds the folder's lock, so no writer on another host is alive (a live process of
    this host still keeps its temps).
    """
    removed = []
    host = socket.gethostname().replace("-", "_")
    for name in os.listdir(folder):
        owner = _TMP_OWNER.match(name)
        if owner is None:
            continue
        if owner["host"] == host and _alive(int(owner["pid"])):
            continue
        if owner["host"] != host and not every_writer_gone:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def content_identity(path: str | os.PathLike) -> dict[str, object]:
    """What a data file is, cheaply: its size and a SHA-256 of its first and last 64 KiB.

    Unlike (name, size, mtime) it survives copies and catches a regenerated or re-encoded
    file of the same size; reading only the ends keeps it fast on multi-GB shards.
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(IDENTITY_SPAN))
        if size > IDENTITY_SPAN:
            handle.seek(max(IDENTITY_SPAN, size - IDENTITY_SPAN))
            digest.update(handle.read())
    return {"size": size, "sha256_ends": digest.hexdigest()}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a whole file, read in 4 MiB blocks: what `content_identity` cannot see (an edit
    in the middle that keeps the size), at the cost of reading it all."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


MODEL_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def read_model_config(path: str) -> dict:
    """An OpenCLIP model config JSON (`--model-config`), read and checked for the keys OpenCLIP
    needs; ValueError names the flag, the file and what is wrong (the trainer and the demo both
    read it before any work)."""
    if not os.path.isfile(path):
        raise ValueError(f"--model-config {path}: file not found; pass an OpenCLIP model config JSON")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--model-config {path}: not readable JSON ({err})") from None
    missing = [k for k in MODEL_CONFIG_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        raise ValueError(f"--model-config {path}: missing key(s) {', '.join(missing)}; an OpenCLIP "
                         f"model config has {', '.join(MODEL_CONFIG_KEYS)}")
    return config


SHIPPED_MODEL_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


def unknown_model_hint(model: str) -> str:
    """The fix for a `--model` OpenCLIP does not know: the path of the plugin's own config of
    that name (its tiny models are not registered in OpenCLIP), else `--model-config`."""
    shipped = os.path.join(SHIPPED_MODEL_CONFIGS, f"{model}.json")
    if os.path.isfile(shipped):
        return f"the plugin ships its config: pass --model-config {shipped}"
    return "pass --model-config FILE for a custom one (see open_clip.list_models())"


def atomic_write_json(path: str | os.PathLike, obj: object, indent: int | None = None) -> None:
    """JSON of `obj` at `path`, written through a temp file (see `atomic_open`). NaN and
    infinity raise a ValueError before anything is written: JSON has no such numbers, so
    strict readers (jq, JSON.parse) would refuse the file."""
    atomic_write_bytes(path, json.dumps(obj, indent=indent, allow_nan=False).encode())


def expand_shards(spec: str) -> list[str]:
    """Paths of an OpenCLIP-style shard spec: brace patterns, '::' between several
    ('a/{000..009}.tar::b/x.tar'), as `--train-data` takes them."""
    from braceexpand import braceexpand

    return [path for part in spec.split("::") for path in braceexpand(part)]


SHARDS_FIX = "give local .tar paths, brace patterns and '::' separators, e.g. 'dir/{000..099}.tar'"


def shard_paths(spec: str, flag: str = "--shards") -> list[str]:
    """The paths of a shard spec (`expand_shards`); a pattern that cannot name shards
    (unbalanced braces, an empty path) is a ValueError naming `flag` and the fix in the
    plugin's words, not braceexpand's, the same for every command that reads shards."""
    try:
        paths = expand_shards(spec)
    except ValueError:  # braceexpand's UnbalancedBracesError, which names no flag
        raise ValueError(f"{flag} {spec!r}: unbalanced braces; close every '{{' with a '}}', "
                         "e.g. 'dir/{000..099}.tar'") from None
    if any(not p.strip() for p in paths):
        raise ValueError(f"{flag} {spec!r}: the pattern gives an empty path (an unset shell "
                         f"variable, or '::' at an end?); {SHARDS_FIX}")
    return paths


def local_shards(spec: str, unique_because: str | None = None) -> list[str]:
    """The files of a `--shards` spec (`shard_paths`), all present; with `unique_because` (why
    an output names shards by file name) their names unique too. ValueErrors name the flag and
    the fix."""
    paths = shard_paths(spec)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--shards {spec!r}: {len(missing)} of {len(paths)} shard file(s) not found "
                         f"(first: {missing[0]}); {SHARDS_FIX}")
    name, count = Counter(map(os.path.basename, paths)).most_common(1)[0]
    if unique_because and count > 1:
        raise ValueError(f"--shards {spec!r}: shard file names must be unique ({name} "
                         f"{'twice' if count == 2 else f'{count} times'}; {unique_because}); "
                         "rename or drop the duplicates")
    return paths
