"""benchmarks/swap_fit.py's split of swap negatives and swap test items (benchmarks/RESULTS.md),
and the LABEL=CHECKPOINT arguments of the diagnostic scripts."""

from __future__ import annotations

import argparse
import random

import pytest
import torch

from conftest import load_benchmark
from open_clip_hn import eval as hn_eval
from open_clip_hn import scenes, world2
from open_clip_hn.negatives import NegativeGenerator
from open_clip_hn.negatives.generator import noun_phrases
from open_clip_hn.negatives.lexicon import load_resources


def test_swaps_split_into_rebind_and_reorder():
    swap_fit = load_benchmark("swap_fit")
    generator = NegativeGenerator(seed=0)
    phrases = noun_phrases(generator.parse("there is a huge cyan star under a huge pink hexagon"))
    assert swap_fit.swap_kind(generator, phrases, "there is a huge pink hexagon under a huge cyan star") \
        == "reorder"
    assert swap_fit.swap_kind(generator, phrases, "there is a huge pink star under a huge cyan hexagon") \
        == "rebind"
    assert swap_fit.swap_kind(generator, phrases, "there is a huge cyan hexagon under a huge pink star") \
        == "rebind"


def test_test_items_split_by_what_they_exchange():
    swap_fit = load_benchmark("swap_fit")
    categories = load_resources().attr_category
    assert swap_fit.test_item_kind("swap_attributes", "a huge black star over a big orange ring",
                                   "a big black star over a huge orange ring", categories) == "size"
    assert swap_fit.test_item_kind("swap_attributes", "a huge black star over a huge red ring",
                                   "a huge red star over a huge black ring", categories) == "other attributes"
    assert swap_fit.test_item_kind("swap_objects", "a red star over a blue ring, beside a cross",
                                   "a red ring over a blue star, beside a cross", categories) == "with bystander"
    assert swap_fit.test_item_kind("swap_objects", "a red star over a blue ring",
                                   "a red ring over a blue star", categories) == "pair only"


def test_negatives_split_by_whether_their_composition_was_trained_on():
    """Both worlds' captions parse back to the scene whose composition names the split."""
    swap_fit = load_benchmark("swap_fit")
    demo_scene = scenes.sample_scene(random.Random(3), "train")
    assert swap_fit.negative_split(demo_scene.caption) == "train"
    for split in ("train", "test"):
        scene = world2.sample_scene(world2._rng(0, split, "sample", 5), split)
        assert world2.parse_caption(scene.caption).composition() == scene.composition()
        assert swap_fit.negative_split(scene.caption) == split
    assert swap_fit.negative_split("a dog on a couch") == "-"
    with pytest.raises(ValueError, match="not a world2 caption"):
        world2.parse_caption("a small red cube above a large blue sphere")


def test_centred_choice_cancels_a_caption_only_prior():
    """Images share a mean direction; each negative lies along it, so every image prefers it
    (a caption-only prior), while off the mean each image is closer to its own caption."""
    swap_fit = load_benchmark("swap_fit")
    mean, own = torch.eye(4)[0], torch.eye(4)[1:3]
    images = torch.stack([mean + own[0], mean - own[0], mean + own[1], mean - own[1]])
    captions = torch.stack([own[0], -own[0], own[1], -own[1]]) * 0.5
    options = torch.stack([captions, mean.expand(4, 4)], dim=1)
    assert not hn_eval.choice_correct(images, options).any()
    centred, prior_gap, mean_image = swap_fit.centred_choice(images, options)
    assert centred.all()
    assert torch.allclose(prior_gap, torch.full((4,), -1.0))
    assert torch.allclose(mean_image, mean)


def test_labelled_checkpoints_need_one_label_each():
    parser = argparse.ArgumentParser()
    hn_eval.add_labelled_checkpoints(parser)
    args = parser.parse_args(["vanilla=a/epoch_3.pt", "recipe=b/epoch_3.pt"])
    assert hn_eval.labelled_checkpoints(parser, args.checkpoints) == {"vanilla": "a/epoch_3.pt",
                                                                      "recipe": "b/epoch_3.pt"}
    for values in (["a/epoch_3.pt"], ["x=a.pt", "x=b.pt"]):
        with pytest.raises(SystemExit):
            hn_eval.labelled_checkpoints(parser, values)
