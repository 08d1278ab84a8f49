"""The `local` term (FSC-CLIP's local hard-negative loss): its maths against a loop over tokens,
the token hooks against the towers run by hand, --accum-freq, and the refusal of other towers.
(Several ranks: tests/test_objective_distributed.py, config "clip+local".)"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL_CONFIG, accum_freq_losses, tiny_model, unit
from open_clip_hn import losses as L
from open_clip_hn.config import HNConfig
from open_clip_hn.objective import HardNegativeLoss
from open_clip_hn.packing import PackedNegativeTokenizer, PackedOutputs, attach_model_hooks
from open_clip_hn.run import HardNegativeRun
from open_clip_hn.token_features import attach_token_hooks, check_token_model

SCALE = torch.tensor(10.0)


def reference_score(patches: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, scale: float) -> float:
    """FSC-CLIP's score of one caption, token by token: min-max patch weights, then log-sum-exp."""
    terms = []
    for token, counts in zip(tokens, mask):
        if not counts:
            continue
        sim = patches @ token
        w = (sim - sim.min()) / (sim.max() - sim.min())
        grouped = (w / w.sum()) @ patches
        terms.append(scale * F.cosine_similarity(grouped, token, dim=0))
    return torch.logsumexp(torch.stack(terms), dim=0).item()


def test_scores_match_a_loop_over_tokens_and_ignore_padding():
    g = torch.Generator().manual_seed(0)
    patches, tokens = torch.randn(3, 5, 6, generator=g), torch.randn(3, 2, 7, 6, generator=g)
    mask = torch.rand(3, 2, 7, generator=g) > 0.3
    mask[:, :, 0], mask[:, :, 5:] = True, False  # padding at the end of every row
    got = L.local_alignment_scores(patches, tokens, mask, SCALE)
    for a in range(3):
        for r in range(2):
            assert got[a, r].item() == pytest.approx(reference_score(patches[a], tokens[a, r], mask[a, r], 10.0),
                                                     rel=1e-5)
    padded = tokens.clone()
    padded[:, :, 5:] = 100.0  # what sits in padded positions never counts
    torch.testing.assert_close(L.local_alignment_scores(patches, padded, mask, SCALE), got)


def test_the_patch_weights_carry_no_gradient():
    """They choose which patches a token is scored against; only the score itself trains."""
    g = torch.Generator().manual_seed(1)
    patches = torch.randn(2, 4, 3, generator=g).requires_grad_()
    tokens = torch.randn(2, 2, 3, 3, generator=g).requires_grad_()
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    L.local_alignment_scores(patches, tokens, mask, SCALE).sum().backward()
    sim = torch.einsum("arld,apd->arlp", tokens, patches).detach()
    w = (sim - sim.amin(-1, keepdim=True)) / (sim.amax(-1, keepdim=True) - sim.amin(-1, keepdim=True))
    w = w / w.sum(-1, keepdim=True)
    p2, t2 = patches.detach().clone().requires_grad_(), tokens.detach().clone().requires_grad_()
    grouped = F.normalize(torch.einsum("arlp,apd->arld", w, p2), dim=-1)
    torch.logsumexp(10.0 * (grouped * F.normalize(t2, dim=-1)).sum(-1), dim=-1).sum().backward()
    torch.testing.assert_close(patches.grad, p2.grad)
    torch.testing.assert_close(tokens.grad, t2.grad)


def test_a_caption_whose_tokens_each_find_a_patch_beats_one_with_a_token_that_finds_none():
    patches = torch.eye(4)[:2].unsqueeze(0)  # two patches: e0 and e1
    caption = torch.stack([torch.eye(4)[0], torch.eye(4)[1]])
    negative = torch.stack([torch.eye(4)[0], torch.eye(4)[2] + 0.1 * torch.eye(4)[1]])
    scores = L.local_alignment_scores(patches, torch.stack([caption, negative]).unsqueeze(0),
                                      torch.ones(1, 2, 2, dtype=torch.bool), SCALE)
    assert scores[0, 0] > scores[0, 1] + 0.5  # log 2: its second token adds a whole e^s


def test_local_choice_loss_is_cross_entropy_over_valid_negatives_and_zero_without_any():
    scores = torch.tensor([[3.0, 1.0, 5.0], [2.0, 4.0, 0.0]])
    used = torch.tensor([[True, False], [False, False]])
    loss = L.local_choice_loss(scores, used)
    first = F.cross_entropy(torch.tensor([[3.0, 1.0]]), torch.tensor([0])).item()
    assert loss.item() == pytest.approx(first / 2, rel=1e-6)  # the second row has none: 0
    soft = L.local_choice_loss(scores, used, 0.1, 2.0)
    want = L.soft_cross_entropy(torch.tensor([[3.0, 1.0, float("-inf")]]), torch.tensor([0]), 0.1, 2.0)
    assert soft.item() == pytest.approx(want.item() / 2, rel=1e-6)


class SwappedWords:
    """A stand-in generator: each negative is the caption with its first two words exchanged."""

    def generate(self, caption: str, k: int) -> list[dict[str, str]]:
        words = caption.split()
        return [{"text": " ".join([words[1], words[0], *words[2:]] + ["x"] * i), "type": "swap_objects"}
                for i in range(k)]


def packed_batch(tokenizer, k=2):
    packer = PackedNegativeTokenizer(tokenizer, k, SwappedWords())
    captions = ["a red cube left of a blue ball", "two green balls", "a big star", "one small cube"]
    return torch.randn(4, 3, 32, 32), packer(captions)


def by_hand(model, images, token_ids):
    """The projected patch tokens and caption token features, the towers run step by step."""
    visual = model.visual
    x = visual.transformer(visual._embeds(images))
    patches = visual._global_pool(visual.ln_post(x))[1] @ visual.proj
    t = model.token_embedding(token_ids) + model.positional_embedding
    t = model.ln_final(model.transformer(t, attn_mask=model.attn_mask))
    return patches, t @ model.text_projection


def test_hooks_add_each_sample_s_patch_and_caption_tokens(tokenizer):
    model = tiny_model()
    attach_model_hooks(model, 2)
    attach_token_hooks(model, 2)
    images, packed = packed_batch(tokenizer)
    model.train()
    out = model(images, packed)
    read = PackedOutputs.read(out)
    ids = packed.view(4 * 3, -1)[:, :32]  # each block: 32 token ids, then the metadata columns
    with torch.no_grad():
        patches, text = by_hand(model, images, ids)
    torch.testing.assert_close(read.image_tokens.detach(), patches)
    assert read.image_tokens.shape == (4, 16, 64) and read.image_tokens.requires_grad
    torch.testing.assert_close(read.text_tokens.detach(), text.view(4, 3, 32, 64))
    want_mask = (ids != 0).view(4, 3, 32)
    want_mask[:, :, 0] = False  # the start token never counts
    assert torch.equal(read.text_token_mask, want_mask)
    model.eval()
    assert PackedOutputs.read(model(images, packed)).image_tokens is None  # evaluation pays nothing


def test_hooks_keep_the_first_rows_when_mirrored_pairs_ride_along(tokenizer):
    model = tiny_model()
    attach_model_hooks(model, 2, mirror=True)
    attach_token_hooks(model, 2)
    packer = PackedNegativeTokenizer(tokenizer, 2, None, mirror_axes=("horizontal",))
    captions = ["a red cube left of a blue ball", "a big star", "a cube right of a ball", "two cubes"]
    images = torch.randn(4, 3, 32, 32)
    model.train()
    read = PackedOutputs.read(model(images, packer(captions)))
    assert read.mirrors is not None and bool(read.mirrors.mask.any())
    ids = packer(captions).view(4, 4, -1)[:, :3, :32].reshape(12, 32)
    with torch.no_grad():
        patches, text = by_hand(model, images, ids)
    torch.testing.assert_close(read.image_tokens.detach(), patches)
    torch.testing.assert_close(read.text_tokens.detach(), text.view(4, 3, 32, 64))


def test_local_loss_survives_accum_freq_concatenation(tokenizer):
    """OpenCLIP's --accum-freq path torch.cat's every output value along the batch."""
    config = HNConfig(negatives="online", num_negatives=2, loss=("clip", "local"), given=("x",))
    model = tiny_model()
    attach_model_hooks(model, 2)
    attach_token_hooks(model, 2)
    model.train()
    images, packed = packed_batch(tokenizer)
    got, want = accum_freq_losses(model, images, packed, HardNegativeLoss(config))
    assert got["local_loss"].item() == pytest.approx(want["local_loss"].item(), rel=1e-5)
    assert got["local_loss"].item() > 1e-3


def test_objective_weighs_the_term_and_refuses_outputs_without_tokens():
    config = HNConfig(negatives="online", num_negatives=2, loss=("clip", "local"), local_weight=0.2,
                      label_smoothing=0.05, focal_gamma=2.0)
    loss = HardNegativeLoss(config)
    g = torch.Generator().manual_seed(3)
    image, text = unit(4, 8, seed=1), unit(12, 8, seed=2)
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    tokens = (torch.randn(4, 5, 8, generator=g), torch.randn(4, 3, 6, 8, generator=g),
              torch.rand(4, 3, 6, generator=g) > 0.2)
    packed = PackedOutputs(mask, torch.zeros(4, 2, dtype=torch.long), image_tokens=tokens[0],
                           text_tokens=tokens[1], text_token_mask=tokens[2])
    out = loss(image, text, SCALE, packed, output_dict=True)
    scores = L.local_alignment_scores(*tokens, SCALE)
    want = 0.2 * L.local_choice_loss(scores, mask, 0.05, 2.0)
    assert out["local_loss"].item() == pytest.approx(want.item(), rel=1e-6)
    no_tokens = tokens[2].clone()
    no_tokens[1, 0] = False  # the second image's caption row has nothing to score
    with pytest.raises(ValueError, match="a positive caption has no token to score"):
        loss(image, text, SCALE, PackedOutputs(mask, torch.zeros(4, 2, dtype=torch.long),
                                               image_tokens=tokens[0], text_tokens=tokens[1],
                                               text_token_mask=no_tokens), output_dict=True)
    with pytest.raises(ValueError, match="no token features"):
        loss(image, text, SCALE, PackedOutputs(mask, torch.zeros(4, 2, dtype=torch.long)), output_dict=True)


def test_negatives_without_gradient_keep_their_token_features_constant():
    config = HNConfig(negatives="online", num_negatives=2, loss=("clip", "local"), negative_grad="none")
    g = torch.Generator().manual_seed(4)
    text_tokens = torch.randn(2, 3, 4, 8, generator=g).requires_grad_()
    packed = PackedOutputs(torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.long),
                           image_tokens=torch.randn(2, 5, 8, generator=g), text_tokens=text_tokens,
                           text_token_mask=torch.ones(2, 3, 4, dtype=torch.bool))
    out = HardNegativeLoss(config)(unit(2, 8, seed=1), unit(6, 8, seed=2), SCALE, packed, output_dict=True)
    out["local_loss"].backward()
    assert text_tokens.grad[:, 0].abs().sum() > 0 and text_tokens.grad[:, 1:].abs().sum() == 0


def test_a_tower_without_patch_tokens_is_refused_before_training():
    from conftest import REPO

    open_clip.add_model_config(str(REPO / "open_clip_hn" / "model_configs" / "hn-tiny-rn.json"))
    resnet, _, _ = open_clip.create_model_and_transforms("hn-tiny-rn", output_dict=True)
    with pytest.raises(ValueError, match="--hn-loss local .* image tower is ModifiedResNet"):
        check_token_model(resnet)
    run = HardNegativeRun(HNConfig(negatives="online", num_negatives=2, loss=("clip", "local"),
                                   given=("x",)))
    with pytest.raises(ValueError, match="leave local out of --hn-loss"):
        run.model_created(resnet, None)
    check_token_model(tiny_model())  # the ViT fits


def test_a_text_tower_of_another_tokenizer_is_refused(tmp_path):
    """argmax pooling goes with SimpleTokenizer's layout (start token first, padding 0), which the
    token mask reads; a tower pooling otherwise (worldwide, mT5, SigLIP) has another tokenizer."""
    config = json.loads(TINY_MODEL_CONFIG.read_text())
    config["text_cfg"]["pool_type"] = "last"
    path = tmp_path / "hn-tiny-vit-last.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(str(path))
    model = open_clip.create_model("hn-tiny-vit-last", output_dict=True)
    with pytest.raises(ValueError, match="pools with 'last', not argmax"):
        check_token_model(model)


def test_hooks_leave_a_forward_of_unpacked_captions_alone(tokenizer):
    model = tiny_model()
    attach_model_hooks(model, 2)
    attach_token_hooks(model, 2)
    model.train()
    out = model(torch.randn(4, 3, 32, 32), tokenizer(["a cube", "a ball", "a star", "a ring"]))
    assert PackedOutputs.read(out).image_tokens is None  # no crash; the term says what is missing


def test_with_a_teacher_the_tokens_are_the_student_s_and_off_means_no_hooks(tokenizer):
    run = HardNegativeRun(HNConfig(negatives="online", num_negatives=2, loss=("clip", "local"),
                                   distill="ema", given=("x",)))
    model = tiny_model()
    run.model_created(model, None)
    with torch.no_grad():
        run.teacher.module.visual.proj.mul_(-1)  # a teacher whose tokens would differ
    images, packed = packed_batch(tokenizer)
    model.train()
    read = PackedOutputs.read(model(images, packed))
    assert read.teacher_image is not None
    with torch.no_grad():
        patches, text = by_hand(model, images, packed.view(12, -1)[:, :32])
    torch.testing.assert_close(read.image_tokens.detach(), patches)
    torch.testing.assert_close(read.text_tokens.detach(), text.view(4, 3, 32, 64))
    plain = tiny_model()
    HardNegativeRun(HNConfig(negatives="online", num_negatives=2, loss=("clip", "choice"),
                             given=("x",))).model_created(plain, None)
    assert model.visual.ln_post._forward_hooks and model.ln_final._forward_hooks
    assert not plain.visual.ln_post._forward_hooks and not plain.ln_final._forward_hooks


def test_local_needs_text_negatives():
    with pytest.raises(ValueError, match="--hn-loss local needs text hard negatives"):
        HNConfig(loss=("clip", "local")).validate()
