"""How hard the objective is at a given optimizer step: the curriculum and the rank margins.

The curriculum value c(step) in [0, 1] is 0 during warmup, then follows the schedule from
`--hn-curriculum-start` to `--hn-curriculum-end`. It is the share of hard negatives used and it
scales the intra, rank and mined weights, so a run starts as plain CLIP and hardens gradually
(a rank loss at full weight from scratch collapses training).

Which negatives make up the share is a pure function of (seed, step, global slot), so one
process and N processes keep the same ones and a resumed run continues the same sequence.
"""

from __future__ import annotations

import logging
import math

import torch

from .negatives.taxonomy import NEGATIVE_TYPES

STEP_STAGES = 4  # the 'step' schedule climbs in this many equal stairs


def parse_warmup(text: str) -> int | str:
    """`--hn-curriculum-warmup`: optimizer steps (`117`) or a share of the run's steps (`12.5%`),
    which keeps a recipe's warmup the same part of a run of any length."""
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = math.nan
        if not 0 <= share < 100:
            raise ValueError(f"{text!r}: a share is a percentage in [0, 100), e.g. 12.5%")
        return f"{share:g}%"
    if not text.isdigit():
        raise ValueError(f"{text!r}: give optimizer steps (an integer >= 0) or a share such as 12.5%")
    return int(text)


def warmup_steps(warmup: int | str, total_steps: int | None) -> int:
    """The warmup in optimizer steps: a count as given; a share of `total_steps`, which must then
    be known (a share of an unknown run would silently be no warmup)."""
    if isinstance(warmup, int):
        return warmup
    if total_steps is None:
        raise ValueError(f"--hn-curriculum-warmup {warmup} is a share of the run's optimizer steps, "
                         "but the run's length is unknown: pass total_steps (the trainer does), or "
                         "give the warmup in steps")
    return round(float(warmup[:-1]) / 100 * total_steps)


def curriculum_value(step: int, *, kind: str, warmup: int | str, start: float, end: float,
                     total_steps: int | None) -> float:
    """c(step): 0 before `warmup` (steps, or a share of `total_steps`: `warmup_steps`), then
    const (= start), linear, cosine or stepped start -> end, reaching `end` at the run's last
    optimizer step (total_steps - 1; a run whose only step after the warmup is its last stays at
    `start`). Without `total_steps` (unknown run length) the schedule stays at `start`, and a
    warmup given as a share raises (`warmup_steps`)."""
    warmup = warmup_steps(warmup, total_steps)
    if step < warmup:
        return 0.0
    if kind == "const":
        return start
    span = (total_steps - 1 - warmup) if total_steps is not None else 0
    progress = min(1.0, (step - warmup) / span) if span > 0 else 0.0
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2
    if kind == "step":
        return start + (end - start) * min(math.floor(progress * STEP_STAGES), STEP_STAGES - 1) / (STEP_STAGES - 1)
    raise ValueError(f"unknown curriculum {kind!r}; use const, linear, cosine or step")


def negative_keep_mask(shape: tuple[int, int], share: float, *, seed: int, step: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [N, K]: which hard-negative slots of the global batch the curriculum keeps at `step`.

    Drawn from a generator seeded by (seed, step) over the whole global batch, so every rank and
    a single process on the same batch agree slot for slot.
    """
    if share >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if share <= 0.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))
    return (torch.rand(shape, generator=generator) < share).to(device)


RANK_MARGIN_MAX = 10.0  # CE-CLIP's upper bound on an adaptive margin (logits)
MAX_GAP_DIVISOR = 5.0  # adaptive-max: the margin is the type's largest gap over this (CE-CLIP's /5)


class RankThresholds:
    """Per-negative-type margins of the rank loss (logits), adapted as CE-CLIP adapts them.

    After each optimizer step the margin of every type seen in the global batch becomes that
    step's summary of its logit gaps s*cos(I,T) - s*cos(I,T_k): their mean (adaptive-mean) or
    their largest over 5 (adaptive-max), clamped to [0, 10]. Margins start at 0 (only mis-ranked
    negatives are penalised) and follow how far the model already separates each type, which
    makes the rank loss its own curriculum. A fixed margin never moves.
    """

    def __init__(self, mode: str, fixed: float | None = None, num_types: int = len(NEGATIVE_TYPES)):
        if mode not in ("adaptive-mean", "adaptive-max", "fixed"):
            raise ValueError(f"rank threshold mode {mode!r}: use adaptive-mean, adaptive-max or fixed")
        self.mode = mode
        self.fixed = fixed
        self.margins = torch.zeros(num_types, dtype=torch.float64)
        self.updates = torch.zeros(num_types, dtype=torch.long)

    def values(self) -> torch.Tensor:
        """Current margin per type, float32 [T] on the device of the last update (0 for unseen types)."""
        if self.mode == "fixed":
            return torch.full_like(self.margins, self.fixed).float()
        return self.margins.float()

    def seen(self) -> torch.Tensor:
        """Bool [T]: types whose margin is set: observed at least once, or all for a fixed one."""
        if self.mode == "fixed":
            return torch.ones_like(self.updates, dtype=torch.bool)
        return self.updates > 0

    def update(self, gaps: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> None:
        """Set the margin of each type present in one step's logit gaps [N, K] (valid slots).

        Stays on the features' device (no host sync per step)."""
        if self.mode == "fixed":
            return
        num_types = len(self.margins)
        self.margins, self.updates = self.margins.to(gaps.device), self.updates.to(gaps.device)
        valid = mask & (types >= 0) & (types < num_types)
        index = torch.where(valid, types, torch.zeros_like(types)).flatten()
        weight = valid.flatten().double()
        flat = gaps.detach().double().flatten()
        count = torch.zeros(num_types, dtype=torch.float64, device=gaps.device).index_add_(0, index, weight)
        present = count > 0
        if self.mode == "adaptive-mean":
            total = torch.zeros_like(count).index_add_(0, index, flat * weight)
            observed = total / count.clamp(min=1)
        else:
            observed = torch.full_like(count, -math.inf).scatter_reduce_(
                0, index, torch.where(valid.flatten(), flat, torch.full_like(flat, -math.inf)),
                reduce="amax", include_self=True) / MAX_GAP_DIVISOR
        observed = observed.clamp(0.0, RANK_MARGIN_MAX)
        self.margins = torch.where(present, observed, self.margins)
        self.updates = self.updates + present.long()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"margins": self.margins.detach().cpu().clone(), "updates": self.updates.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from `state_dict()`. A state saved before the margins were CE-CLIP's (an
        average of cosine gaps, key "average") restarts them at 0: they are set anew after the
        first step."""
        if "margins" not in state:  # saved before the margins were in logits
            if self.mode == "fixed":
                logging.warning("resuming a state saved when --hn-rank-threshold MARGIN was a "
                                "cosine: MARGIN %g is now in logits (logit scale x cosine; "
                                "CE-CLIP's fixed default is 2.0)", self.fixed)
            elif bool(state["updates"].any()):
                logging.info("rank thresholds saved as cosine averages by an older open_clip_hn: "
                             "the margins restart at 0 and are set from the first step's gaps")
            return
        if state["margins"].shape != self.margins.shape:
            raise ValueError(f"rank thresholds for {state['margins'].numel()} negative types cannot be "
                             f"loaded into {self.margins.numel()} types; the taxonomy changed")
        device = self.margins.device
        self.margins = state["margins"].to(device=device, dtype=torch.float64)
        self.updates = state["updates"].to(device=device, dtype=torch.long)
