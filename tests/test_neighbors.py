"""Image kNN index over shards and the stage that puts neighbours into the same batch."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_benchmark
from open_clip_hn.files import content_identity
from open_clip_hn.neighbors import (NeighborIndex, build, insert_before_decode, knn_search, main,
                                    neighbor_stage, rebinding_neighbors, write_given,
                                    write_rebinding)
from open_clip_hn.scenes import shards_spec, write_scene_shards

TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "open_clip_hn" / "model_configs" / "hn-tiny-vit.json")
NUM_SAMPLES, PER_SHARD, K = 2000, 250, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_scene_shards(str(tmp_path_factory.mktemp("nb-shards")), NUM_SAMPLES, PER_SHARD, seed=3)


@pytest.fixture(scope="module")
def index_dir(shards, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("nb-index"))
    build(shards_spec(shards), "hn-tiny-vit", out, model_config=TINY_CONFIG, k=K, batch_size=500)
    return out


def test_knn_search_exact_excludes_self_and_finds_true_neighbours():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids, sims, description = knn_search(x, 5, use_gpu=False)
    brute = x @ x.T
    np.fill_diagonal(brute, -np.inf)
    assert description == "Flat"
    assert np.array_equal(ids, np.argsort(-brute, axis=1)[:, :5])
    assert np.allclose(sims, np.take_along_axis(brute, ids, axis=1), atol=1e-5)


def test_knn_search_switches_to_ivf_pq_beyond_exact_max():
    rng = np.random.default_rng(1)
    cluster = rng.integers(0, 40, 4000)
    x = (rng.normal(size=(40, 32))[cluster] + 0.2 * rng.normal(size=(4000, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    approx, _, description = knn_search(x, 10, exact_max=1000, nlist=32, nprobe=8, use_gpu=False)
    assert description == "IVF32,PQ4x4fs"
    assert not np.any(approx == np.arange(len(x))[:, None])  # self never returned
    same_cluster = np.mean(cluster[approx] == cluster[:, None])
    assert same_cluster > 0.9  # a random pick would be ~1/40


def test_build_writes_a_manifest_naming_its_shards(index_dir, shards):
    manifest = json.loads(Path(index_dir, "index.json").read_text())
    assert manifest["num_samples"] == NUM_SAMPLES and manifest["k"] == K and manifest["index"] == "Flat"
    assert [s["name"] for s in manifest["shards"]] == [os.path.basename(p) for p in shards]
    neighbors = np.load(Path(index_dir, "neighbors.npy"))
    assert neighbors.shape == (NUM_SAMPLES, K)
    assert not np.any(neighbors == np.arange(NUM_SAMPLES)[:, None])
    assert neighbors.min() >= 0 and neighbors.max() < NUM_SAMPLES


def test_fetch_returns_the_tar_members_byte_for_byte(index_dir, shards):
    index = NeighborIndex(index_dir, shards)
    sample_id = PER_SHARD * 3 + 17
    sample = index.fetch(sample_id)
    with tarfile.open(shards[3]) as tar:
        assert sample["png"] == tar.extractfile(f"{sample['__key__']}.png").read()
        assert sample["txt"] == tar.extractfile(f"{sample['__key__']}.txt").read()
    assert index.id_of(shards[3], sample["__key__"]) == sample_id


def test_build_resumes_without_reembedding(index_dir, shards):
    embeddings = sorted(Path(index_dir, "embeddings").glob("*.npy"))
    before = {p: p.stat().st_mtime_ns for p in embeddings}
    os.remove(embeddings[0])  # as if the build had stopped before this shard was done
    main(["build", "--shards", shards_spec(shards), "--model", "hn-tiny-vit", "--model-config",
          TINY_CONFIG, "--output", index_dir, "--k", str(K), "--workers", "0"])
    after = {p: p.stat().st_mtime_ns for p in embeddings}
    assert [p for p in embeddings if after[p] != before[p]] == [embeddings[0]]


def _file_bytes(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("finished", [False, True], ids=["fresh-output", "finished-index"])
def test_a_build_stopped_mid_scan_resumes_without_rescanning(tmp_path, monkeypatch, finished):
    """Scanning a large dataset takes long, so each shard's scan is kept as it ends: a build
    killed mid-scan (here the third shard's scan fails) scans only the rest when rerun. Over a
    finished index (its shards rendered anew under the same names) the stopped build leaves
    every file of the index as it was; the resumed one re-embeds the changed shards."""
    from open_clip_hn import neighbors

    data, out = str(tmp_path / "data"), tmp_path / "index"
    spec = shards_spec(write_scene_shards(data, 32, 8, seed=0))

    def run() -> None:
        build(spec, "hn-tiny-vit", str(out), model_config=TINY_CONFIG, k=2, batch_size=64)

    if finished:
        run()
        write_scene_shards(data, 32, 8, seed=1)
    before, scan, scanned = _file_bytes(out), neighbors.scan_shard, []

    def scan_until_killed(path: str) -> list:
        if len(scanned) == 2:
            raise RuntimeError("killed mid-scan")
        scanned.append(os.path.basename(path))
        return scan(path)

    monkeypatch.setattr(neighbors, "scan_shard", scan_until_killed)
    with pytest.raises(RuntimeError, match="killed mid-scan"):
        run()
    after = _file_bytes(out)
    assert {path: after[path] for path in before} == before
    assert sorted(path.relative_to(out).as_posix() for path in set(after) - set(before)) == \
        ["scanned/shard-00000.tar.json", "scanned/shard-00001.tar.json"]

    scanned.clear()
    monkeypatch.setattr(neighbors, "scan_shard",
                        lambda path: scanned.append(os.path.basename(path)) or scan(path))
    run()
    assert scanned == ["shard-00002.tar", "shard-00003.tar"]
    paths = neighbors.local_shards(spec)
    for path in paths:
        stored = json.loads((out / "catalog" / (os.path.basename(path) + ".json")).read_text())
        assert stored["identity"] == content_identity(path)
        assert [key for key, _ in scan(path)] == stored["keys"]
    embedded = _file_bytes(out / "embeddings")
    assert not any(before.get(path) == content for path, content in embedded.items())  # re-embedded
    assert len(NeighborIndex(str(out), paths)) == 32 and not (out / "scanned").exists()


def test_a_damaged_embeddings_file_is_embedded_again(tmp_path, caplog):
    """A shard's embeddings file damaged after it was written (the writes are atomic): a rerun
    of the build embeds that shard again, with a warning naming the file, and finishes."""
    data, out = str(tmp_path / "data"), tmp_path / "index"
    spec = shards_spec(write_scene_shards(data, 32, 8, seed=0))
    build(spec, "hn-tiny-vit", str(out), model_config=TINY_CONFIG, k=2, batch_size=64)
    damaged = out / "embeddings" / "shard-00001.tar.npy"
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level("WARNING"):
        build(spec, "hn-tiny-vit", str(out), model_config=TINY_CONFIG, k=2, batch_size=64)
    assert f"{damaged} is damaged" in caplog.text
    assert np.load(damaged).shape[0] == 8 and len(NeighborIndex(str(out))) == 32


def test_resume_with_another_model_is_refused(index_dir, shards, tmp_path):
    other = tmp_path / "epoch_1.pt"
    other.write_bytes(b"another model's weights")  # refused by its record, before it is loaded
    with pytest.raises(ValueError, match=f"was built with other settings: --pretrained {other} "
                                         r"\(index: none\); use a fresh --output"):
        build(shards_spec(shards), "hn-tiny-vit", index_dir, model_config=TINY_CONFIG,
              pretrained=str(other), k=K)


def test_index_built_for_other_shards_is_refused(index_dir, shards, tmp_path):
    with pytest.raises(ValueError, match="built for other shards .*in the index but not in --train-data"):
        neighbor_stage(index_dir, 1, 16, shards=shards[:-1])
    other = [str(tmp_path / os.path.basename(p)) for p in shards]  # same names and sizes ...
    for source, copy in zip(shards, other):
        Path(copy).write_bytes(Path(source).read_bytes())
    neighbor_stage(index_dir, 1, 16, shards=other)  # a copy is the same content: accepted
    data = bytearray(Path(other[0]).read_bytes())
    data[1024 + 100] ^= 0xFF  # ... one byte of the first image differs
    Path(other[0]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="changed since the build: shard-00000.tar"):
        neighbor_stage(index_dir, 1, 16, shards=other)


def test_index_of_the_old_format_is_refused_with_the_fix(index_dir, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(index_dir, old)
    manifest = json.loads((old / "index.json").read_text())
    (old / "index.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(ValueError, match="index format 1 identifies shards by name and size.*rebuild"):
        NeighborIndex(str(old))


@pytest.mark.parametrize("damage, message", [
    ("manifest", r"index.json cannot be read \(Expecting"),
    ("cut", r"neighbors.npy cannot be read"),
    ("rows", r"neighbors.npy holds an array of shape \(10, \d+\), the manifest 2000 samples"),
    ("ids", r"neighbors.npy holds ids outside \[-1, 2000\) \(\d+ to 99999\)"),
    ("catalog", r"no catalog for 1 shard\(s\) \(e.g. catalog/shard-00001.tar.json\)"),
    ("cut catalog", r"catalog/shard-00001.tar.json cannot be read \(JSONDecodeError"),
    ("short catalog", r"catalog/shard-00001.tar.json does not list the \d+ samples"),
])
def test_a_damaged_index_is_refused_before_training_naming_the_file(index_dir, tmp_path, damage, message):
    """Each of these used to pass the start-up check and fail in a loader worker mid-epoch (or,
    with one bad id, never: that anchor was not drawn)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(index_dir, bad)
    neighbors = np.load(bad / "neighbors.npy")
    if damage == "manifest":
        (bad / "index.json").write_text('{"version": 2\n"k": 1}')
    elif damage == "cut":
        (bad / "neighbors.npy").write_bytes((bad / "neighbors.npy").read_bytes()[:100])
    elif damage == "rows":
        np.save(bad / "neighbors.npy", neighbors[:10])
    elif damage == "ids":
        neighbors[5, 0] = 99999
        np.save(bad / "neighbors.npy", neighbors)
    elif damage == "catalog":
        os.remove(bad / "catalog" / "shard-00001.tar.json")
    else:
        catalog = bad / "catalog" / "shard-00001.tar.json"
        text = catalog.read_text()
        stored = json.loads(text)
        catalog.write_text(text[:len(text) // 2] if damage == "cut catalog" else json.dumps(
            {**stored, "keys": stored["keys"][:-1], "members": stored["members"][:-1]}))
    with pytest.raises(ValueError, match=message):
        NeighborIndex(str(bad))


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], "argument --k: must be >= 1, got 0"),
    (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    (["--model", "no-such-model"], "error: --model 'no-such-model' is not an OpenCLIP model"),
    (["--shards", "/nonexistent/x-{0..1}.tar"], "error: --shards '/nonexistent/x-{0..1}.tar': 2 of 2"),
    (["--pretrained", "/nonexistent/epoch_1.pt"], "error: checkpoint /nonexistent/epoch_1.pt does not exist"),
    (["--pretrained", "opneai"], "error: --pretrained 'opneai' is neither a pretrained tag of --model "
                                 "hn-tiny-vit (its tags: none) nor a checkpoint file; pass one of those"),
    (["--output", "{tmp}/file.txt"], "error: --output {tmp}/file.txt is a file, not an index folder"),
])
def test_cli_user_errors_exit_2_without_traceback(shards, tmp_path, argv, message):
    """Exit 2, as argparse and the project's other CLIs exit on a user error."""
    import subprocess
    import sys

    (tmp_path / "file.txt").write_text("not an index")
    base = {"--shards": shards_spec(shards), "--model": "hn-tiny-vit", "--model-config": TINY_CONFIG,
            "--output": str(tmp_path / "index"), "--workers": "0"}
    base.update({flag: value.replace("{tmp}", str(tmp_path)) for flag, value in zip(argv[::2], argv[1::2])})
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.neighbors", "build",
                           *[x for kv in base.items() for x in kv]], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message.replace("{tmp}", str(tmp_path)) in proc.stderr
    if argv[0] in ("--model", "--pretrained"):  # checked before the shards are scanned
        assert not (tmp_path / "index").exists()


def test_a_checkpoint_changed_since_the_build_is_refused_before_output_changes(shards, tmp_path, capsys,
                                                                              caplog):
    """A rerun whose --pretrained file holds other weights now (overwritten in place, as
    epoch_latest.pt is; here by a model of the same size) would mix two models' embeddings: it
    is refused before --output changes. An index whose build.json (an older version's) has no
    record of the checkpoint's content is resumed with a warning, not re-embedded, and the
    content recorded from now on. A checkpoint that does not load is refused before a fresh
    --output records what it is built from."""
    import open_clip

    open_clip.add_model_config(TINY_CONFIG)
    checkpoint = tmp_path / "epoch_latest.pt"
    torch.save({"state_dict": open_clip.create_model("hn-tiny-vit").state_dict()}, checkpoint)
    out, fresh = tmp_path / "index", tmp_path / "fresh"
    argv = ["build", "--shards", shards[0], "--model", "hn-tiny-vit", "--model-config", TINY_CONFIG,
            "--pretrained", str(checkpoint), "--workers", "0", "--k", "2", "--output"]
    main([*argv, str(out)])
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    built = checkpoint.read_bytes()
    torch.save({"state_dict": open_clip.create_model("hn-tiny-vit").state_dict()}, checkpoint)
    assert checkpoint.stat().st_size == len(built) and checkpoint.read_bytes() != built

    def refused(argv: list[str]) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        return capsys.readouterr().err

    overwritten = refused([*argv, str(out)])
    assert f"error: --output {out} was built from --pretrained {checkpoint} when it held " \
           f"{len(built)} bytes (sha256 of its ends " in overwritten
    assert f"it now holds {len(built)} bytes" in overwritten
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    assert len(NeighborIndex(str(out), shards[:1])) == PER_SHARD

    checkpoint.write_bytes(built)
    older = json.loads((out / "build.json").read_text())
    del older["pretrained_identity"]  # as versions that recorded the checkpoint by path wrote it
    (out / "build.json").write_text(json.dumps(older))
    embedded = {path: path.stat().st_mtime_ns for path in (out / "embeddings").glob("*.npy")}
    with caplog.at_level(logging.WARNING):
        main([*argv, str(out)])
    assert f"--output {out} was built from --pretrained {checkpoint} by an older version, which " \
           "did not record the checkpoint's content: it could not be compared with the one the " \
           "existing embeddings were made with" in caplog.text
    assert {path: path.stat().st_mtime_ns for path in embedded} == embedded  # kept, not re-embedded
    recorded = json.loads((out / "build.json").read_text())["pretrained_identity"]
    assert recorded == content_identity(str(checkpoint))

    checkpoint.write_bytes(built[:4096])
    assert f"error: checkpoint {checkpoint} cannot be loaded" in refused([*argv, str(fresh)])
    assert not (fresh / "build.json").exists()  # free for other settings (its shard scans kept)


@pytest.mark.parametrize("command", ["build", "rebinding"])
@pytest.mark.parametrize("pattern, message", [
    ("{dir}/{{000..003.tar", "unbalanced braces; close every '{' with a '}', e.g. 'dir/{000..099}.tar'"),
    ("", "the pattern gives an empty path (an unset shell variable, or '::' at an end?)"),
    ("{dir}/x.tar::", "the pattern gives an empty path"),
    ("{dir}/none-{{0..1}}.tar", "2 of 2 shard file(s) not found"),
])
def test_a_bad_shards_pattern_is_a_usage_error_before_any_model(tmp_path, monkeypatch, capsys,
                                                                command, pattern, message):
    """A pattern that gives no shard files is argparse's usage error (exit 2) naming --shards in
    the plugin's words (not braceexpand's), before the output folder or a model is made."""
    (tmp_path / "x.tar").write_bytes(b"")
    spec = pattern.format(dir=tmp_path)
    out = tmp_path / "index"
    monkeypatch.setattr("open_clip_hn.neighbors._load_model", lambda *a: pytest.fail("model built"))
    model = ["--model", "hn-tiny-vit"] if command == "build" else []
    with pytest.raises(SystemExit) as exit_:
        main([command, "--shards", spec, "--output", str(out), *model])
    assert exit_.value.code == 2
    assert f"error: --shards {spec!r}: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_shards_without_samples_are_refused_before_the_model(tmp_path, monkeypatch):
    """Checked before the model loads and before a finished index in --output is marked
    unfinished: the refusal costs no model load and leaves the folder as it was."""
    shard = tmp_path / "captions-only.tar"
    (tmp_path / "000.txt").write_text("a red cube")
    with tarfile.open(shard, "w") as tar:
        tar.add(tmp_path / "000.txt", arcname="000.txt")
    monkeypatch.setattr("open_clip_hn.neighbors._load_model", lambda *a: pytest.fail("model built"))
    with pytest.raises(ValueError, match=r"--shards .*captions-only.tar: none of the 1 shard\(s\) "
                                         "holds a sample with an image"):
        build(str(shard), "hn-tiny-vit", str(tmp_path / "index"))
    assert not (tmp_path / "index" / "build.json").exists()


def test_unreadable_shard_and_output_file_are_named(tmp_path):
    from open_clip_hn.neighbors import scan_shard

    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 160)
    with pytest.raises(ValueError, match=f"shard {bad} cannot be read"):
        scan_shard(str(bad))
    with pytest.raises(ValueError, match="is a file, not an index folder"):
        build(str(bad), "hn-tiny-vit", str(bad), model_config=TINY_CONFIG)


def test_compressed_shards_are_refused_naming_the_fix(tmp_path, monkeypatch):
    """The index reads images back by byte offset: a .tar.gz is refused before a model loads,
    naming the shard and the fix, not reported as a damaged tar."""
    import gzip

    plain = tmp_path / "000.tar"
    (tmp_path / "000.txt").write_text("a red cube")
    with tarfile.open(plain, "w") as tar:
        tar.add(tmp_path / "000.txt", arcname="000.txt")
    (tmp_path / "001.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    monkeypatch.setattr("open_clip_hn.neighbors._load_model", lambda *a: pytest.fail("model built"))
    with pytest.raises(ValueError, match=r"--shards: 1 of 2 shard\(s\) are compressed \(.*001.tar.gz "
                                         r"is gz\).*decompress them"):
        build(f"{plain}::{tmp_path / '001.tar.gz'}", "hn-tiny-vit", str(tmp_path / "index"))
    assert not (tmp_path / "index").exists()


def test_a_checkpoint_trained_as_another_model_is_refused_as_eval_refuses_it(shards, tmp_path, capsys,
                                                                           monkeypatch):
    """The checkpoint's record (CHECKPOINT.json) names the model it was trained as: building
    with another --model (QuickGELU vs GELU loads either way) is refused before any model loads,
    unless --allow-model-mismatch."""
    checkpoint = tmp_path / "epoch_1.pt"
    checkpoint.write_bytes(b"weights")
    (tmp_path / "epoch_1.pt.json").write_text(json.dumps({"model": "hn-tiny-vit-quickgelu"}))
    monkeypatch.setattr("open_clip_hn.neighbors._load_model", lambda *a: pytest.fail("model built"))
    argv = ["build", "--shards", shards_spec(shards), "--model", "hn-tiny-vit", "--model-config",
            TINY_CONFIG, "--pretrained", str(checkpoint), "--output", str(tmp_path / "index")]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "it was trained as --model hn-tiny-vit-quickgelu, not --model " \
        "hn-tiny-vit (QuickGELU vs GELU" in err and "--allow-model-mismatch" in err
    assert not (tmp_path / "index").exists()
    (tmp_path / "epoch_1.pt.json").write_text("{")
    with pytest.raises(SystemExit):
        main(argv)
    assert "unreadable model record" in capsys.readouterr().err


def test_an_interrupted_build_ends_with_one_line(shards, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("open_clip_hn.neighbors.build", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(["build", "--shards", shards_spec(shards), "--model", "hn-tiny-vit", "--output",
              str(tmp_path / "index")])
    assert stop.value.code == 130
    assert capsys.readouterr().err.startswith(f"interrupted: every file of {tmp_path / 'index'} is "
                                              "written whole or not at all; the same command resumes")


def test_stage_rejects_groups_larger_than_a_batch(index_dir):
    with pytest.raises(ValueError, match="must be in \\[1, batch size - 1 = 3\\]"):
        neighbor_stage(index_dir, 4, 4)


class _IdTokenizer:
    """Stands in for the tokenizer: the 'caption' is the sample's global id (set by _tag_ids)."""

    def __call__(self, text: str) -> torch.Tensor:
        return torch.tensor([[int(text)]])


class _TagIds:
    """Replaces each caption by the sample's global id, so batches can be traced to the index."""

    def __init__(self, index_dir: str):
        self.index_dir = index_dir

    def __call__(self, samples):
        index = NeighborIndex(self.index_dir)
        for sample in samples:
            sample["txt"] = str(index.id_of(sample["__url__"], sample["__key__"])).encode()
            yield sample


def _preprocess(image):
    return torch.zeros(1)


def _batches_of_ids(shards, index_dir: str, grouped: bool, per_sample: int, batch_size: int
                    ) -> list[list[int]]:
    """Run OpenCLIP's own webdataset train pipeline (2 workers) and return each batch's ids."""
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(train_data=shards_spec(shards), train_num_samples=NUM_SAMPLES,
                              dataset_resampled=False, train_data_upsampling_factors=None, seed=0,
                              batch_size=batch_size, workers=2, world_size=1)
    data = get_wds_dataset(args, _preprocess, is_train=True, tokenizer=_IdTokenizer())
    if grouped:
        insert_before_decode(data.dataloader, neighbor_stage(index_dir, per_sample, batch_size, shards))
    insert_before_decode(data.dataloader, _TagIds(index_dir))
    return [texts[:, 0].tolist() for _, texts in data.dataloader]


def _pair_shares(batches: list[list[int]], neighbors: np.ndarray) -> tuple[float, float]:
    """Share of within-batch pairs that are kNN neighbours (either way) and mutual neighbours."""
    knn = [set(row.tolist()) for row in neighbors]
    related = mutual = pairs = 0
    for batch in batches:
        for a, b in itertools.combinations(batch, 2):
            forward, backward = b in knn[a], a in knn[b]
            pairs += 1
            related += forward or backward
            mutual += forward and backward
    return related / pairs, mutual / pairs


def test_batches_hold_neighbours_far_above_random(index_dir, shards):
    neighbors = np.load(Path(index_dir, "neighbors.npy"))
    batch_size, per_sample = 16, 1
    grouped = _batches_of_ids(shards, index_dir, True, per_sample, batch_size)
    plain = _batches_of_ids(shards, index_dir, False, per_sample, batch_size)

    assert len(grouped) == len(plain) and all(len(b) == batch_size for b in grouped)
    assert all(len(set(b)) == len(b) for b in grouped), "a batch holds a sample twice"
    related, mutual = _pair_shares(grouped, neighbors)
    plain_related, plain_mutual = _pair_shares(plain, neighbors)
    edges = {frozenset((i, int(j))) for i, row in enumerate(neighbors) for j in row}
    expected = len(edges) / (NUM_SAMPLES * (NUM_SAMPLES - 1) / 2)
    print(f"\nkNN pairs within batches (k={K}, B={batch_size}, 1+{per_sample} per group): "
          f"grouped {related:.2%} (mutual {mutual:.2%}), plain shuffle {plain_related:.2%} "
          f"(mutual {plain_mutual:.2%}), random expectation {expected:.2%}")
    assert related > 10 * expected and related > 10 * max(plain_related, expected / 10)
    assert mutual > 5 * expected


def test_write_given_stores_chosen_neighbours_that_the_stage_serves(shards, tmp_path):
    """Neighbours chosen from captions (here: the next sample with the same size word) are
    written in the built index's format and read back by id; malformed choices are refused,
    each with its reason, and leave a finished index as it was."""
    def same_size(captions: list[str]) -> np.ndarray:
        ids = np.full((len(captions), 1), -1)
        last: dict[str, int] = {}
        for i in reversed(range(len(captions))):
            word = captions[i].split()[1]  # "a SIZE ...": the size word
            ids[i, 0] = last.get(word, -1)
            last[word] = i
        return ids

    out = str(tmp_path / "given")
    write_given(shards_spec(shards), out, same_size, "next sample of the same size")
    manifest = json.loads(Path(out, "index.json").read_text())
    assert manifest["index"] == "next sample of the same size" and manifest["k"] == 1
    index = NeighborIndex(out, shards)
    chosen = np.load(Path(out, "neighbors.npy"))
    assert (chosen >= 0).mean() > 0.99
    for sample_id in (0, 777, NUM_SAMPLES - 10):
        anchor, partner = index.fetch(sample_id), index.fetch(int(chosen[sample_id, 0]))
        assert anchor["txt"].split()[1] == partner["txt"].split()[1]

    def gap_then_id(captions: list[str]) -> np.ndarray:
        ids = np.full((len(captions), 2), -1)
        ids[0, 1] = 1
        return ids

    for name, wrong, reason in (
            ("itself", lambda captions: np.arange(len(captions))[:, None], "row 0 names its own"),
            ("past the end", lambda captions: np.full((len(captions), 1), len(captions)), "range"),
            ("floats", lambda captions: np.zeros((len(captions), 1)), "dtype float64"),
            ("one row short", lambda captions: np.full((len(captions) - 1, 1), -1), "shape"),
            ("no columns", lambda captions: np.zeros((len(captions), 0), int), "shape"),
            ("gap", gap_then_id, "row 0 has an id after a -1")):
        with pytest.raises(ValueError, match=f"integer array of other samples' ids.*{reason}"):
            write_given(shards_spec(shards), str(tmp_path / name.replace(" ", "-")), wrong, name)
    # a failed choice leaves the finished index in place
    with pytest.raises(ValueError, match="names its own"):
        write_given(shards_spec(shards), out, lambda captions: np.arange(len(captions))[:, None],
                    "next sample of the same size")
    assert NeighborIndex(out, shards).k == 1
    with pytest.raises(ValueError, match="was built with other settings"):
        write_given(shards_spec(shards), out, same_size, "another description")


def _rebinding_world(seed: int) -> tuple[list[str], list[int]]:
    """Captions "a C1 S1 REL a C2 S2", each with its rebinding partner (colours or shapes
    exchanged) somewhere in the list, among captions sharing fewer words."""
    rng = random.Random(seed)
    colours, shapes = ["red", "blue", "green", "pink", "gray"], ["cube", "ball", "cone", "ring", "star"]
    relations = ["left of", "right of", "above", "below"]
    seen, captions, partner = set(), [], []
    while len(captions) < 400:
        c1, c2 = rng.sample(colours, 2)
        s1, s2 = rng.sample(shapes, 2)
        relation = rng.choice(relations)
        first = f"a {c1} {s1} {relation} a {c2} {s2}"
        second = (f"a {c2} {s1} {relation} a {c1} {s2}" if rng.random() < 0.5
                  else f"a {c1} {s2} {relation} a {c2} {s1}")
        if first in seen or second in seen:
            continue
        seen.update((first, second))
        captions += [first, second]
        partner += [len(captions) - 1, len(captions) - 2]
    order = rng.sample(range(len(captions)), len(captions))
    where = {old: new for new, old in enumerate(order)}
    return [captions[i] for i in order], [where[partner[i]] for i in order]


def test_rebinding_neighbours_are_the_same_words_bound_differently():
    captions, partner = _rebinding_world(0)
    ids = rebinding_neighbors(captions, k=3)
    assert ids.shape == (len(captions), 3)
    bag = [sorted(caption.split()) for caption in captions]
    # first comes a caption of the same words (the partner, or another rebinding of them) ...
    assert np.mean([bag[ids[i, 0]] == bag[i] for i in range(len(captions))]) > 0.95
    # ... and the partner is among the first three
    assert np.mean([partner[i] in ids[i] for i in range(len(captions))]) > 0.95
    assert (ids[:, 0] >= 0).all() and not (ids == np.arange(len(captions))[:, None]).any()
    # chunking does not change the answer
    assert np.array_equal(rebinding_neighbors(captions, k=3, chunk_cells=len(captions) * 7), ids)


def test_rebinding_neighbours_skip_duplicates_and_unrelated_captions():
    captions = ["a red cube left of a blue ball", "A red cube, left of a blue ball.",
                "a blue cube left of a red ball", "the sky at night", "a red cube left of a blue ball"]
    ids = rebinding_neighbors(captions, k=3)
    # duplicates (same words in the same order, case and punctuation aside) are never neighbours
    for i in (0, 1, 4):
        assert ids[i].tolist() == [2, -1, -1]
    assert ids[2].tolist()[0] in (0, 1, 4) and ids[3].tolist() == [-1, -1, -1]
    assert sorted(ids[2].tolist()) == [0, 1, 4]
    assert (rebinding_neighbors(captions, k=3, min_word_overlap=0.999)[:, 0] >= 0).tolist() == \
        [True, True, True, False, True]  # the same words, all of them
    # 1.0 still finds them (float32 puts an equal bag a hair below 1); 0 never pairs captions
    # without a word in common
    assert np.array_equal(rebinding_neighbors(captions, k=3, min_word_overlap=1.0), ids)
    assert rebinding_neighbors(captions, k=3, min_word_overlap=0.0)[3].tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="k must be >= 1"):
        rebinding_neighbors(captions, k=0)


def test_rebinding_cli_writes_an_index_the_stage_serves(shards, tmp_path, capsys):
    out = str(tmp_path / "rebinding")
    main(["rebinding", "--shards", shards_spec(shards), "--output", out, "--k", "2"])
    manifest = json.loads(Path(out, "index.json").read_text())
    assert manifest["k"] == 2 and manifest["index"].startswith("rebinding neighbours")
    index, chosen = NeighborIndex(out, shards), np.load(Path(out, "neighbors.npy"))
    assert (chosen[:, 0] >= 0).mean() > 0.99
    for sample_id in (0, 777, NUM_SAMPLES - 10):
        anchor, partner = index.fetch(sample_id)["txt"].split(), index.fetch(int(chosen[sample_id, 0]))["txt"].split()
        assert anchor != partner and len(set(anchor) & set(partner)) >= len(set(anchor)) // 2
    with pytest.raises(SystemExit):
        main(["rebinding", "--shards", shards_spec(shards), "--output", out, "--min-word-overlap", "2"])
    assert "--min-word-overlap" in capsys.readouterr().err


def test_rebinding_names_shards_without_captions(tmp_path):
    """Neighbours are chosen by caption: shards without any fail naming the shards."""
    shard = tmp_path / "images-only.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("000", "001"):
            payload = (tmp_path / f"{key}.png")
            payload.write_bytes(b"not read")
            tar.add(payload, arcname=f"{key}.png")
    with pytest.raises(ValueError, match=r"images-only.tar: no sample with both a caption \(.txt\) and an image"):
        write_rebinding(str(shard), str(tmp_path / "index"))
    assert not (tmp_path / "index" / "index.json").exists()


def test_an_undecodable_image_is_named_with_its_shard_and_sample(shards, tmp_path):
    from open_clip_hn.neighbors import scan_shard

    broken = tmp_path / "shard-00000.tar"
    data = bytearray(Path(shards[0]).read_bytes())
    key, members = scan_shard(shards[0])[3]
    offset, size = members["png"]
    data[offset:offset + size] = b"\0" * size  # the PNG's bytes gone, the tar intact
    broken.write_bytes(bytes(data))
    for workers in (0, 1):
        with pytest.raises(ValueError, match=f"shard {broken}: the image of sample {key} cannot be decoded"):
            build(str(broken), "hn-tiny-vit", str(tmp_path / f"index{workers}"), model_config=TINY_CONFIG,
                  k=2, batch_size=64, workers=workers)


def test_recipe_worlds_builds_the_rebinding_index_again_for_new_data(tmp_path):
    """benchmarks/recipe_worlds.py keeps one rebinding index per world; data rendered anew under
    the same paths must not train against the old data's neighbours."""
    module = load_benchmark("recipe_worlds")
    data, index = str(tmp_path / "data"), str(tmp_path / "rebinding")
    spec = shards_spec(write_scene_shards(data, 60, 30, seed=1))
    module.rebinding_index(index, spec)
    first = json.loads(Path(index, "index.json").read_text())
    assert module.rebinding_index(index, spec) == index  # unchanged data: kept as it is
    assert json.loads(Path(index, "index.json").read_text()) == first
    write_scene_shards(data, 60, 30, seed=2)
    module.rebinding_index(index, spec)
    again = json.loads(Path(index, "index.json").read_text())
    assert [s["identity"] for s in again["shards"]] != [s["identity"] for s in first["shards"]]
    Path(index, "index.json").write_text("{")  # an unreadable manifest is built again, not a crash
    module.rebinding_index(index, spec)
    assert json.loads(Path(index, "index.json").read_text())["shards"] == again["shards"]
    NeighborIndex(index, sorted(str(p) for p in Path(data).glob("*.tar")))  # and it serves them


def test_an_index_without_neighbours_is_not_written_or_trained_on(tmp_path, capsys):
    """Captions too unlike for --min-word-overlap leave every row empty: the CLI refuses to write
    such an index (keeping a finished one), reports the share with a neighbour when it writes,
    and training refuses an empty index written by an older version."""
    spec = shards_spec(write_scene_shards(str(tmp_path / "data"), 16, 8, seed=0))
    out = str(tmp_path / "rebinding")
    with pytest.raises(SystemExit) as exit_:
        main(["rebinding", "--shards", spec, "--output", out, "--min-word-overlap", "1.0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "no sample of the 16 got a neighbour" in err and "lower --min-word-overlap" in err
    assert not Path(out, "build.json").exists()  # nothing claimed: the folder stays free for a retry

    main(["rebinding", "--shards", spec, "--output", out, "--k", "2"])  # a retry in the same folder
    manifest = json.loads(Path(out, "index.json").read_text())
    with_neighbors = int((np.load(Path(out, "neighbors.npy"))[:, 0] >= 0).sum())
    assert manifest["with_neighbors"] == with_neighbors > 0
    assert (f"of 16 samples ({with_neighbors / 16:.1%}) have a neighbour"
            in capsys.readouterr().out)
    with pytest.raises(ValueError, match="no sample of the 16 got a neighbour"):
        write_given(spec, out, lambda captions: np.full((len(captions), 2), -1), manifest["index"])
    assert json.loads(Path(out, "index.json").read_text()) == manifest

    # an older version wrote empty indexes: the reader refuses them, naming the flag and folder
    np.save(Path(out, "neighbors.npy"), np.full((16, 2), -1, dtype=np.int32))
    shards = sorted(str(p) for p in Path(tmp_path, "data").glob("*.tar"))
    for read in (lambda: NeighborIndex(out), lambda: neighbor_stage(out, 1, 8, shards)):
        with pytest.raises(ValueError, match=f"--hn-image-neighbors {out}: no sample of the 16 "
                                             "has a neighbour.*lower --min-word-overlap"):
            read()
    NeighborIndex(out, check=False)  # loader workers: the main process checked


def test_check_index_names_absent_and_unfinished_folders(tmp_path):
    """What `--hn-image-neighbors` is checked with before training: a missing folder and one
    without a manifest (an unfinished build) each name the folder and the command to run."""
    from open_clip_hn.neighbors import check_index

    shards = write_scene_shards(str(tmp_path / "data"), 16, 8, seed=0)
    with pytest.raises(ValueError, match=f"--hn-image-neighbors {tmp_path}/absent: no such folder"):
        check_index(str(tmp_path / "absent"), shards)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(ValueError, match=f"--hn-image-neighbors {tmp_path}/unfinished: no index.json "
                                         r"\(the build did not finish\)"):
        check_index(str(tmp_path / "unfinished"), shards)
    out = str(tmp_path / "index")
    write_rebinding(shards_spec(shards), out, k=2)
    with pytest.raises(ValueError, match="was built for other shards"):
        check_index(out, shards[1:])
    check_index(out, shards)
    check_index(out, shards, per_sample=2)
    with pytest.raises(ValueError, match=f"--hn-image-neighbors-per-sample 3: the index {out} holds "
                                         "2 neighbour\\(s\\) per sample; pass at most 2"):
        check_index(out, shards, per_sample=3)


def test_a_damaged_shard_is_refused_by_the_index_builders(tmp_path):
    """A shard cut short reads as a shorter valid tar (tarfile stops without a word): the
    index would silently leave its last samples out."""
    from open_clip_hn.neighbors import scan_shard

    shard = write_scene_shards(str(tmp_path / "data"), 16, 16, seed=0)[0]
    assert len(scan_shard(shard)) == 16
    data = open(shard, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 // 512 * 512])  # at a block boundary
    with pytest.raises(ValueError, match=f"shard {cut} is damaged: .*truncated"):
        scan_shard(str(cut))


def test_an_unreadable_cached_catalog_is_scanned_again(tmp_path):
    """Catalogs are caches of a shard's scan: a damaged one means "scan again", not a JSON
    traceback that names no file."""
    from open_clip_hn.neighbors import _cached_catalog

    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "a.tar.json").write_text('{"identity": ')
    (tmp_path / "catalog" / "b.tar.json").write_text("[1, 2]")
    assert _cached_catalog(str(tmp_path), "catalog", "a.tar", {"size": 1}) is None
    assert _cached_catalog(str(tmp_path), "catalog", "b.tar", {"size": 1}) is None
