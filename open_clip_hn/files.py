"""Local files: atomic writes (readers and resumed runs never see half a file) and shard specs.

Plain Python (no torch), so the negatives CLI and loader workers can use it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Iterator

TMP_PREFIX = ".tmp-"  # temp files beside their destination; a resumed writer may remove stale ones


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None
                ) -> Iterator[IO]:
    """Open a temp file beside `path`; on success it replaces `path`, on error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_json(path: str | os.PathLike, obj: object, indent: int | None = None) -> None:
    """JSON of `obj` at `path`, written through a temp file (see `atomic_open`)."""
    atomic_write_bytes(path, json.dumps(obj, indent=indent).encode())


def expand_shards(spec: str) -> list[str]:
    """Paths of an OpenCLIP-style shard spec: brace patterns, '::' between several
    ('a/{000..009}.tar::b/x.tar'), as `--train-data` takes them."""
    from braceexpand import braceexpand

    return [path for part in spec.split("::") for path in braceexpand(part)]
