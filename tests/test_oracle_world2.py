"""benchmarks/oracle_world2.py: world2's training shards with the world's own test-style negatives
(benchmarks/RESULTS.md, session 16: the upper bound for text negatives on the ViT)."""

from __future__ import annotations

import json
import random
import re
import tarfile

import pytest

from conftest import load_benchmark
from open_clip_hn import world2
from open_clip_hn.negatives.manifest import check_precomputed_shards
from open_clip_hn.scenes import shards_spec


def test_oracle_shards_carry_the_worlds_own_negatives(tmp_path):
    oracle = load_benchmark("oracle_world2")
    raw = world2.write_shards(str(tmp_path / "raw"), 40, 20, seed=0)
    spec = oracle.write_oracle_shards(shards_spec(raw), str(tmp_path / "oracle"))
    written = sorted(str(p) for p in (tmp_path / "oracle").glob("*.tar"))
    assert spec == shards_spec(written) and len(written) == 2
    check_precomputed_shards(written)  # every sample has its neg.json: training accepts them
    kinds = set()
    for path in written:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read().decode() for m in tar
                       if m.name.endswith((".txt", ".json"))}
        for name, caption in members.items():
            if not name.endswith(".txt"):
                continue
            index = int(name.split(".")[0])
            scene = world2.sample_scene(world2._rng(0, "train", "sample", index), "train")
            negatives = json.loads(members[name.replace(".txt", ".neg.json")])
            assert caption == scene.caption and 2 <= len(negatives) <= 4
            for negative in negatives:
                kinds.add(negative["type"])
                assert negative["text"] != caption
                if negative["type"].startswith("swap"):  # same words, bound differently
                    assert sorted(re.findall(r"[a-z]+", negative["text"])) == sorted(re.findall(r"[a-z]+", caption))
            swap = world2.negative_caption(scene, "swap_objects", random.Random(0))
            assert (swap in [n["text"] for n in negatives]) == (scene.subject.shape != scene.reference.shape)
    assert kinds == {"swap_attributes", "swap_objects", "replace_object"}
    # world2 rendered anew under the same paths: the oracle shards are written again
    before = (tmp_path / "oracle" / "shard-00000.tar").read_bytes()
    world2.write_shards(str(tmp_path / "raw"), 40, 20, seed=0, image_size=32)
    oracle.write_oracle_shards(shards_spec(raw), str(tmp_path / "oracle"))
    assert (tmp_path / "oracle" / "shard-00000.tar").read_bytes() != before
    # shards of another seed are not the scenes the oracle regenerates: refused, not mislabelled
    other = world2.write_shards(str(tmp_path / "other"), 5, 5, seed=1)
    with pytest.raises(RuntimeError, match="is not world2 sample 0 of seed 0"):
        oracle.write_oracle_shards(shards_spec(other), str(tmp_path / "oracle-other"))
