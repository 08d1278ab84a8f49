"""--hn-label-smoothing and --hn-focal-gamma (FSC-CLIP's softer hard negatives) against a
hand-written reference; off by default, leaving every term bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import unit
from open_clip_hn import losses as L
from open_clip_hn.config import HNConfig
from open_clip_hn.objective import HardNegativeLoss
from open_clip_hn.packing import PackedOutputs

SCALE = torch.tensor(10.0)


def reference_row(logits: list[float], target: int, eps: float, gamma: float) -> float:
    """One row written out as FSC-CLIP's focal loss with smoothed targets: valid columns are the
    finite ones, each damped by its own probability."""
    valid = [i for i, v in enumerate(logits) if v != float("-inf")]
    z = math.log(sum(math.exp(logits[i]) for i in valid))
    total = 0.0
    for i in valid:
        p = math.exp(logits[i] - z)
        q = (1 - eps) * (i == target) + eps / len(valid)
        total += q * (1 - p) ** gamma * -(logits[i] - z)
    return total


@pytest.mark.parametrize("eps,gamma", [(0.1, 0.0), (0.0, 2.0), (0.2, 1.5)])
def test_soft_cross_entropy_matches_the_reference(eps, gamma):
    logits = torch.tensor([[2.0, 1.0, -1.0, float("-inf")],
                           [0.5, float("-inf"), 3.0, 0.0],
                           [1.0, float("-inf"), float("-inf"), float("-inf")]])
    labels = torch.tensor([0, 2, 0])
    got = L.soft_cross_entropy(logits, labels, eps, gamma)
    want = [reference_row(row, int(t), eps, gamma) for row, t in zip(logits.tolist(), labels)]
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_soft_cross_entropy_off_is_plain_cross_entropy_and_gradients_stay_finite():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 6, 1, 2])
    torch.testing.assert_close(L.soft_cross_entropy(logits, labels).mean(), F.cross_entropy(logits, labels))
    # a choice row without valid negatives (p_target = 1): loss 0, no NaN gradient for gamma < 1
    lone = torch.tensor([[4.0, float("-inf"), float("-inf")]], requires_grad=True)
    value = L.soft_cross_entropy(lone, torch.tensor([0]), 0.1, 0.5)
    value.sum().backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(lone.grad).all()


def test_smoothing_under_focal_weighting_pulls_an_over_confident_target_back():
    """Each column is damped by its own probability (FSC-CLIP), not all by the target's: the
    smoothing targets of the unlikely columns stay nearly whole, so past the smoothed target a
    larger target logit costs more (the gradient on it is positive) instead of less."""
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]], requires_grad=True)
    L.soft_cross_entropy(logits, torch.tensor([0]), 0.1, 1.0).sum().backward()
    assert logits.grad[0, 0] > 0 and (logits.grad[0, 1:] < 0).all()


def batch(k=3, n=6):
    image, text = unit(n, 8, seed=1), unit(n * (1 + k), 8, seed=2)
    mask = torch.rand(n, k, generator=torch.Generator().manual_seed(3)) > 0.3
    return image, text, PackedOutputs(mask, torch.zeros(n, k, dtype=torch.long).masked_fill(~mask, -1))


def test_itc_and_choice_use_the_softened_loss_only_when_asked():
    image, text, packed = batch()
    base = dict(negatives="online", num_negatives=3, loss=("itc", "choice"))
    plain = HardNegativeLoss(HNConfig(**base))(image, text, SCALE, packed, output_dict=True)
    positives, negatives = L.split_text_features(text, 6)
    per_image, per_text = L.contrastive_logits(image, positives, image, positives, negatives, packed.neg_mask,
                                               SCALE)
    labels = torch.arange(6)
    assert torch.equal(plain["contrastive_loss"], L.itc_loss(per_image, per_text, labels))  # bit-identical
    assert torch.equal(plain["choice_loss"], L.choice_loss(image, positives, negatives, packed.neg_mask, SCALE))

    soft = HardNegativeLoss(HNConfig(**base, label_smoothing=0.1, focal_gamma=2.0))(
        image, text, SCALE, packed, output_dict=True)
    want_itc = (L.soft_cross_entropy(per_image, labels, 0.1, 2.0).mean()
                + F.cross_entropy(per_text, labels)) / 2
    choice_logits = torch.cat([SCALE * (image * positives).sum(-1, keepdim=True),
                               (SCALE * torch.einsum("ad,akd->ak", image, negatives)).masked_fill(
                                   ~packed.neg_mask, float("-inf"))], dim=1)
    want_choice = torch.tensor([reference_row(row, 0, 0.1, 2.0) for row in choice_logits.tolist()]).mean()
    torch.testing.assert_close(soft["contrastive_loss"], want_itc)
    torch.testing.assert_close(soft["choice_loss"], want_choice)
    assert soft["contrastive_loss"].item() != plain["contrastive_loss"].item()


def test_label_smoothing_flag_is_validated():
    with pytest.raises(ValueError, match="--hn-label-smoothing must be in"):
        HNConfig(label_smoothing=1.0).validate()
