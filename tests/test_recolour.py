"""Colour-exchanged pairs (--hn-mirror colour): caption rewrite, image exchange, packing, hook."""

from __future__ import annotations

import random
import zlib
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch

from conftest import TINY_MODEL
from open_clip_hn import scenes, world2
from open_clip_hn.hooks import build_parser
from open_clip_hn.mirror import AXIS_TO_ID, mirror_pair
from open_clip_hn.packing import PackedNegativeTokenizer, attach_model_hooks, mirror_images, unpack_texts
from open_clip_hn.recolour import COLOUR_NAMES, COLOUR_TO_ID, PAIR_BASE, exchange_colour_words, exchange_colours

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def code(first: str, second: str) -> int:
    return COLOUR_TO_ID[first] * PAIR_BASE + COLOUR_TO_ID[second]


@pytest.mark.parametrize("caption, expected", [
    ("a red cube to the left of a blue cone", "a blue cube to the left of a red cone"),
    ("Red cube, blue cone, red ball", "Blue cube, red cone, blue ball"),
    ("a pink ring beside two olive stars and a black cross", "an olive ring beside two pink stars and a black cross"),
    ("An orange cat and a red dog", "A red cat and an orange dog"),
    ("a RED car and a green bus", "a GREEN car and a red bus"),
    ("a red cube and a red cone, beside a blue star", "a blue cube and a blue cone, beside a red star"),
])
def test_the_first_two_colours_trade_places_everywhere(caption, expected):
    text, first, second = exchange_colour_words(caption)
    assert text == expected
    assert exchange_colour_words(text)[0] == caption  # exchanging again gives the caption back
    assert first != second


@pytest.mark.parametrize("caption", ["a red cube above a red cone", "a gray cat on a grey mat",
                                     "two dogs on a sofa", "a bright reddish cube",
                                     "a black and white photo of a red bus",
                                     "a navy blue car next to a red one",
                                     "an olive-green cube and a red cone", "a red/white flag"])
def test_captions_without_two_colours_have_no_exchange(caption):
    assert exchange_colour_words(caption) is None


def normalised(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def rgb_of(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def three_squares() -> torch.Tensor:
    """Grey background, a red, a blue and a green square (the green one is a bystander)."""
    rgb = torch.full((3, 24, 24), 0.3)
    for (y, x), colour in zip([(2, 2), (2, 14), (14, 8)], [(0.86, 0.12, 0.12), (0.12, 0.27, 0.9),
                                                            (0.12, 0.63, 0.2)]):
        rgb[:, y:y + 8, x:x + 8] = torch.tensor(colour).view(3, 1, 1)
    return rgb


def test_the_two_named_colours_trade_their_pixels_and_nothing_else_changes():
    rgb = three_squares()
    out, ok = exchange_colours(normalised(rgb)[None], torch.tensor([code("red", "blue")]), MEAN, STD)
    got = rgb_of(out[0])
    assert ok.tolist() == [True]
    torch.testing.assert_close(got[:, 2:10, 2:10], rgb[:, 2:10, 14:22], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, 2:10, 14:22], rgb[:, 2:10, 2:10], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, 14:22, 8:16], rgb[:, 14:22, 8:16], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, 12, :], rgb[:, 12, :], atol=1e-5, rtol=0)  # background


def test_an_image_without_one_of_the_colours_is_refused_and_left_as_it_was():
    image = normalised(three_squares())[None]
    out, ok = exchange_colours(image, torch.tensor([code("red", "yellow")]), MEAN, STD)
    assert ok.tolist() == [False]
    torch.testing.assert_close(out, image)


def test_chunks_of_a_batch_give_the_same_exchange(monkeypatch):
    from open_clip_hn import recolour

    torch.manual_seed(0)
    images = torch.cat([normalised(three_squares())[None], torch.randn(4, 3, 24, 24)])
    pairs = torch.tensor([code("red", "blue")] * 5)
    whole = exchange_colours(images, pairs, MEAN, STD)
    monkeypatch.setattr(recolour, "CHUNK_PIXELS", 2 * 24 * 24)  # two images per chunk
    chunked = exchange_colours(images, pairs, MEAN, STD)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    empty = exchange_colours(images[:0], pairs[:0], MEAN, STD)
    assert empty[0].shape == (0, 3, 24, 24) and empty[1].shape == (0,)


def test_bad_pair_codes_are_refused_naming_them():
    image = normalised(three_squares())[None]
    with pytest.raises(ValueError, match="two different colour ids.*got \\[0\\]"):
        exchange_colours(image, torch.tensor([0]), MEAN, STD)  # red with red
    with pytest.raises(ValueError, match="RGB image batches"):
        exchange_colours(image[:, :1], torch.tensor([code("red", "blue")]), MEAN, STD)


def swapped_scene(scene, first: str, second: str):
    def swap(thing):
        other = {first: second, second: first}.get(thing.colour)
        return thing if other is None else replace(thing, colour=other)
    fields = {"subject": swap(scene.subject), "reference": swap(scene.reference)}
    if hasattr(scene, "bystanders"):
        fields["bystanders"] = tuple(swap(b) for b in scene.bystanders)
    return replace(scene, **fields)


def as_tensor(image) -> torch.Tensor:
    return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255


@pytest.mark.parametrize("world", ["demo", "world2"])
def test_the_exchanged_image_is_the_scene_rendered_with_exchanged_colours(world):
    """On both procedural worlds, recolouring a rendered scene gives (up to its anti-aliased
    edges, most of the remaining error on thin rings and tiny stars) the scene rendered with the
    caption's two colours exchanged, bystanders untouched."""
    rng = random.Random(0)
    done = 0
    for _ in range(200):  # enough scenes for 12 exchanged ones; fails below rather than hangs
        if done == 12:
            break
        scene = (scenes.sample_scene(rng) if world == "demo" else world2.sample_scene(rng))
        exchanged = exchange_colour_words(scene.caption)
        if exchanged is None:
            continue
        text, first, second = exchanged
        render = ((lambda s: scenes.render(s, 64, background=70)) if world == "demo"
                  else (lambda s: world2.render(s, 64, (200, 210, 190))))
        names = COLOUR_NAMES[first], COLOUR_NAMES[second]
        original, target = as_tensor(render(scene)), as_tensor(render(swapped_scene(scene, *names)))
        out, ok = exchange_colours(normalised(original)[None], torch.tensor([first * PAIR_BASE + second]),
                                   MEAN, STD)
        if not ok.item():  # a tiny object under the pixel threshold: the pair is dropped
            continue
        assert swapped_scene(scene, *names).caption == text
        got = rgb_of(out[0])
        error = (got - target).abs().mean()
        assert error < 0.35 * (original - target).abs().mean(), (scene.caption, float(error))
        done += 1
    assert done == 12


def test_mirror_pair_chooses_a_flip_or_an_exchange_per_caption():
    both = ("horizontal", "vertical", "colour")
    captions = [f"a red cube to the left of a blue cone {i}" for i in range(40)]
    kinds = [mirror_pair(c, both)[1] for c in captions]
    assert {"horizontal", "colour"} == set(kinds)  # both kinds are trained
    assert kinds == [mirror_pair(c, both)[1] for c in captions]  # stable per caption
    assert mirror_pair("a red cube and a blue cone", both) == (
        "a blue cube and a red cone", "colour", code("red", "blue"))
    assert mirror_pair("a red cube left of a blue cone", ("horizontal",)) == (
        "a red cube right of a blue cone", "horizontal", -1)
    assert mirror_pair("a cube left of a cone", ("colour",)) is None


def test_colour_is_an_axis_of_the_mirror_flag():
    assert build_parser().parse_args(["--hn-mirror", "horizontal,colour"]).hn_mirror == (
        "horizontal", "colour")


CAPTIONS = ["a red cube and a blue cone", "a red cube to the left of a cat",
            "a red cube and a yellow cone", "a cat"]


def test_packed_rows_carry_the_colour_pair(tokenizer):
    packer = PackedNegativeTokenizer(tokenizer, 1, None, mirror_axes=("horizontal", "colour"))
    unpacked = unpack_texts(packer(CAPTIONS), 1, mirror=True)
    assert unpacked.mirror_axis.tolist() == [2, 0, 2, -1]
    assert unpacked.mirror_colours.tolist() == [code("red", "blue"), -1, code("red", "yellow"), -1]
    assert torch.equal(unpacked.mirror_tokens[[0, 2]], tokenizer(["a blue cube and a red cone",
                                                                  "a yellow cube and a red cone"]))


def test_mirror_images_flips_recolours_and_drops_in_row_order():
    image = normalised(three_squares())
    images = torch.stack([image, image, image, image])
    axis = torch.tensor([2, 0, 2, -1])
    colours = torch.tensor([code("red", "blue"), -1, code("red", "yellow"), -1])
    mirrored, kept = mirror_images(images, axis, colours, MEAN, STD)
    assert kept.tolist() == [2, 0, -1, -1]  # no yellow in the image: that pair is dropped
    expected, _ = exchange_colours(image[None], torch.tensor([code("red", "blue")]), MEAN, STD)
    torch.testing.assert_close(mirrored, torch.stack([expected[0], image.flip(-1)]))


def tiny_model_and_squares(count: int) -> tuple[torch.nn.Module, torch.Tensor, tuple, tuple]:
    """The tests' tiny model and `count` copies of `three_squares` preprocessed as it expects."""
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL, output_dict=True).eval()
    mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    rgb = torch.nn.functional.interpolate(three_squares()[None], size=size)[0]
    image = (rgb - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return model, image[None].repeat(count, 1, 1, 1), mean, std


def test_model_hook_encodes_recoloured_images_with_their_captions(tokenizer):
    model, images, mean, std = tiny_model_and_squares(4)
    packer = PackedNegativeTokenizer(tokenizer, 0, None, mirror_axes=("horizontal", "colour"))
    attach_model_hooks(model, 0, mirror=True)
    hooked = model(images, packer(CAPTIONS))
    assert hooked["hn_mirror_mask"].tolist() == [True, True, False, False]
    recoloured, _ = exchange_colours(images[:1], torch.tensor([code("red", "blue")]), mean, std)
    expected_images = model.encode_image(torch.cat([recoloured, images[1:2].flip(-1)]), normalize=True)
    expected_texts = model.encode_text(tokenizer(["a blue cube and a red cone",
                                                  "a red cube to the right of a cat"]), normalize=True)
    torch.testing.assert_close(hooked["hn_mirror_image_features"][:2], expected_images)
    torch.testing.assert_close(hooked["hn_mirror_text_features"][:2], expected_texts)
    assert not hooked["hn_mirror_image_features"][2:].any()


def test_converse_captions_stay_with_the_flipped_pairs_beside_colour_pairs(tokenizer):
    """Flips and colour exchanges in one batch with the converse term: each row's converse
    features are its own converse captions (for a colour pair, those of the caption and of the
    colour-exchanged caption); a row without a spatial relation, or whose pair was dropped, has
    none (masked)."""
    from open_clip_hn.negatives import NegativeGenerator

    axes = ("horizontal", "vertical", "colour")
    candidates = [f"a red cube to the left of a blue {shape}" for shape in
                  ("cone", "ball", "box", "cup", "ring", "star", "disk", "vase", "bowl", "lamp")]
    kinds = {c: mirror_pair(c, axes)[1] for c in candidates}
    flip = [c for c in candidates if kinds[c] == "horizontal"][:2]
    colour = [c for c in candidates if kinds[c] == "colour"][:2]
    assert len(flip) == 2 and len(colour) == 2
    dropped = next(c for c in (f"a red cube to the left of a yellow {shape}" for shape in
                                ("cone", "ball", "box", "cup", "ring", "star", "disk", "vase"))
                   if mirror_pair(c, axes)[1] == "colour")  # no yellow in the image
    captions = [colour[0], flip[0], colour[1], flip[1], "a red cube and a blue cone", dropped]
    model, images, mean, std = tiny_model_and_squares(6)
    packer = PackedNegativeTokenizer(tokenizer, 0, None, mirror_axes=axes, converse=NegativeGenerator())
    attach_model_hooks(model, 0, mirror=True, converse=True)
    hooked = model(images, packer(captions))
    assert hooked["hn_mirror_mask"].tolist() == [True] * 5 + [False]
    # the dropped pair's converse captions go with it (the term would meet a zero mirrored caption)
    assert hooked["hn_mirror_converse_mask"].tolist() == [True, True, True, True, False, False]
    for row in range(4):
        noun = captions[row].split()[-1]
        same_scene = f"a blue {noun} to the right of a red cube"
        other = (f"a blue {noun} to the left of a red cube" if row in (1, 3)  # the flipped scene
                 else f"a red {noun} to the right of a blue cube")  # the colour-exchanged scene
        expected = model.encode_text(tokenizer([same_scene, other]), normalize=True)
        torch.testing.assert_close(hooked["hn_mirror_converse_features"][row], expected)
    assert not hooked["hn_mirror_converse_features"][4:].any()
    recoloured, _ = exchange_colours(images[:1], torch.tensor([code("red", "blue")]), mean, std)
    torch.testing.assert_close(hooked["hn_mirror_image_features"][[0, 2, 4]],
                               model.encode_image(recoloured, normalize=True).expand(3, -1))
    torch.testing.assert_close(hooked["hn_mirror_image_features"][[1, 3]],
                               model.encode_image(images[:1].flip(-1), normalize=True).expand(2, -1))


def test_constant_tensors_are_made_once_per_device_and_serve_training_after_inference():
    """The exchange's constants (prototypes, colour-space matrix, normalisation) are cached per
    device (no host-to-device copies every step); one first made under inference mode must still
    work where autograd records."""
    from open_clip_hn import recolour

    recolour._constant.cache_clear()
    recolour._prototype_lab.cache_clear()
    images = torch.rand(2, 3, 8, 8)
    pairs = torch.tensor([0 * recolour.PAIR_BASE + 1, 2 * recolour.PAIR_BASE + 3])
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    with torch.inference_mode():
        first = recolour.exchange_colours(images, pairs, mean, std)
    made = recolour._constant.cache_info().currsize
    assert made >= 4 and recolour._prototype_lab.cache_info().currsize == 1
    leaf = images.clone().requires_grad_()
    second = recolour.exchange_colours(leaf, pairs, mean, std)
    assert recolour._constant.cache_info().currsize == made  # nothing new for the same device
    assert torch.equal(first[0], second[0].detach()) and torch.equal(first[1], second[1])
    (recolour.lab(leaf.permute(0, 2, 3, 1)).sum()).backward()  # cached constants in a graph
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_cached_prototypes_are_fp32_when_first_made_under_autocast():
    """The Lab prototypes are cached at their first call: made inside a bf16 autocast region they
    would serve every later fp32 call with rounded values."""
    from open_clip_hn import recolour

    recolour._constant.cache_clear()
    recolour._prototype_lab.cache_clear()
    reference = recolour._prototype_lab(torch.device("cpu")).clone()
    recolour._prototype_lab.cache_clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = recolour._prototype_lab(torch.device("cpu"))
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=0, atol=0)


# composed axes (horizontal+colour, vertical+colour): a flip, then the colour exchange

COMPOSED = ("horizontal+colour", "vertical+colour")


@pytest.fixture(scope="module")
def parser():
    from open_clip_hn.negatives import NegativeGenerator

    return NegativeGenerator()


@pytest.mark.parametrize("caption, expected, composed_form", [
    ("a red cube to the left of a blue cone",
     ("a red cone to the left of a blue cube", "horizontal+colour", code("red", "blue")),
     "a blue cube to the right of a red cone"),
    ("a small purple cylinder below a large blue cone",
     ("a large purple cone below a small blue cylinder", "vertical+colour", code("purple", "blue")),
     "a small blue cylinder above a large purple cone"),
])
def test_a_composed_pair_keeps_each_colour_in_place_and_trades_the_objects(caption, expected,
                                                                           composed_form, parser):
    """The composed image (flipped, then its two colours exchanged) is described as a
    swap-objects negative reads: the objects (shape and size) traded, each colour in place. Said
    the other way round that is the flipped caption with its colours exchanged, which the
    converse term also packs."""
    from open_clip_hn.mirror import converse_captions

    assert mirror_pair(caption, COMPOSED, parser) == expected
    assert converse_captions(caption, expected[:2], parser)[1] == composed_form


@pytest.mark.parametrize("caption", [
    "a red cube and a blue cone",                      # no relation to flip along
    "a cube to the left of a cone",                    # no colours to exchange
    "a tiny pink cross over a tiny brown cross",       # alike but for colour: the scene itself
    "a red car to the left of a blue car, beside two green cars",
    "a red cube to the left of the blue cube",         # alike but for colour and article
    "red cube left of blue cube",
    "a red cube to the left of another blue cube",
    "a red cube to the left of a blue cone and a green ball to the left of a cup",  # ambiguous
    "a red cube to the left of a blue cone, in the left corner",  # a second axis word
    "a red cube to the left of a blue cone, above a green ball",
    "a cube to the left of a cone, near a red ball and a blue ball",  # bystanders' colours
    "a tiny orange diamond under a huge orange hexagon, beside two black rings",
])
def test_captions_without_a_composed_pair(caption, parser):
    assert mirror_pair(caption, COMPOSED, parser) is None


def test_composed_axes_need_a_parser(tokenizer):
    with pytest.raises(ValueError, match="need a caption parser"):
        mirror_pair("a red cube to the left of a blue cone", ("horizontal", "vertical+colour"))
    with pytest.raises(ValueError, match="need a caption parser: give parser"):
        PackedNegativeTokenizer(tokenizer, 0, None, mirror_axes=COMPOSED)


def test_composed_axes_share_captions_with_flips_by_the_caption_hash(parser):
    axes = ("horizontal", "vertical", *COMPOSED)
    captions = [f"a red cube to the left of a blue cone {i}" for i in range(40)]
    kinds = [mirror_pair(c, axes, parser)[1] for c in captions]
    assert {"horizontal", "horizontal+colour"} == set(kinds)
    assert kinds == [mirror_pair(c, axes, parser)[1] for c in captions]
    # without a composed axis listed, the choice between a flip and an exchange is as before
    old = ("horizontal", "colour")
    assert [mirror_pair(c, old)[1] for c in captions] == [
        "colour" if zlib.crc32(c.encode()) % 2 else "horizontal" for c in captions]
    assert build_parser().parse_args(["--hn-mirror", "vertical,horizontal+colour"]).hn_mirror == (
        "vertical", "horizontal+colour")


def test_mirror_images_flips_then_exchanges_on_composed_rows():
    """Composed rows are the colour exchange of the flipped image: on the squares, red and blue
    stay where they were while the green bystander is flipped; a row whose image lacks a colour
    is dropped, in row order with the others."""
    image = normalised(three_squares())
    images = torch.stack([image] * 5)
    axis = torch.tensor([3, 0, 4, 3, -1])  # horizontal+colour, flip, vertical+colour, dropped
    colours = torch.tensor([code("red", "blue"), -1, code("red", "blue"), code("red", "yellow"), -1])
    mirrored, kept = mirror_images(images, axis, colours, MEAN, STD)
    assert kept.tolist() == [3, 0, 4, -1, -1]
    exchanged, _ = exchange_colours(torch.stack([image.flip(-1), image.flip(-2)]),
                                    torch.tensor([code("red", "blue")] * 2), MEAN, STD)
    torch.testing.assert_close(mirrored, torch.stack([exchanged[0], image.flip(-1), exchanged[1]]))
    got, rgb = rgb_of(mirrored[0]), three_squares()
    torch.testing.assert_close(got[:, 2:10, 2:10], rgb[:, 2:10, 2:10], atol=1e-5, rtol=0)  # red stays
    torch.testing.assert_close(got[:, 2:10, 14:22], rgb[:, 2:10, 14:22], atol=1e-5, rtol=0)  # blue
    torch.testing.assert_close(got[:, 14:22, 8:16], rgb.flip(-1)[:, 14:22, 8:16], atol=1e-5, rtol=0)


def test_model_hook_encodes_composed_pairs_with_their_captions_and_converse(tokenizer, parser):
    model, images, mean, std = tiny_model_and_squares(2)
    captions = ["a red cube to the left of a blue cone", "a cube to the left of a cone"]
    packer = PackedNegativeTokenizer(tokenizer, 0, None, mirror_axes=COMPOSED, converse=parser)
    attach_model_hooks(model, 0, mirror=True, converse=True)
    hooked = model(images, packer(captions))
    assert hooked["hn_mirror_mask"].tolist() == [True, False]
    assert hooked["hn_mirror_converse_mask"].tolist() == [True, False]
    composed, _ = exchange_colours(images[:1].flip(-1), torch.tensor([code("red", "blue")]), mean, std)
    torch.testing.assert_close(hooked["hn_mirror_image_features"][0],
                               model.encode_image(composed, normalize=True)[0])
    texts = model.encode_text(tokenizer(["a red cone to the left of a blue cube",
                                         "a blue cone to the right of a red cube",
                                         "a blue cube to the right of a red cone"]), normalize=True)
    torch.testing.assert_close(hooked["hn_mirror_text_features"][0], texts[0])
    torch.testing.assert_close(hooked["hn_mirror_converse_features"][0], texts[1:])


def test_the_run_gives_composed_axes_a_parser_without_negatives_or_converse(tokenizer):
    """--hn-mirror vertical+colour alone: the loader's packer gets a parser of its own (no text
    negatives, no converse term), and packs no converse captions."""
    import argparse

    from open_clip_hn.config import HNConfig
    from open_clip_hn.hooks import train_tokenizer
    from open_clip_hn.run import HardNegativeRun

    args = argparse.Namespace(train_data=None, dataset_type="webdataset")
    packer = train_tokenizer(HardNegativeRun(HNConfig(mirror=("vertical+colour",))), tokenizer, args)
    assert packer.parser is not None and packer.converse is None and packer.generator is None
    unpacked = unpack_texts(packer(["a small purple cylinder below a large blue cone"]), 0, mirror=True)
    assert unpacked.mirror_axis.tolist() == [4] and unpacked.converse_tokens is None
    assert torch.equal(unpacked.mirror_tokens, tokenizer(["a large purple cone below a small blue cylinder"]))


def test_composed_pairs_describe_the_flipped_recoloured_world2_scene(parser):
    """On world2 (bystanders, three sentence forms), every composed caption means the scene
    flipped and recoloured, relation reversed; for left/right scenes (whose shapes a horizontal
    flip leaves upright) the composed image is, up to anti-aliased edges, that scene rendered."""
    rng = random.Random(0)
    axes, checked, rendered = ("horizontal+colour", "vertical+colour"), 0, 0
    for _ in range(400):
        scene = world2.sample_scene(rng)
        pair = mirror_pair(scene.caption, axes, parser)
        if pair is None:
            continue
        text, axis, colours = pair
        names = COLOUR_NAMES[colours // PAIR_BASE], COLOUR_NAMES[colours % PAIR_BASE]
        horizontal = axis == "horizontal+colour"

        def moved(thing):
            thing = replace(thing, x=1 - thing.x) if horizontal else replace(thing, y=1 - thing.y)
            other = {names[0]: names[1], names[1]: names[0]}.get(thing.colour)
            return thing if other is None else replace(thing, colour=other)

        truth = replace(scene, subject=moved(scene.subject), reference=moved(scene.reference),
                        relation=world2.OPPOSITE[scene.relation],
                        bystanders=tuple(moved(b) for b in scene.bystanders))
        assert world2.parse_caption(text).composition() == truth.composition(), (scene.caption, text)
        assert {scene.subject.colour, scene.reference.colour} == set(names)  # colours stay in place
        checked += 1
        if horizontal and rendered < 8:
            original, target = (as_tensor(world2.render(s, 64, (200, 210, 190))) for s in (scene, truth))
            out, kept = mirror_images(normalised(original)[None], torch.tensor([AXIS_TO_ID[axis]]),
                                    torch.tensor([colours]), MEAN, STD)
            if kept.tolist() == [-1]:  # a colour under the pixel threshold: dropped
                continue
            error = (rgb_of(out[0]) - target).abs().mean()
            assert error < 0.35 * (original - target).abs().mean(), (scene.caption, float(error))
            rendered += 1
    assert checked >= 100 and rendered == 8
