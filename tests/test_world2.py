"""The second procedural world: deterministic, held-apart splits, and the formats eval reads."""

from __future__ import annotations

import hashlib
import json
import random
import tarfile

import pytest

from open_clip_hn import eval as hn_eval
from open_clip_hn import scenes, world2


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shards_and_sets_are_a_pure_function_of_the_seed(tmp_path):
    for name in ("a", "b"):
        world2.write_shards(str(tmp_path / name / "train"), 12, samples_per_shard=5, seed=3)
        world2.write_test_sets(str(tmp_path / name / "test"), 4, seed=4, num_retrieval=6)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    world2.write_shards(str(tmp_path / "c"), 12, samples_per_shard=5, seed=5)
    assert digest(tmp_path / "c") != digest(tmp_path / "a" / "train")


def test_shards_hold_images_and_captions_in_openclip_layout(tmp_path):
    paths = world2.write_shards(str(tmp_path), 7, samples_per_shard=3)
    assert len(paths) == 3
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "shard-00000.tar": 3, "shard-00001.tar": 3, "shard-00002.tar": 1}
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        caption = tar.extractfile("00000000.txt").read().decode()
    assert names == ["00000000.png", "00000000.txt", "00000001.png", "00000001.txt",
                     "00000002.png", "00000002.txt"]
    assert caption == world2.sample(0)[1]


def test_scenes_have_two_to_four_objects_counts_forms_and_no_demo_vocabulary():
    scenes_ = [world2.sample_scene(random.Random(i)) for i in range(300)]
    counts = {2 + len(s.bystanders) for s in scenes_}
    assert counts == {2, 3, 4}
    captions = [s.caption for s in scenes_]
    assert any(", beside two " in c for c in captions) and any(c.startswith("there is ") for c in captions)
    assert any(" is over " in c or " is under " in c or " is on the " in c for c in captions)
    demo_words = set(" ".join([*scenes.SHAPES, *scenes.COLOURS, *scenes.SIZES, *scenes.RELATIONS]).split())
    world_words = set(" ".join(captions).split())
    assert not (demo_words - {"the", "of", "to", "left", "right"}) & world_words


def test_test_compositions_are_never_trained_on_and_negatives_edit_the_pair():
    train = {world2.sample_scene(random.Random(i), "train").composition() for i in range(400)}
    for i in range(60):
        rng = random.Random(1000 + i)
        scene = world2.sample_scene(rng, "test")
        assert world2.split_of(scene.composition()) == "test" and scene.composition() not in train
        for kind in world2.COMPOSITIONAL_TYPES:
            negative = world2.negative_caption(scene, kind, rng)
            if negative is not None:
                assert negative != scene.caption
                words = lambda text: sorted(text.replace(",", "").split())  # noqa: E731
                assert words(negative) == words(scene.caption) or kind.startswith("replace")
    with pytest.raises(ValueError, match="unknown compositional type 'count'"):
        world2.negative_caption(scene, "count", rng)


def test_sets_are_read_by_the_evaluator(tmp_path):
    written = world2.write_test_sets(str(tmp_path), 5, num_retrieval=8)
    choice, pairs = hn_eval.discover_sets(str(tmp_path))
    assert sorted(c.name for c in choice) == sorted(world2.COMPOSITIONAL_TYPES) and not pairs
    assert all(len(c.items) == 5 for c in choice)
    retrieval = hn_eval.load_retrieval_set(written["retrieval"])
    assert len(retrieval.items) == 8 and len({c[0] for _, c in retrieval.items}) == 8


def test_bad_sizes_are_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match="num_samples and samples_per_shard must be >= 1"):
        world2.write_shards(str(tmp_path), 0)
    with pytest.raises(ValueError, match="split must be one of"):
        world2.sample_scene(random.Random(0), "dev")


@pytest.mark.parametrize("cli", [world2.main, scenes.main], ids=["world2", "scenes"])
@pytest.mark.parametrize("flags, message", [
    (["--train-samples", "-5"], "argument --train-samples: must be >= 0"),
    (["--samples-per-shard", "0"], "argument --samples-per-shard: must be >= 1"),
    (["--test-items", "-3"], "argument --test-items: must be >= 0"),
    (["--image-size", "0"], "argument --image-size: must be >= 1"),
    (["--image-size", "8"], "--image-size 8: scenes are drawn at 16 pixels or more"),
])
def test_the_renderers_command_lines_refuse_bad_values_before_work(tmp_path, capsys, cli, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        cli(["--output-dir", str(out), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit):
        cli(["--output-dir", str(tmp_path / "a-file")])
    assert "is a file; pass a folder" in capsys.readouterr().err
