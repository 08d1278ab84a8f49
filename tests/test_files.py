"""Atomic writes: a reader sees the old file or the new one, never a part, and no temp is left."""

import json
import os

import pytest

from open_clip_hn import files


def _temps(folder):
    return [n for n in os.listdir(folder) if n.startswith(files.TMP_PREFIX)]


def test_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "deep" / "out.json"
    files.atomic_write_json(path, {"a": 1})
    files.atomic_write_json(path, {"b": [1, 2]}, indent=2)
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert path.read_text().startswith("{\n  ")
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert not _temps(path.parent)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    files.atomic_write_json(path, {"kept": True})
    with pytest.raises(RuntimeError):
        with files.atomic_open(path, "w", encoding="utf-8") as handle:
            handle.write("half a fi")
            raise RuntimeError("writer died")
    assert json.loads(path.read_text()) == {"kept": True}
    assert not _temps(tmp_path)
