"""Each loss term against a slow reference written from its paper's formula, plus numerics."""

from __future__ import annotations

import math

import pytest
import torch
from open_clip.loss import ClipLoss

from conftest import unit
from open_clip_hn import losses as L
from open_clip_hn.config import HNConfig
from open_clip_hn.objective import HardNegativeLoss, LoggedValue
from open_clip_hn.packing import PackedOutputs

B, K, D = 6, 3, 8
SCALE = torch.tensor(7.0)


def batch(seed: int = 0, masked_share: float = 0.3):
    image, text = unit(B, D, seed=seed), unit(B, 1 + K, D, seed=seed + 1)
    mask = torch.rand(B, K, generator=torch.Generator().manual_seed(seed + 2)) > masked_share
    mask[0] = False  # one caption without any negative
    types = torch.randint(0, 9, (B, K), generator=torch.Generator().manual_seed(seed + 3)).masked_fill(~mask, -1)
    return image, text.flatten(0, 1), mask, types


def dot(a, b) -> float:
    return float((a * b).sum())


def nll(positive: float, negatives: list[float]) -> float:
    """-log e^p / (e^p + sum e^n), written out."""
    return -math.log(math.exp(positive) / (math.exp(positive) + sum(math.exp(n) for n in negatives)))


def config(**kw) -> HNConfig:
    base = dict(negatives="online", num_negatives=K)
    return HNConfig(**{**base, **kw})


# ------------------------------------------------------------------ references (loops)


def ref_itc(image, text, mask, s):
    pos, neg = text.view(B, 1 + K, D)[:, 0], text.view(B, 1 + K, D)[:, 1:]
    i2t = t2i = 0.0
    for i in range(B):
        others = [s * dot(image[i], pos[j]) for j in range(B) if j != i]
        hard = [s * dot(image[i], neg[j, k]) for j in range(B) for k in range(K) if mask[j, k]]
        i2t += nll(s * dot(image[i], pos[i]), others + hard)
        t2i += nll(s * dot(pos[i], image[i]), [s * dot(pos[i], image[j]) for j in range(B) if j != i])
    return (i2t + t2i) / (2 * B)


def ref_hcl_row(positive, negatives, beta, tau_plus, s):
    """HCL (Robinson et al. 2021) eq. with importance weights over the M negatives."""
    m = len(negatives)
    if m == 0:
        return 0.0
    imp = [math.exp(beta * n) for n in negatives]
    reweighted = m * sum(w * math.exp(n) for w, n in zip(imp, negatives)) / sum(imp)
    ng = (-tau_plus * m * math.exp(positive) + reweighted) / (1 - tau_plus)
    ng = max(ng, m * math.exp(-s))
    return -math.log(math.exp(positive) / (math.exp(positive) + ng))


def ref_importance(image, text, mask, s, beta, tau_plus):
    pos, neg = text.view(B, 1 + K, D)[:, 0], text.view(B, 1 + K, D)[:, 1:]
    total = 0.0
    for i in range(B):
        others = [s * dot(image[i], pos[j]) for j in range(B) if j != i]
        hard = [s * dot(image[i], neg[j, k]) for j in range(B) for k in range(K) if mask[j, k]]
        total += ref_hcl_row(s * dot(image[i], pos[i]), others + hard, beta, tau_plus, s)
        total += ref_hcl_row(s * dot(pos[i], image[i]),
                             [s * dot(pos[i], image[j]) for j in range(B) if j != i], beta, tau_plus, s)
    return total / (2 * B)


def ref_choice(image, text, mask, s):
    pos, neg = text.view(B, 1 + K, D)[:, 0], text.view(B, 1 + K, D)[:, 1:]
    return sum(nll(s * dot(image[i], pos[i]), [s * dot(image[i], neg[i, k]) for k in range(K) if mask[i, k]])
               for i in range(B)) / B


def ref_intra(image, text, mask, s):
    """CE-CLIP's IMC: the caption against its image and every valid negative of the batch."""
    pos, neg = text.view(B, 1 + K, D)[:, 0], text.view(B, 1 + K, D)[:, 1:]
    every = [(j, k) for j in range(B) for k in range(K) if mask[j, k]]
    return sum(nll(s * dot(pos[i], image[i]), [s * dot(pos[i], neg[j, k]) for j, k in every])
               for i in range(B)) / B


def ref_rank(image, text, mask, types, thresholds, s):
    """CE-CLIP's CMR in logits: relu(thr + s cos(I, T_k) - s cos(I, T))."""
    pos, neg = text.view(B, 1 + K, D)[:, 0], text.view(B, 1 + K, D)[:, 1:]
    total = 0.0
    for i in range(B):
        hinges = [max(0.0, float(thresholds[types[i, k]]) + s * dot(image[i], neg[i, k])
                      - s * dot(image[i], pos[i])) for k in range(K) if mask[i, k]]
        total += sum(hinges) / len(hinges) if hinges else 0.0
    return total / B


# ------------------------------------------------------------------ terms vs references


def test_itc_matches_negclip_reference():
    image, text, mask, types = batch()
    out = HardNegativeLoss(config(loss=("itc",)))(image, text, SCALE, PackedOutputs(mask, types), output_dict=True)
    assert out["contrastive_loss"].item() == pytest.approx(ref_itc(image, text, mask, 7.0), rel=1e-5)


@pytest.mark.parametrize("beta,tau_plus", [(0.5, 0.0), (1.0, 0.1), (0.3, 0.5)])
def test_importance_matches_hcl_reference(beta, tau_plus):
    image, text, mask, types = batch(seed=4)
    out = HardNegativeLoss(config(loss=("importance",), importance_beta=beta, importance_tau_plus=tau_plus))(
        image, text, SCALE, PackedOutputs(mask, types), output_dict=True)
    assert out["contrastive_loss"].item() == pytest.approx(
        ref_importance(image, text, mask, 7.0, beta, tau_plus), rel=1e-5)


def test_importance_without_weighting_is_itc():
    image, text, mask, types = batch(seed=5)
    plain = HardNegativeLoss(config(loss=("itc",)))(image, text, SCALE, PackedOutputs(mask, types), output_dict=True)
    flat = HardNegativeLoss(config(loss=("importance",), importance_beta=0.0, importance_tau_plus=0.0))(
        image, text, SCALE, PackedOutputs(mask, types), output_dict=True)
    torch.testing.assert_close(plain["contrastive_loss"], flat["contrastive_loss"])


def test_choice_intra_rank_match_references():
    image, text, mask, types = batch(seed=6)
    loss = HardNegativeLoss(config(loss=("choice", "intra", "rank"), choice_weight=0.5, intra_weight=2.0,
                                   rank_weight=3.0, rank_threshold="2.0"))
    out = loss(image, text, SCALE, PackedOutputs(mask, types), output_dict=True)
    assert out["choice_loss"].item() == pytest.approx(0.5 * ref_choice(image, text, mask, 7.0), rel=1e-5)
    assert out["intra_loss"].item() == pytest.approx(2.0 * ref_intra(image, text, mask, 7.0), rel=1e-5)
    assert out["rank_loss"].item() == pytest.approx(
        3.0 * ref_rank(image, text, mask, types, [2.0] * 9, 7.0), rel=1e-5)


def test_mined_loss_matches_reference():
    image, text = unit(B, D, seed=7), unit(B, D, seed=8)
    mined_t, mined_i = unit(B, 2, D, seed=9), unit(B, 2, D, seed=10)
    valid_t = torch.tensor([[True, False]] * B)
    valid_i = torch.tensor([[True, True]] * B)
    labels = torch.arange(B)
    got = L.mined_loss(image, text, image, text, labels, mined_t, valid_t, mined_i, valid_i, SCALE)
    s, expected = 7.0, 0.0
    for i in range(B):
        expected += nll(s * dot(image[i], text[i]), [s * dot(image[i], text[j]) for j in range(B) if j != i]
                        + [s * dot(image[i], mined_t[i, 0])])
        expected += nll(s * dot(text[i], image[i]), [s * dot(text[i], image[j]) for j in range(B) if j != i]
                        + [s * dot(text[i], mined_i[i, m]) for m in range(2)])
    assert got.item() == pytest.approx(expected / (2 * B), rel=1e-5)


def test_itc_without_negatives_equals_openclip_clip_loss_exactly():
    image, text = unit(B, D, seed=11), unit(B, D, seed=12)
    expected = ClipLoss()(image, text, SCALE)
    out = HardNegativeLoss(HNConfig(loss=("itc",)))(image, text, SCALE, output_dict=True)
    assert torch.equal(out["contrastive_loss"], expected)
    bias = torch.tensor(-2.0)
    assert torch.equal(HardNegativeLoss(HNConfig(loss=("itc",)))(image, text, SCALE, logit_bias=bias),
                       ClipLoss()(image, text, SCALE, logit_bias=bias))


def test_masked_caption_changes_nothing_but_its_own_slots():
    image, text, mask, types = batch(seed=13)
    loss = HardNegativeLoss(config(loss=("itc", "choice", "intra", "rank", "importance")))
    text = text.clone().requires_grad_()
    total = loss(image, text, SCALE, PackedOutputs(mask, types))
    total.backward()
    grad = text.grad.view(B, 1 + K, D)[:, 1:]
    assert torch.all(grad[~mask] == 0) and torch.all(grad[mask].abs().sum(-1) > 0)
    scrambled = text.detach().clone().view(B, 1 + K, D)
    scrambled[:, 1:][~mask] = unit(int((~mask).sum()), D, seed=99)
    again = HardNegativeLoss(config(loss=("itc", "choice", "intra", "rank", "importance")))
    assert again(image, scrambled.flatten(0, 1), SCALE, PackedOutputs(mask, types)).item() == pytest.approx(total.item(), abs=1e-6)


def test_logged_values_do_not_add_to_the_loss():
    t = torch.tensor(2.0, requires_grad=True)
    value = LoggedValue(torch.tensor(5.0))
    assert value.item() == 5.0 and float(value) == 5.0
    assert sum([t, value, 3 * t]).item() == 8.0
    assert sum([value, t]).item() == 2.0


# ------------------------------------------------------------------ numerics


def all_terms(**kw) -> HNConfig:
    return config(loss=("itc", "choice", "intra", "rank", "importance", "mined"), memory_bank_size=16,
                  mined_k=4, importance_tau_plus=0.2, **kw)


def assert_finite(out, *tensors):
    for name, value in out.items():
        assert math.isfinite(value.item()), name
    for t in tensors:
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("case", ["empty_bank", "fully_masked", "identical", "bf16"])
def test_no_nan_or_inf(case):
    image, text, mask, types = batch(seed=14)
    if case == "fully_masked":
        mask, types = torch.zeros_like(mask), torch.full_like(types, -1)
    if case == "identical":
        image, text = unit(1, D).expand(B, D).clone(), unit(1, D).expand(B * (1 + K), D).clone()
    loss = HardNegativeLoss(all_terms())
    for _ in range(2):  # the second step mines the bank filled by the first
        i, t, s = image.clone().requires_grad_(), text.clone().requires_grad_(), SCALE.clone().requires_grad_()
        if case == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = loss(i.bfloat16(), t.bfloat16(), s, PackedOutputs(mask, types), output_dict=True)
        else:
            out = loss(i, t, s, PackedOutputs(mask, types), output_dict=True)
        sum(out.values()).backward()
        assert_finite(out, i, t, s)


def test_warmup_gives_finite_gradients_to_the_logit_scale():
    """Warmup masks every negative (-inf logits): the learnable scale must still get a finite grad."""
    image, text, mask, types = batch(seed=17)
    loss = HardNegativeLoss(all_terms(curriculum="linear", curriculum_warmup=5))
    i, t, s = image.clone().requires_grad_(), text.clone().requires_grad_(), SCALE.clone().requires_grad_()
    out = loss(i, t, s, PackedOutputs(mask, types), output_dict=True)
    assert out["hn_curriculum"].item() == 0
    sum(out.values()).backward()
    assert_finite(out, i, t, s)


def test_no_nan_without_negatives():
    image, text = unit(B, D, seed=15), unit(B, D, seed=16)
    cfg = HNConfig(loss=("itc", "importance", "mined"), memory_bank_size=8, mined_k=2, importance_tau_plus=0.5)
    loss = HardNegativeLoss(cfg)
    for _ in range(2):
        i, t, s = image.clone().requires_grad_(), text.clone().requires_grad_(), SCALE.clone().requires_grad_()
        out = loss(i, t, s, output_dict=True)
        sum(out.values()).backward()
        assert_finite(out, i, t, s)


def test_bad_shapes_are_named():
    image, text, mask, types = batch()
    with pytest.raises(ValueError, match="hn_neg_mask"):
        HardNegativeLoss(config())(image, text[:-1], SCALE, PackedOutputs(mask, types))
    with pytest.raises(ValueError, match="tau-plus"):
        HardNegativeLoss(config(importance_tau_plus=1.0))


def test_negative_grad_none_keeps_every_value_and_stops_only_the_negatives_gradient():
    """--hn-negative-grad none: the forward is unchanged, the images' and the positive captions'
    gradients are unchanged, and no gradient reaches a negative caption's features."""
    image, text, mask, types = batch(seed=5)
    grads, values = {}, {}
    for flag in ("full", "none"):
        image_in, text_in = image.clone().requires_grad_(), text.clone().requires_grad_()
        loss_fn = HardNegativeLoss(HNConfig(negatives="online", num_negatives=K, negative_grad=flag,
                                            loss=("itc", "choice", "intra", "rank")))
        out = loss_fn(image_in, text_in, SCALE, PackedOutputs(mask, types), output_dict=True)
        sum(v for v in out.values() if isinstance(v, torch.Tensor) and v.requires_grad).backward()
        values[flag] = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                        for k, v in out.items()}
        grads[flag] = image_in.grad, text_in.grad.view(B, 1 + K, D)
    assert values["none"] == values["full"]
    torch.testing.assert_close(grads["none"][0], grads["full"][0])
    torch.testing.assert_close(grads["none"][1][:, 0], grads["full"][1][:, 0])
    assert grads["full"][1][:, 1:][mask].abs().sum() > 0
    assert torch.equal(grads["none"][1][:, 1:], torch.zeros(B, K, D))


def test_negative_grad_flag_reaches_the_config():
    import argparse

    from open_clip_hn.config import add_hn_arguments
    parser = argparse.ArgumentParser()
    add_hn_arguments(parser)
    assert HNConfig.from_args(parser.parse_args([])).negative_grad == "full"
    assert HNConfig.from_args(parser.parse_args(["--hn-negatives", "online", "--hn-negative-grad",
                                                 "none"])).negative_grad == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["--hn-negative-grad", "off"])
    with pytest.raises(ValueError, match="--hn-negative-grad acts on text negatives"):
        HNConfig(negative_grad="none").validate()


@pytest.mark.parametrize("softened", [{}, {"label_smoothing": 0.1, "focal_gamma": 2.0}])
def test_choice_grad_keeps_the_loss_and_trains_only_the_named_tower(softened):
    """--hn-choice-grad image|text: the choice term's value is unchanged, and its gradient reaches
    only the image features ('image') or only the caption and negative features ('text'), with
    plain and with softened (label smoothing, focal) choices."""
    image, text, mask, types = batch(seed=6)
    grads, values = {}, {}
    for mode in ("both", "image", "text"):
        image_in, text_in = image.clone().requires_grad_(), text.clone().requires_grad_()
        loss_fn = HardNegativeLoss(HNConfig(negatives="online", num_negatives=K, loss=("itc", "choice"),
                                            choice_grad=mode, **softened))
        out = loss_fn(image_in, text_in, SCALE, PackedOutputs(mask, types), output_dict=True)
        out["choice_loss"].backward()
        values[mode] = float(out["choice_loss"].detach())
        grads[mode] = image_in.grad, text_in.grad
    assert values["image"] == values["both"] == values["text"]
    assert grads["both"][0].abs().sum() > 0 and grads["both"][1].abs().sum() > 0
    torch.testing.assert_close(grads["image"][0], grads["both"][0])
    assert grads["image"][1] is None or not grads["image"][1].any()
    torch.testing.assert_close(grads["text"][1], grads["both"][1])
    assert grads["text"][0] is None or not grads["text"][0].any()


def test_choice_grad_flag_reaches_the_config_and_needs_the_choice_term():
    import argparse

    from open_clip_hn.config import add_hn_arguments
    parser = argparse.ArgumentParser()
    add_hn_arguments(parser)
    assert HNConfig.from_args(parser.parse_args([])).choice_grad == "both"
    args = parser.parse_args(["--hn-negatives", "online", "--hn-loss", "itc,choice",
                              "--hn-choice-grad", "text"])
    assert HNConfig.from_args(args).choice_grad == "text"
    with pytest.raises(SystemExit):
        parser.parse_args(["--hn-choice-grad", "none"])
    with pytest.raises(ValueError, match="--hn-choice-grad acts on the choice term"):
        HNConfig(negatives="online", loss=("itc",), choice_grad="image").validate()
    with pytest.raises(ValueError, match="--hn-choice-grad acts on the choice term"):
        HNConfig(negatives="online", loss=("itc", "choice"), choice_weight=0.0,
                 choice_grad="text").validate()
    with pytest.raises(ValueError, match="needs a contrastive term to train the text tower"):
        HNConfig(negatives="online", loss=("choice",), choice_grad="image").validate()
    HNConfig(negatives="online", loss=("clip", "choice"), choice_grad="image").validate()
