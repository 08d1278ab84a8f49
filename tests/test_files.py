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


@pytest.mark.parametrize("number", [float("nan"), float("inf"), -float("inf")])
def test_json_without_a_number_is_refused_and_the_old_file_kept(tmp_path, number):
    """NaN and infinity are not JSON: writing them fails, so no reader gets an invalid file."""
    path = tmp_path / "out.json"
    files.atomic_write_json(path, {"acc": 0.5})
    with pytest.raises(ValueError, match="not JSON compliant"):
        files.atomic_write_json(path, {"acc": number})
    assert json.loads(path.read_text()) == {"acc": 0.5}
    assert not _temps(tmp_path)


def test_shard_specs_expand_like_train_data():
    spec = "a/shard-{000..002}.tar::b/extra.tar"
    assert files.expand_shards(spec) == ["a/shard-000.tar", "a/shard-001.tar", "a/shard-002.tar",
                                         "b/extra.tar"]


def test_neighbour_shards_must_exist_and_be_unique(tmp_path):
    from open_clip_hn.neighbors import local_shards

    for name in ("x-0.tar", "x-1.tar"):
        (tmp_path / name).write_bytes(b"")
    assert local_shards(f"{tmp_path}/x-{{0..1}}.tar") == [f"{tmp_path}/x-0.tar", f"{tmp_path}/x-1.tar"]
    with pytest.raises(ValueError, match="1 of 3 shard file"):
        local_shards(f"{tmp_path}/x-{{0..2}}.tar")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x-0.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="unique"):
        local_shards(f"{tmp_path}/x-0.tar::{tmp_path}/other/x-0.tar")


def test_stale_temps_of_dead_writers_go_and_live_ones_stay(tmp_path):
    import socket
    import subprocess
    import sys

    host = socket.gethostname().replace("-", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # exited: its pid is free
    names = {f"{files.TMP_PREFIX}{host}-{dead}-abcshard.tar": False,  # a killed writer here
             f"{files.TMP_PREFIX}{host}-{os.getpid()}-defshard.tar": True,  # this live process
             f"{files.TMP_PREFIX}otherhost-{dead}-ghishard.tar": True,  # cannot be checked here
             "shard.tar": True}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert files.remove_stale_temps(tmp_path) == [f"{files.TMP_PREFIX}{host}-{dead}-abcshard.tar"]
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, kept in names.items() if kept)


def test_content_identity_sees_content_not_names(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    data = bytes(range(256)) * 1024  # 256 KiB: head and tail spans do not overlap
    a.write_bytes(data)
    b.write_bytes(data)
    assert files.content_identity(a) == files.content_identity(b)
    changed = bytearray(data)
    changed[-10] ^= 1
    b.write_bytes(bytes(changed))
    assert files.content_identity(a) != files.content_identity(b)
    assert files.content_identity(a)["size"] == len(data)


def test_output_and_device_arguments_are_checked_before_the_work(tmp_path):
    """`writable_output` finds an output under a file or an unwritable folder; `torch_device`
    refuses what torch cannot parse and CUDA where there is none (eval and neighbors use both,
    so a bad one is not reported after scoring, or as a damaged checkpoint)."""
    import argparse

    import pytest
    import torch

    from open_clip_hn.argtypes import torch_device, writable_output

    (tmp_path / "file").write_text("x")
    assert writable_output(None) is None
    assert writable_output(str(tmp_path / "new" / "deeper" / "r.json")) is None  # made when written
    assert writable_output(str(tmp_path / "file" / "r.json")) == f"{tmp_path / 'file'} is a file, not a folder"
    assert torch_device("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="not a torch device: 'foo'"):
        torch_device("foo")
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device on this machine"):
            torch_device("cuda")
