"""Mirrored image pairs (--hn-mirror): captions, flips, packing, the model hook and the loss."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from conftest import TINY_MODEL, load_benchmark, unit
from open_clip_hn import losses as L
from open_clip_hn.config import HNConfig
from open_clip_hn.curriculum import negative_keep_mask
from open_clip_hn.hooks import build_parser, recipe_config
from open_clip_hn.mirror import MirrorPairs, flip_images, mirror_caption, parse_axes
from open_clip_hn.objective import HardNegativeLoss
from open_clip_hn.recipes import expand_recipe
from open_clip_hn.packing import PackedNegativeTokenizer, PackedOutputs, attach_model_hooks, unpack_texts

BOTH = ("horizontal", "vertical")


@pytest.mark.parametrize("caption, axes, expected", [
    ("a red cube to the left of a blue cone", BOTH, ("a red cube to the right of a blue cone", "horizontal")),
    ("Left: a dog. Right: a cat", BOTH, ("Right: a dog. Left: a cat", "horizontal")),
    ("a lamp above a bed", BOTH, ("a lamp below a bed", "vertical")),
    ("a cup on top of a box", BOTH, ("a cup on bottom of a box", "vertical")),
    ("a bird over the water, left of a boat", ("vertical",), ("a bird under the water, left of a boat", "vertical")),
    ("a lamp above a bed", ("horizontal",), None),
    ("a bright red cube", BOTH, None),  # "bright" holds "right" but is not the word
    ("two dogs on a sofa", BOTH, None),
    ("LEFT of the door", BOTH, ("RIGHT of the door", "horizontal")),
])
def test_mirror_caption_exchanges_the_axis_words(caption, axes, expected):
    assert mirror_caption(caption, axes) == expected


def test_mirroring_twice_gives_the_caption_back():
    for caption in ("a cube to the left of a sphere", "the upper shelf is above the lower one"):
        once, axis = mirror_caption(caption, BOTH)
        assert mirror_caption(once, (axis,)) == (caption, axis)


def test_none_turns_a_recipes_mirrors_off():
    assert parse_axes("none") == ()
    assert parse_axes("vertical, horizontal") == ("vertical", "horizontal")
    recipe_and_override = ["--hn-mirror", "horizontal,vertical", "--hn-mirror", "none"]
    assert build_parser().parse_args(recipe_and_override).hn_mirror == ()


def test_unknown_axes_are_refused_naming_the_choices(capsys):
    with pytest.raises(ValueError, match="diagonal.*horizontal, vertical"):
        parse_axes("horizontal,diagonal")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--hn-mirror", "sideways"])
    assert "unknown mirror axis/axes sideways" in capsys.readouterr().err


def test_flip_images_per_row_axis():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    flipped = flip_images(images, torch.tensor([0, 1]))
    assert torch.equal(flipped[0], images[0].flip(-1))
    assert torch.equal(flipped[1], images[1].flip(-2))
    # the composed axes (horizontal+colour 3, vertical+colour 4) flip along their flip's axis
    composed = flip_images(images, torch.tensor([4, 3]))
    assert torch.equal(composed[0], images[0].flip(-2))
    assert torch.equal(composed[1], images[1].flip(-1))
    with pytest.raises(ValueError, match=r"those of a flip \(\[0, 1, 3, 4\]\), got \[0, 2\]"):
        flip_images(images, torch.tensor([0, 2]))


CAPTIONS = ["a red cube to the left of a blue cone", "a cat", "a lamp above a bed"]


@pytest.mark.parametrize("k", [0, 2])
def test_mirrored_caption_is_packed_after_the_negatives(tokenizer, k):
    packer = PackedNegativeTokenizer(tokenizer, k, None, mirror_axes=BOTH)
    unpacked = unpack_texts(packer(CAPTIONS), k, mirror=True)
    assert unpacked.tokens.shape == (3 * (1 + k), 32)
    assert torch.equal(unpacked.tokens[::1 + k], tokenizer(CAPTIONS))
    assert unpacked.mirror_axis.tolist() == [0, -1, 1]
    assert torch.equal(unpacked.mirror_tokens[[0, 2]], tokenizer(
        ["a red cube to the right of a blue cone", "a lamp below a bed"]))
    assert unpacked.neg_mask.shape == (3, k) and not unpacked.neg_mask.any()


def test_model_hook_encodes_flipped_images_with_their_captions(tokenizer):
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL, output_dict=True).eval()
    packer = PackedNegativeTokenizer(tokenizer, 0, None, mirror_axes=BOTH)
    images = torch.randn(3, 3, 32, 32)
    plain = model(images, tokenizer(CAPTIONS))
    attach_model_hooks(model, 0, mirror=True)
    hooked = model(images, packer(CAPTIONS))
    torch.testing.assert_close(hooked["image_features"], plain["image_features"])
    torch.testing.assert_close(hooked["text_features"], plain["text_features"])
    assert hooked["hn_mirror_mask"].tolist() == [True, False, True]
    expected_images = model.encode_image(torch.stack([images[0].flip(-1), images[2].flip(-2)]),
                                         normalize=True)
    expected_texts = model.encode_text(tokenizer(["a red cube to the right of a blue cone",
                                                  "a lamp below a bed"]), normalize=True)
    torch.testing.assert_close(hooked["hn_mirror_image_features"][[0, 2]], expected_images)
    torch.testing.assert_close(hooked["hn_mirror_text_features"][[0, 2]], expected_texts)
    assert not hooked["hn_mirror_image_features"][1].any()


B, D = 5, 8
SCALE = torch.tensor(6.0)


def test_mirror_loss_matches_the_written_out_choices():
    image, text, m_image, m_text = (unit(B, D, seed=s) for s in range(4))
    mask = torch.tensor([True, False, True, True, False])
    got = L.mirror_loss(image, text, m_image, m_text, mask, SCALE)

    def choose(anchor, positive, negative) -> float:
        p, n = float(SCALE * anchor @ positive), float(SCALE * anchor @ negative)
        return -math.log(math.exp(p) / (math.exp(p) + math.exp(n)))

    rows = [i for i in range(B) if mask[i]]
    expected = sum(choose(image[i], text[i], m_text[i]) + choose(m_image[i], m_text[i], text[i])
                   + choose(text[i], image[i], m_image[i]) + choose(m_text[i], m_image[i], image[i])
                   for i in rows) / (4 * B)  # rows without a mirror count as 0
    assert got.item() == pytest.approx(expected, rel=1e-5)


def _choices_won(image, text, m_image, m_text, rows) -> float:
    """The mirror term's four two-way choices won over `rows`, written out."""
    return sum(float(image[i] @ text[i] > image[i] @ m_text[i])
               + float(m_image[i] @ m_text[i] > m_image[i] @ text[i])
               + float(text[i] @ image[i] > text[i] @ m_image[i])
               + float(m_text[i] @ m_image[i] > m_text[i] @ image[i]) for i in rows)


def test_mirror_choice_accuracy_counts_the_four_choices_won():
    image, text, m_image, m_text = (unit(B, D, seed=s) for s in range(4))
    mask = torch.tensor([True, False, True, True, False])
    rows = [i for i in range(B) if mask[i]]
    got = L.mirror_choice_accuracy(image, text, m_image, m_text, mask)
    assert got.item() == pytest.approx(_choices_won(image, text, m_image, m_text, rows) / (4 * len(rows)))
    # identical features (a pair the model cannot tell from its mirror): every choice a tie, none won
    assert L.mirror_choice_accuracy(image, text, image, text, mask).item() == 0.0
    # a model that reads the layout: each mirrored feature is its own, far from the original
    assert L.mirror_choice_accuracy(image, image, -image, -image, mask).item() == 1.0


def test_the_mirror_term_logs_its_accuracy_once_pairs_are_used():
    image, text, m_image, m_text = (unit(B, D, seed=s + 20) for s in range(4))
    config = HNConfig(loss=("itc",), mirror=BOTH, mirror_weight=2.0, curriculum_warmup=1)
    mirrors = dict(hn_mirror_image_features=m_image, hn_mirror_text_features=m_text, output_dict=True)
    loss = HardNegativeLoss(config)
    mask = torch.tensor([True, True, False, True, False])
    warm = loss(image, text, SCALE, hn_mirror_mask=mask, **mirrors)  # step 0: curriculum warmup
    assert "hn_mirror_acc" not in warm
    out = loss(image, text, SCALE, hn_mirror_mask=mask, **mirrors)
    rows = [i for i in range(B) if mask[i]]
    expected = _choices_won(image, text, m_image, m_text, rows) / (4 * len(rows))
    assert out["hn_mirror_acc"].item() == pytest.approx(expected)
    assert out["hn_mirror_acc"] + out["mirror_loss"] is out["mirror_loss"]  # not summed into the loss
    none = loss(image, text, SCALE, hn_mirror_mask=torch.zeros(B, dtype=torch.bool), **mirrors)
    assert none["hn_mirror_acc"].item() == 0.0


def test_mirror_loss_without_mirrors_is_zero_with_finite_gradients():
    image = unit(B, D, seed=0).requires_grad_()
    loss = L.mirror_loss(image, unit(B, D, seed=1), torch.zeros(B, D), torch.zeros(B, D),
                         torch.zeros(B, dtype=torch.bool), SCALE)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(image.grad).all()


def test_itc_treats_each_mirrored_pair_as_one_more_pair():
    """Without text negatives the itc term is OpenCLIP's ClipLoss on the batch plus its mirrors."""
    image, text, m_image, m_text = (unit(B, D, seed=s + 10) for s in range(4))
    mask = torch.tensor([True, True, False, True, False])
    config = HNConfig(loss=("itc",), mirror=BOTH, mirror_weight=0.0)
    out = HardNegativeLoss(config)(image, text, SCALE, hn_mirror_image_features=m_image,
                                   hn_mirror_text_features=m_text, hn_mirror_mask=mask,
                                   output_dict=True)
    expected = ClipLoss()(torch.cat([image, m_image[mask]]), torch.cat([text, m_text[mask]]), SCALE)
    torch.testing.assert_close(out["contrastive_loss"], expected)
    assert "mirror_loss" not in out and out["hn_mirrored"].item() == pytest.approx(0.6)


def test_a_mirrored_image_never_meets_its_caption_as_a_negative():
    """The relation negative of "A left of B" is often "A right of B": the mirrored image's own
    caption. In the mirrored image's row that column is hidden; other rows still see it."""
    k = 2
    image, m_image = unit(B, D, seed=20), unit(B, D, seed=21)
    text = unit(B, 1 + k, D, seed=22)
    m_text = text[:, 1].clone()  # negative 1 of each sample is its mirrored caption
    mask = torch.ones(B, k, dtype=torch.bool)
    config = HNConfig(negatives="online", num_negatives=k, loss=("itc",), mirror=BOTH,
                      mirror_weight=0.0)
    mirror_mask = torch.ones(B, dtype=torch.bool)
    packed = PackedOutputs(mask, mirrors=MirrorPairs(m_image, m_text, mirror_mask))
    got = HardNegativeLoss(config)(image, text.flatten(0, 1), SCALE, packed,
                                   output_dict=True)["contrastive_loss"]
    images, texts = torch.cat([image, m_image]), torch.cat([text[:, 0], m_text])
    negatives = text[:, 1:].flatten(0, 1)
    per_image = SCALE * images @ torch.cat([texts, negatives]).T
    own = torch.zeros_like(per_image, dtype=torch.bool)
    for i in range(B):
        own[B + i, 2 * B + i * k: 2 * B + (i + 1) * k] = True
    per_image = per_image.masked_fill(own, float("-inf"))
    labels = torch.arange(2 * B)
    expected = (F.cross_entropy(per_image, labels) + F.cross_entropy(SCALE * texts @ images.T, labels)) / 2
    torch.testing.assert_close(got, expected)


def test_mirror_term_is_weighted_and_scaled_by_the_curriculum():
    image, text, m_image, m_text = (unit(B, D, seed=s + 30) for s in range(4))
    mask = torch.ones(B, dtype=torch.bool)
    config = HNConfig(loss=("itc",), mirror=("horizontal",), mirror_weight=3.0,
                      curriculum="const", curriculum_start=0.5, curriculum_end=0.5)
    out = HardNegativeLoss(config)(image, text, SCALE, hn_mirror_image_features=m_image,
                                   hn_mirror_text_features=m_text, hn_mirror_mask=mask,
                                   output_dict=True)
    kept = mask & negative_keep_mask((B, 1), 0.5, seed=config.seed + 1, step=0)[:, 0]
    assert 0 < kept.sum() < B
    expected = 3.0 * 0.5 * L.mirror_loss(image, text, m_image, m_text, kept, SCALE)
    torch.testing.assert_close(out["mirror_loss"], expected)


def test_curriculum_share_decides_which_mirrored_pairs_are_used():
    """During the warmup no mirrored pair is used (itc is plain ClipLoss); then the share."""
    image, text, m_image, m_text = (unit(B, D, seed=s + 40) for s in range(4))
    mask = torch.ones(B, dtype=torch.bool)
    config = HNConfig(loss=("itc",), mirror=BOTH, mirror_weight=1.0, curriculum="const",
                      curriculum_warmup=1, curriculum_start=0.5, curriculum_end=0.5)
    loss = HardNegativeLoss(config)
    mirrors = dict(hn_mirror_image_features=m_image, hn_mirror_text_features=m_text,
                   hn_mirror_mask=mask, output_dict=True)
    warm = loss(image, text, SCALE, **mirrors)  # step 0: warmup
    torch.testing.assert_close(warm["contrastive_loss"], ClipLoss()(image, text, SCALE))
    assert warm["hn_mirrored"].item() == 0 and warm["mirror_loss"].item() == 0
    shares = []
    for _ in range(20):
        shares.append(loss(image, text, SCALE, **mirrors)["hn_mirrored"].item())
    assert 0.2 < sum(shares) / len(shares) < 0.8 and len(set(shares)) > 1


class _PoolingTowers(torch.nn.Module):
    """Image: mean colour of the whole image (flip-blind) or of its left half (flip-aware); text:
    sum of its tokens' embeddings (tells 'left' from 'right')."""

    def __init__(self, left_half: bool):
        super().__init__()
        self.left_half = left_half
        self.words = torch.nn.Embedding(49408, 3)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.left_half:
            pixels = pixels[..., : pixels.shape[-1] // 2]
        return pixels.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self.words(tokens) * (tokens != 0).unsqueeze(-1)).sum(dim=1)  # padding left out


def test_mirror_probe_tells_which_tower_is_flip_blind(tmp_path, tokenizer):
    from PIL import Image
    from torchvision.transforms import ToTensor

    probe = load_benchmark("mirror_probe")
    items = []
    for i, (left, right) in enumerate([((255, 0, 0), (0, 0, 255)), ((0, 255, 0), (255, 255, 0))]):
        image = Image.new("RGB", (8, 8), right)
        image.paste(left, (0, 0, 4, 8))
        image.save(tmp_path / f"{i}.png")
        items.append((str(tmp_path / f"{i}.png"), None, "a red cube to the left of a blue sphere"))
    items.append((str(tmp_path / "0.png"), None, "a red cube and a blue sphere"))  # no relation: skipped
    blind = probe.flip_sensitivity(_PoolingTowers(left_half=False), ToTensor(), tokenizer, items)
    assert blind["pairs"] == 2
    assert blind["image_flip_cos"] == pytest.approx(1.0)  # the whole-image mean ignores the flip
    assert blind["caption_mirror_cos"] < 0.999  # 'left' and 'right' embed differently
    # same features for image and flip: of the two image-side choices exactly one is won (the
    # captions differ), the two caption-side choices are ties, and ties are lost
    assert blind["mirror_acc"] == 0.25
    aware = probe.flip_sensitivity(_PoolingTowers(left_half=True), ToTensor(), tokenizer, items)
    assert aware["image_flip_cos"] < 0.9
    with pytest.raises(ValueError, match="names a left/right or above/below relation"):
        probe.flip_sensitivity(_PoolingTowers(False), ToTensor(), tokenizer, items[2:])


# ---------------------------------------------------------------------------- converse captions


@pytest.fixture(scope="module")
def parser():
    from open_clip_hn.negatives import NegativeGenerator

    return NegativeGenerator()


@pytest.mark.parametrize("caption, expected", [
    ("a red cube to the left of a blue cone", "a blue cone to the left of a red cube"),
    ("there is a tiny black ring under a big orange cross, beside two pink hexagons",
     "there is a big orange cross under a tiny black ring, beside two pink hexagons"),
    ("Two dogs are to the left of a red car.", "A red car is to the left of two dogs."),  # agreement
    ("a cube is on the right of a sphere", "a sphere is on the right of a cube"),
    # ambiguous: the relation's subject is not the caption's first object
    ("a man sitting on a bench to the right of a tree", None),
    ("a cube to the left of a cone and to the right of a ball", None),  # two relations on the axis
    ("a cube to the left of a cube", None),  # nothing to exchange
    ("a cube and a cone", None),
])
def test_exchange_related_objects(parser, caption, expected):
    from open_clip_hn.mirror import axis_words

    assert parser.exchange_related_objects(caption, axis_words("horizontal") | axis_words("vertical")) == expected


def test_converse_of_the_mirrored_caption_describes_the_same_scene(parser):
    """The caption's converse is the mirrored caption with the objects exchanged (same scene, other
    words); the mirrored caption's converse is the caption with them exchanged."""
    from open_clip_hn.mirror import converse_captions

    assert converse_captions("a lamp above a bed", mirror_caption("a lamp above a bed", BOTH), parser) == (
        "a bed below a lamp", "a bed above a lamp")
    assert converse_captions("a cat", None, parser) is None
    ambiguous = "a man sitting on a bench to the right of a tree"
    assert converse_captions(ambiguous, mirror_caption(ambiguous, BOTH), parser) is None


@pytest.mark.parametrize("k", [0, 2])
def test_converse_captions_are_packed_after_the_mirrored_caption(parser, tokenizer, k):
    negatives = {c: [{"text": f"{c} or not {i}", "type": "replace_object"} for i in range(k)] for c in CAPTIONS}

    class Fixed:
        def generate(self, caption, n):
            return negatives.get(caption, [])[:n]

    captions = CAPTIONS + ["a man sitting on a bench to the right of a tree"]  # mirrored, no converse
    packer = PackedNegativeTokenizer(tokenizer, k, Fixed(), mirror_axes=BOTH, converse=parser)
    unpacked = unpack_texts(packer(captions), k, mirror=True, converse=True)
    assert torch.equal(unpacked.tokens[::1 + k], tokenizer(captions))
    assert unpacked.neg_mask[:3].all() if k else unpacked.neg_mask.shape == (4, 0)
    assert unpacked.mirror_axis.tolist() == [0, -1, 1, 0]
    assert unpacked.converse_mask.tolist() == [True, False, True, False]
    assert torch.equal(unpacked.converse_tokens[0], tokenizer(
        ["a blue cone to the right of a red cube", "a blue cone to the left of a red cube"]))
    assert torch.equal(unpacked.converse_tokens[2], tokenizer(["a bed below a lamp", "a bed above a lamp"]))
    with pytest.raises(ValueError, match="give mirror_axes"):
        PackedNegativeTokenizer(tokenizer, k, None, converse=parser)


def test_model_hook_encodes_the_converse_captions(parser, tokenizer):
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL, output_dict=True).eval()
    packer = PackedNegativeTokenizer(tokenizer, 0, None, mirror_axes=BOTH, converse=parser)
    images = torch.randn(3, 3, 32, 32)
    plain = model(images, tokenizer(CAPTIONS))
    attach_model_hooks(model, 0, mirror=True, converse=True)
    hooked = model(images, packer(CAPTIONS))
    torch.testing.assert_close(hooked["text_features"], plain["text_features"])
    expected_mirror = model.encode_text(tokenizer(["a red cube to the right of a blue cone",
                                                   "a lamp below a bed"]), normalize=True)
    torch.testing.assert_close(hooked["hn_mirror_text_features"][[0, 2]], expected_mirror)
    expected = model.encode_text(tokenizer(["a blue cone to the right of a red cube",
                                            "a blue cone to the left of a red cube",
                                            "a bed below a lamp", "a bed above a lamp"]), normalize=True)
    torch.testing.assert_close(hooked["hn_mirror_converse_features"][[0, 2]], expected.view(2, 2, -1))
    assert hooked["hn_mirror_converse_mask"].tolist() == [True, False, True]
    assert not hooked["hn_mirror_converse_features"][1].any()
    read = PackedOutputs.read(hooked)
    assert read.mirrors.converse.shape == (3, 2, expected.shape[1])


def test_converse_loss_and_accuracy_match_the_written_out_choices():
    text, m_text = unit(B, D, seed=50), unit(B, D, seed=51)
    converse = unit(B, 2, D, seed=52)
    used = torch.tensor([True, True, False, True, False])

    def pick(anchor, positive, *others) -> tuple[float, bool]:
        logits = [float(SCALE * anchor @ c) for c in (positive, *others)]
        won = all(float(anchor @ positive) > float(anchor @ o) for o in others)
        return -logits[0] + math.log(sum(math.exp(v) for v in logits)), won

    rows = [i for i in range(B) if used[i]]
    picks = [p for i in rows for p in (pick(text[i], converse[i, 0], m_text[i], converse[i, 1]),
                                       pick(m_text[i], converse[i, 1], text[i], converse[i, 0]))]
    got = L.converse_loss(text, m_text, converse, used, SCALE)
    assert got.item() == pytest.approx(sum(p for p, _ in picks) / (2 * B), rel=1e-5)  # unused rows: 0
    assert L.converse_accuracy(text, m_text, converse, used).item() == pytest.approx(
        sum(w for _, w in picks) / len(picks))
    # a bag-of-words text tower: all four captions embed alike, every choice a tie, none won
    same = text[:, None].expand(B, 2, D)
    assert L.converse_accuracy(text, text, same, used).item() == 0.0
    assert L.converse_loss(text, text, same, used, SCALE).item() == pytest.approx(
        math.log(3) * len(rows) / B, rel=1e-5)


def test_converse_hinge_stops_pushing_once_each_choice_is_won_by_the_margin():
    text, m_text = unit(B, D, seed=53), unit(B, D, seed=54)
    converse = unit(B, 2, D, seed=55)
    used = torch.tensor([True, False, True, True, True])
    margin = 0.3

    def hinge(anchor, right, *wrong) -> float:
        return sum(max(0.0, margin - float(anchor @ right - anchor @ w)) for w in wrong) / len(wrong)

    rows = [i for i in range(B) if used[i]]
    expected = sum(hinge(text[i], converse[i, 0], m_text[i], converse[i, 1])
                   + hinge(m_text[i], converse[i, 1], text[i], converse[i, 0]) for i in rows) / (2 * B)
    got = L.converse_loss(text, m_text, converse, used, SCALE, margin=margin)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # a tower that already separates the four by more than the margin gets no gradient
    own = unit(B, D, seed=56)
    separated = torch.stack([own, -own], dim=1).requires_grad_()
    loss = L.converse_loss(own, -own, separated, used, SCALE, margin=margin)
    loss.backward()
    assert loss.item() == 0 and not separated.grad.any()


def test_converse_term_is_off_by_default_weighted_and_not_scaled_by_the_curriculum():
    from open_clip_hn.terms import active_terms

    assert "converse" not in [t.name for t in active_terms(HNConfig(loss=("itc",), mirror=BOTH))]
    text, m_image, m_text, image = (unit(B, D, seed=s + 60) for s in range(4))
    converse = unit(B, 2, D, seed=64)
    mask = torch.ones(B, dtype=torch.bool)
    used = torch.tensor([True, False, True, True, True])
    config = HNConfig(loss=("itc",), mirror=BOTH, converse_weight=3.0, curriculum="const",
                      curriculum_start=0.5, curriculum_end=0.5)
    pairs = MirrorPairs(m_image, m_text, mask, converse, used)
    out = HardNegativeLoss(config)(image, text, SCALE, PackedOutputs(mirrors=pairs), output_dict=True)
    torch.testing.assert_close(out["converse_loss"], 3.0 * L.converse_loss(text, m_text, converse, used, SCALE))
    assert out["hn_converse_acc"].item() == pytest.approx(
        L.converse_accuracy(text, m_text, converse, used).item())
    hinge = HNConfig(loss=("itc",), mirror=BOTH, converse_weight=3.0, converse_margin=0.1)
    out = HardNegativeLoss(hinge)(image, text, SCALE, PackedOutputs(mirrors=pairs), output_dict=True)
    torch.testing.assert_close(out["converse_loss"],
                               3.0 * L.converse_loss(text, m_text, converse, used, SCALE, margin=0.1))


def test_converse_weight_needs_mirrors(capsys):
    with pytest.raises(ValueError, match=r"--hn-converse-weight acts on the converse term \(--hn-mirror AXES\)"):
        HNConfig(loss=("itc",), converse_weight=1.0).validate()
    with pytest.raises(ValueError, match="--hn-converse-margin acts on the converse term"):
        HNConfig(loss=("itc",), mirror=BOTH, converse_margin=0.05).validate()
    args = build_parser().parse_args(["--hn-mirror", "horizontal", "--hn-converse-weight", "2"])
    assert args.hn_converse_weight == 2.0 and build_parser().parse_args([]).hn_converse_weight == 0.0


def test_recommended_without_mirrors_drops_its_converse_term():
    """recommended sets the converse weight and margin: --hn-mirror none switches the converse
    term off with the mirrors (the recipe's settings for it are dropped, as the trainer does);
    typing the zeros as well still works."""
    from open_clip_hn.config import given_hn_flags

    parser = build_parser()

    def config(*extra):
        typed = ["--hn-config", "recommended", *extra]
        argv = expand_recipe(typed, parser)
        args = parser.parse_args(argv)
        args.hn_given, args.hn_typed = given_hn_flags(argv, parser), given_hn_flags(typed, parser)
        return HNConfig.from_args(args, recipe=recipe_config(args, parser))
    assert config().converse_weight > 0 and config().converse_margin > 0
    for extra in ([], ["--hn-converse-weight", "0", "--hn-converse-margin", "0"]):
        off = config("--hn-mirror", "none", *extra)
        assert off.mirror == () and (off.converse_weight, off.converse_margin) == (0, 0)
        assert not off.packs_converse


def test_an_epoch_whose_captions_never_mirror_is_warned_about(tmp_path, scene_csv):
    """Captions without relation words give --hn-mirror nothing to pair: the run used to log
    Mirror_loss 0 and Hn_mirrored 0 for the whole epoch and exit 0 without a word."""
    from conftest import run_module, train_argv

    lines = open(scene_csv).read().splitlines()
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join([lines[0]] + [row.split("\t")[0] + "\ta red cube and a blue sphere"
                                             for row in lines[1:]]) + "\n")
    run_module("open_clip_hn.train", train_argv(str(plain), str(tmp_path / "logs"), "plain",
                                                "--hn-mirror", "horizontal"))
    log = (tmp_path / "logs" / "plain" / "out.log").read_text()
    assert "No caption of epoch 1 had a mirrored pair for --hn-mirror horizontal" in log
    run_module("open_clip_hn.train", train_argv(scene_csv, str(tmp_path / "logs"), "scenes",
                                                "--hn-mirror", "horizontal"))
    assert "had a mirrored pair" not in (tmp_path / "logs" / "scenes" / "out.log").read_text()
