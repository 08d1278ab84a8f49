"""2 and 3 gloo processes give the losses and feature gradients of one process on the whole batch,
for every term (bank, thresholds and curriculum share included) and every gather mode whose
gradients OpenCLIP makes exact; with --local-loss and no --gather-with-grad (no gathered column
keeps its gradient), the losses agree and each rank's hard negatives keep theirs."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from open_clip_hn.config import HNConfig
from open_clip_hn.curriculum import negative_keep_mask
from open_clip_hn.mirror import MirrorPairs
from open_clip_hn.objective import HardNegativeLoss
from open_clip_hn.packing import PackedOutputs

N, K, D, STEPS = 6, 2, 8, 4
SCALE = torch.tensor(6.0)
CONFIGS = {
    "itc+choice+intra+rank+mined": dict(loss=("itc", "choice", "intra", "rank", "mined")),
    "importance+mined": dict(loss=("importance", "mined"), importance_tau_plus=0.1),
    "itc+choice+mirror": dict(loss=("itc", "choice"), mirror=("horizontal",), mirror_weight=2.0),
    "itc+choice+distill": dict(loss=("itc", "choice"), distill="ema", distill_weight=2.0),
    "itc+mirror+converse": dict(loss=("itc",), mirror=("horizontal",), converse_weight=2.0),
    "itc+choice+rank, negatives fixed": dict(loss=("itc", "choice", "rank"), negative_grad="none"),
    "clip+local": dict(loss=("clip", "local"), local_weight=2.0),
}
P, T = 3, 4  # patch tokens per image, token positions per caption (the local term)
MODES = [(False, True), (True, True), (False, False), (True, False)]  # (local_loss, gather_with_grad)
# under a local loss without gather-with-grad, each used text negative keeps the gradient of its own
# rank's anchors, also where it learns only as a column of itc ("importance+mined",
# "itc+mirror+converse"), and an unused one gets none


def config(name: str) -> HNConfig:
    return HNConfig(negatives="online", num_negatives=K, memory_bank_size=9, mined_k=3,
                    false_negative_threshold=0.95, curriculum="linear", curriculum_warmup=1,
                    curriculum_start=0.5, curriculum_end=1.0, **CONFIGS[name])


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    image = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(N * (1 + K), D, generator=g), dim=-1)
    mask = torch.rand(N, K, generator=g) > 0.25
    types = torch.randint(0, 9, (N, K), generator=g).masked_fill(~mask, -1)
    mirror_image = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    mirror_text = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    mirror_mask = torch.rand(N, generator=g) > 0.4
    teacher = (F.normalize(torch.randn(N, D, generator=g), dim=-1),
               F.normalize(torch.randn(N, D, generator=g), dim=-1))
    converse = F.normalize(torch.randn(N, 2, D, generator=g), dim=-1)
    converse_mask = mirror_mask & (torch.rand(N, generator=g) > 0.3)
    token_mask = torch.rand(N, 1 + K, T, generator=g) > 0.3
    token_mask[:, :, 0] = True  # every caption row has a token (the model's always do: end of text)
    tokens = (torch.randn(N, P, D, generator=g), torch.randn(N, 1 + K, T, D, generator=g), token_mask)
    return (image, text, mask, types, (mirror_image, mirror_text, mirror_mask, converse, converse_mask),
            teacher, tokens)


def used_negatives(name: str, step: int) -> torch.Tensor:
    """Bool [N, K]: the valid slots the curriculum keeps at `step` (the whole batch's)."""
    share = HardNegativeLoss(config(name), total_steps=STEPS).curriculum(step)
    return global_batch(step)[2] & negative_keep_mask((N, K), share, seed=config(name).seed, step=step)


def run(rank: int, world_size: int, name: str, local_loss: bool, gather_with_grad: bool):
    loss = HardNegativeLoss(config(name), rank=rank, world_size=world_size, local_loss=local_loss,
                            gather_with_grad=gather_with_grad, total_steps=STEPS)
    b = N // world_size
    records = []
    for step in range(STEPS):
        image, text, mask, types, mirrors, teacher, tokens = global_batch(step)
        rows = slice(rank * b, (rank + 1) * b)
        image = image[rows].clone().requires_grad_()
        text = text[rank * b * (1 + K):(rank + 1) * b * (1 + K)].clone().requires_grad_()
        mirror_image, mirror_text, converse = (m[rows].clone().requires_grad_()
                                               for m in (*mirrors[:2], mirrors[3]))
        pairs = None
        if loss.config.mirror:
            pairs = MirrorPairs(mirror_image, mirror_text, mirrors[2][rows])
            if loss.config.converse_weight:
                pairs = MirrorPairs(mirror_image, mirror_text, mirrors[2][rows], converse, mirrors[4][rows])
        distill = {}
        if loss.config.distill != "none":  # the teacher's features of this rank's rows
            distill = dict(teacher_image=teacher[0][rows], teacher_text=teacher[1][rows],
                           teacher_logit_scale=torch.full((b,), 4.0))
        image_tokens, text_tokens = (t[rows].clone().requires_grad_() for t in tokens[:2])
        if "local" in loss.config.loss:  # this rank's samples' token features
            distill.update(image_tokens=image_tokens, text_tokens=text_tokens,
                           text_token_mask=tokens[2][rows])
        out = loss(image, text, SCALE, PackedOutputs(mask[rows], types[rows], pairs, **distill),
                   output_dict=True)
        sum(out.values()).backward()
        records.append({"values": {k: v.item() for k, v in out.items()},
                        "image_grad": image.grad, "text_grad": text.grad,
                        "mirror_grad": mirror_image.grad if pairs is not None else None,
                        "mirror_text_grad": mirror_text.grad if pairs is not None else None,
                        "converse_grad": converse.grad if pairs is not None and pairs.converse is not None
                        else None,
                        "image_tokens_grad": image_tokens.grad, "text_tokens_grad": text_tokens.grad})
    return records, loss.state_dict()


def worker(rank: int, world_size: int, port: int, out_dir: str):
    torch.set_num_threads(1)  # gloo + intra-op threads on 2 cores otherwise spin against each other
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = {(name, *mode): run(rank, world_size, name, *mode) for name in CONFIGS for mode in MODES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_agree_with_one_process(world_size, tmp_path):
    mp.spawn(worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    b = N // world_size
    for name in CONFIGS:
        for local_loss, gather_with_grad in MODES:
            single, single_state = run(0, 1, name, False, False)
            grad_factor = world_size if gather_with_grad else 1  # OpenCLIP's gather semantics
            for r, results in enumerate(ranks):
                records, state = results[(name, local_loss, gather_with_grad)]
                for step, (got, want) in enumerate(zip(records, single)):
                    where = f"{name} local_loss={local_loss} gather_with_grad={gather_with_grad} rank {r} step {step}"
                    if not local_loss:
                        assert got["values"] == pytest.approx(want["values"], rel=1e-5, abs=1e-6), where
                    if local_loss and not gather_with_grad:  # OpenCLIP drops every column's gradient
                        learns = got["text_grad"].view(b, 1 + K, D)[:, 1:].abs().sum(dim=-1) > 0
                        if "local" in CONFIGS[name]["loss"]:  # clip leaves the pooled negatives out
                            grad = got["text_tokens_grad"]  # None at the warmup step: nothing scored
                            learns = (torch.zeros(b, K, dtype=torch.bool) if grad is None
                                      else grad[:, 1:].abs().sum(dim=(-2, -1)) > 0)
                        expected = used_negatives(name, step)[r * b:(r + 1) * b]
                        if CONFIGS[name].get("negative_grad") == "none":
                            expected = torch.zeros_like(expected)
                        assert torch.equal(learns, expected), where
                        if "local" in CONFIGS[name]["loss"]:  # own rows only, each rank's own mean
                            for key in ("image_tokens_grad", "text_tokens_grad"):
                                if want[key] is None:  # the warmup step scores nothing
                                    assert got[key] is None, where
                                    continue
                                torch.testing.assert_close(
                                    got[key], world_size * want[key][r * b:(r + 1) * b],
                                    rtol=1e-4, atol=1e-6, msg=f"{where} {key}")
                        continue
                    torch.testing.assert_close(got["image_grad"], grad_factor * want["image_grad"][r * b:(r + 1) * b],
                                               rtol=1e-4, atol=1e-6, msg=where)
                    rows = slice(r * b * (1 + K), (r + 1) * b * (1 + K))
                    torch.testing.assert_close(got["text_grad"], grad_factor * want["text_grad"][rows],
                                               rtol=1e-4, atol=1e-6, msg=where)
                    for key in ("mirror_grad", "mirror_text_grad", "converse_grad", "image_tokens_grad",
                                "text_tokens_grad"):
                        if want[key] is not None:
                            torch.testing.assert_close(
                                got[key], grad_factor * want[key][r * b:(r + 1) * b],
                                rtol=1e-4, atol=1e-6, msg=f"{where} {key}")
                torch.testing.assert_close(state["bank"]["storage"], single_state["bank"]["storage"])
                torch.testing.assert_close(state["thresholds"]["margins"], single_state["thresholds"]["margins"])
            if local_loss:  # each rank averages its own anchors: the mean over ranks is the global loss
                for step, want in enumerate(single):
                    for key, value in want["values"].items():
                        mean = sum(res[(name, True, gather_with_grad)][0][step]["values"][key]
                                   for res in ranks) / world_size
                        assert mean == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key, step)
