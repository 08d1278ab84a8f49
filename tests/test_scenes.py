"""Procedural scenes: deterministic, readable by OpenCLIP's loader, truthful, held apart."""

import io
import json
import os
import random
import tarfile

import pytest
from PIL import Image

from open_clip_hn import scenes


def _read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_are_deterministic_and_sized(tmp_path):
    a = scenes.write_scene_shards(str(tmp_path / "a"), 25, samples_per_shard=10, seed=3)
    b = scenes.write_scene_shards(str(tmp_path / "b"), 25, samples_per_shard=10, seed=3)
    c = scenes.write_scene_shards(str(tmp_path / "c"), 25, samples_per_shard=10, seed=4)
    assert [os.path.basename(p) for p in a] == ["shard-00000.tar", "shard-00001.tar",
                                                "shard-00002.tar"]
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {
        "shard-00000.tar": 10, "shard-00001.tar": 10, "shard-00002.tar": 5}
    assert [_read_tar(p) for p in a] == [_read_tar(p) for p in b]
    assert [_read_tar(p) for p in a] != [_read_tar(p) for p in c]
    members = _read_tar(a[0])
    assert sorted(members)[:2] == ["00000000.png", "00000000.txt"]
    image = Image.open(io.BytesIO(members["00000000.png"]))
    assert image.size == (32, 32) and image.mode == "RGB"
    assert not [n for n in os.listdir(tmp_path / "a") if n.startswith(".tmp")]


def test_openclip_reads_the_shards(tmp_path):
    from open_clip_train.data import get_dataset_size
    paths = scenes.write_scene_shards(str(tmp_path), 12, samples_per_shard=5)
    assert get_dataset_size(scenes.shards_spec(paths)) == (12, 3)


def _centroid(image, rgb):
    pixels = [(x, y) for x in range(image.width) for y in range(image.height)
              if sum(abs(a - b) for a, b in zip(image.getpixel((x, y)), rgb)) < 60]
    assert pixels, f"colour {rgb} not drawn"
    return (sum(p[0] for p in pixels) / len(pixels), sum(p[1] for p in pixels) / len(pixels))


def test_rendered_image_matches_caption_relation():
    checked = 0
    for index in range(60):
        rng = random.Random(index)
        scene = scenes.sample_scene(rng)
        if scene.subject.colour == scene.reference.colour:
            continue
        image = scenes.render(scene, image_size=64, background=0)
        (sx, sy), (rx, ry) = (_centroid(image, scenes.COLOURS[o.colour])
                              for o in (scene.subject, scene.reference))
        expected = {"to the left of": sx < rx, "to the right of": sx > rx,
                    "above": sy < ry, "below": sy > ry}
        assert expected[scene.relation], (scene.caption, (sx, sy), (rx, ry))
        checked += 1
    assert checked > 30


def test_compositional_sets_layout_and_negatives(tmp_path):
    written = scenes.write_compositional_sets(str(tmp_path), num_items=40, num_retrieval=20)
    for kind in scenes.COMPOSITIONAL_TYPES:
        items = json.loads((tmp_path / f"{kind}.json").read_text())
        assert len(items) == 40
        for item in items.values():
            assert (tmp_path / "images" / item["filename"]).is_file()
            true, false = (scenes.parse_caption(item[k]) for k in ("caption", "negative_caption"))
            assert true.composition() != false.composition(), item
            if kind.startswith("swap") :
                assert sorted(item["caption"].split()) == sorted(item["negative_caption"].split())
            if kind == "replace_relation":
                assert false.relation == scenes.OPPOSITE[true.relation]
    for name in scenes.IMAGE_PAIR_SETS:
        lines = [json.loads(line) for line in open(written[name])]
        assert len(lines) == 20
        assert all((tmp_path / "images" / line["image_1"]).is_file() for line in lines)
        assert all(sorted(line["caption_0"].split()) == sorted(line["caption_1"].split())
                   or name == "relation_pairs" for line in lines)
    captions = [open(os.path.join(written["retrieval"], n)).read()
                for n in os.listdir(written["retrieval"]) if n.endswith(".txt")]
    compositions = {scenes.parse_caption(c).composition() for c in captions}
    assert len(captions) == 20 and len(compositions) == 20


def test_test_compositions_never_appear_in_training(tmp_path):
    paths = scenes.write_scene_shards(str(tmp_path / "train"), 300, samples_per_shard=300)
    train = {scenes.parse_caption(v.decode()).composition()
             for k, v in _read_tar(paths[0]).items() if k.endswith(".txt")}
    scenes.write_compositional_sets(str(tmp_path / "test"), num_items=30, num_retrieval=10)
    test = {scenes.parse_caption(item[key]).composition()
            for kind in scenes.COMPOSITIONAL_TYPES
            for item in json.loads((tmp_path / "test" / f"{kind}.json").read_text()).values()
            for key in ("caption",)}
    assert train and test and not train & test
    assert {scenes.split_of(c) for c in train} == {"train"}


def test_a_composition_and_its_mirror_share_a_split():
    """A flipped training image (--hn-mirror) must not show a held-out composition."""
    splits = set()
    for i in range(300):
        scene = scenes.sample_scene(random.Random(i), "train")
        mirrored = scenes.Scene(scene.subject, scenes.OPPOSITE[scene.relation], scene.reference)
        assert scenes.split_of(mirrored.composition()) == "train", scene.caption
        splits.add(scenes.split_of(scenes.describe(scene.subject.identity, "above",
                                                   scene.reference.identity)))
    assert splits == {"train", "val", "test"}  # still a real split


def test_both_wordings_of_relations_in_training():
    captions = [scenes.scene_sample(i, image_size=8)[1] for i in range(200)]
    for relation in scenes.RELATIONS:
        assert any(f" {relation} " in c for c in captions), relation


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        scenes.sample_scene(random.Random(0), "holdout")
    with pytest.raises(ValueError, match="num_samples"):
        scenes.write_scene_shards("/tmp/unused", 0)
    with pytest.raises(ValueError, match="not a scene caption"):
        scenes.parse_caption("a dog on a mat")
