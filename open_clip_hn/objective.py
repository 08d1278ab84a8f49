"""The hard-negative objective OpenCLIP's train step calls in place of `ClipLoss`.

`HardNegativeLoss` is the stateful edge around the pure terms of `losses.py`: it gathers the
batch across ranks once (`distributed.py`), applies the curriculum, mines the memory bank, calls
the terms, and — once per optimizer step — updates the bank and the rank thresholds. Its
`state_dict()` holds everything a resumed run needs to continue where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import losses as L
from .config import HNConfig
from .curriculum import RankThresholds, curriculum_value, negative_keep_mask
from .distributed import gather_rows
from .memory_bank import MemoryBank
from .miner import mine


class LoggedValue:
    """A statistic that rides in the loss dict for OpenCLIP's logging but is not a loss.

    `.item()` gives the number (OpenCLIP's meters call it); adding it to anything returns the other
    operand, so OpenCLIP's `sum(losses.values())` ignores it. Holding a tensor defers the host
    sync to the moment the value is actually logged.
    """

    __slots__ = ("value",)

    def __init__(self, value: float | torch.Tensor):
        self.value = value.detach() if isinstance(value, torch.Tensor) else float(value)

    def item(self) -> float:
        return float(self.value)

    def __float__(self) -> float:
        return self.item()

    def __add__(self, other):
        return other

    def __radd__(self, other):
        return other

    def __repr__(self) -> str:
        return f"LoggedValue({self.item():.4g})"


@dataclass
class _Batch:
    """The global batch as the terms see it (after gathering and the curriculum share)."""

    all_image: torch.Tensor      # [N, D]
    all_text: torch.Tensor       # [N, D]
    all_negatives: torch.Tensor  # [N, K, D]
    all_mask: torch.Tensor       # [N, K] valid negatives
    all_types: torch.Tensor      # [N, K]
    used: torch.Tensor           # [N, K] valid and kept by the curriculum
    image: torch.Tensor          # [A, D] anchors this rank averages over
    text: torch.Tensor           # [A, D]
    negatives: torch.Tensor      # [A, K, D]
    anchor_used: torch.Tensor    # [A, K]
    anchor_types: torch.Tensor   # [A, K]
    labels: torch.Tensor         # [A] global row of each anchor's pair
    # mirrored pairs (--hn-mirror), zero rows where a sample has none; None without mirrors
    all_mirror_image: torch.Tensor | None = None  # [N, D]
    all_mirror_text: torch.Tensor | None = None   # [N, D]
    all_mirror_mask: torch.Tensor | None = None   # [N]
    mirror_image: torch.Tensor | None = None      # [A, D]
    mirror_text: torch.Tensor | None = None       # [A, D]
    mirror_mask: torch.Tensor | None = None       # [A]
    mirror_labels: torch.Tensor | None = None     # [A] global row of each anchor's mirror


@dataclass
class _Mirrors:
    """This rank's mirrored pairs as the model hook returns them."""

    image: torch.Tensor  # [B, D]
    text: torch.Tensor   # [B, D]
    mask: torch.Tensor   # [B]


class HardNegativeLoss(torch.nn.Module):
    """Sum of the `--hn-loss` terms; keys of the returned dict follow OpenCLIP's `*_loss` naming.

    Distributed semantics are ClipLoss's: without `local_loss` every rank computes the loss of the
    whole global batch; with it, each rank averages over its own anchors against all gathered
    columns. `gather_with_grad` makes the gather differentiable.
    """

    def __init__(self, config: HNConfig, *, rank: int = 0, world_size: int = 1, local_loss: bool = False,
                 gather_with_grad: bool = False, accum_freq: int = 1, start_step: int = 0,
                 total_steps: int | None = None):
        super().__init__()
        if config.importance_tau_plus >= 1:
            raise ValueError("--hn-importance-tau-plus must be < 1 (it is the share of false "
                             f"negatives among the negatives), got {config.importance_tau_plus}")
        if accum_freq < 1:
            raise ValueError(f"accum_freq must be >= 1, got {accum_freq}")
        self.config = config
        self.terms = frozenset(config.loss)
        self.rank = rank
        self.world_size = world_size
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.accum_freq = accum_freq
        self.total_steps = total_steps
        self.start_step = start_step
        self.grad_calls = 0
        fixed = config.fixed_rank_threshold
        self.thresholds = RankThresholds("fixed" if fixed is not None else config.rank_threshold, fixed)
        self.bank = MemoryBank(config.memory_bank_size, config.memory_bank_fp16) \
            if config.memory_bank_size > 0 else None

    @property
    def step(self) -> int:
        """The optimizer step the next grad-enabled call belongs to."""
        return self.start_step + self.grad_calls // self.accum_freq

    def curriculum(self, step: int) -> float:
        c = self.config
        return curriculum_value(step, kind=c.curriculum, warmup=c.curriculum_warmup,
                                start=c.curriculum_start, end=c.curriculum_end, total_steps=self.total_steps)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                hn_neg_mask: torch.Tensor | None = None, hn_neg_types: torch.Tensor | None = None,
                logit_bias: torch.Tensor | None = None, output_dict: bool = False,
                hn_mirror_image_features: torch.Tensor | None = None,
                hn_mirror_text_features: torch.Tensor | None = None,
                hn_mirror_mask: torch.Tensor | None = None, **unused):
        mirrors = None
        if hn_mirror_mask is not None:
            mirrors = _Mirrors(hn_mirror_image_features.float(), hn_mirror_text_features.float(),
                               hn_mirror_mask.to(image_features.device, torch.bool))
        # the terms run in fp32 even under bf16/fp16 autocast: -inf masks and logsumexp need the range
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            losses = self._losses(image_features.float(), text_features.float(), logit_scale.float(),
                                  hn_neg_mask, hn_neg_types,
                                  None if logit_bias is None else logit_bias.float(), mirrors)
        if output_dict:
            return losses
        return sum(v for v in losses.values() if isinstance(v, torch.Tensor))

    # ------------------------------------------------------------------ internals

    def _metadata(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None,
                  types: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, rows = image.shape[0], text.shape[0]
        if mask is None:
            if rows % batch:
                raise ValueError(f"text_features has {rows} rows for {batch} images; without hn_neg_mask "
                                 "it must be B (no negatives) or B*(1+K) interleaved rows")
            mask = torch.ones(batch, rows // batch - 1, dtype=torch.bool, device=image.device)
        k = mask.shape[1]
        if mask.shape[0] != batch or rows != batch * (1 + k):
            raise ValueError(f"hn_neg_mask is {tuple(mask.shape)} but the batch has {batch} images and "
                             f"{rows} text rows; expected [B, K] with B*(1+K) text rows")
        if types is None:
            types = torch.full_like(mask, -1, dtype=torch.long)
        if types.shape != mask.shape:
            raise ValueError(f"hn_neg_types {tuple(types.shape)} must match hn_neg_mask {tuple(mask.shape)}")
        return mask.to(image.device, torch.bool), types.to(image.device, torch.long)

    def _gather(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, types: torch.Tensor,
                share: float, step: int, mirrors: _Mirrors | None = None) -> _Batch:
        batch, dim = image.shape
        positives, negatives = L.split_text_features(text, batch)
        k = negatives.shape[1]
        if self.world_size == 1:
            all_image, all_text, all_negatives, all_mask, all_types = image, positives, negatives, mask, types
        else:
            grouped = torch.cat([image.unsqueeze(1), text.view(batch, 1 + k, dim)], dim=1)
            gathered = gather_rows(grouped, rank=self.rank, world_size=self.world_size,
                                   with_grad=self.gather_with_grad, keep_local_grad=not self.local_loss)
            all_image, all_text, all_negatives = gathered[:, 0], gathered[:, 1], gathered[:, 2:]
            meta = gather_rows(torch.stack([mask.long(), types], dim=1), rank=self.rank,
                               world_size=self.world_size)
            all_mask, all_types = meta[:, 0].bool(), meta[:, 1]
        used = all_mask & negative_keep_mask(tuple(all_mask.shape), share, seed=self.config.seed,
                                             step=step, device=all_mask.device)
        local = self.local_loss and self.world_size > 1
        if local:
            rows = slice(self.rank * batch, (self.rank + 1) * batch)
            anchors = (image, positives, negatives, used[rows], all_types[rows])
            labels = torch.arange(batch, device=image.device) + self.rank * batch
        else:
            anchors = (all_image, all_text, all_negatives, used, all_types)
            labels = torch.arange(all_image.shape[0], device=image.device)
        b = _Batch(all_image, all_text, all_negatives, all_mask, all_types, used, *anchors, labels)
        if mirrors is not None:
            self._gather_mirrors(b, mirrors, local, share, step)
        return b

    def _gather_mirrors(self, b: _Batch, mirrors: _Mirrors, local: bool, share: float,
                        step: int) -> None:
        """Gather the mirrored pairs and keep the curriculum's share of them (none during its
        warmup); give each anchor the itc row of its mirror (after the N originals, kept mirrors
        only, in global order)."""
        pairs = torch.stack([mirrors.image, mirrors.text], dim=1)
        pairs = gather_rows(pairs, rank=self.rank, world_size=self.world_size,
                            with_grad=self.gather_with_grad, keep_local_grad=not self.local_loss)
        b.all_mirror_image, b.all_mirror_text = pairs[:, 0], pairs[:, 1]
        valid = gather_rows(mirrors.mask, rank=self.rank, world_size=self.world_size)
        n = b.all_image.shape[0]
        # its own stream (seed + 1): the kept mirrors do not follow the kept text negatives
        keep = negative_keep_mask((n, 1), share, seed=self.config.seed + 1, step=step,
                                  device=valid.device)[:, 0]
        b.all_mirror_mask = valid & keep
        all_labels = n + torch.cumsum(b.all_mirror_mask.long(), dim=0) - 1
        if local:
            rows = slice(self.rank * mirrors.mask.shape[0], (self.rank + 1) * mirrors.mask.shape[0])
            b.mirror_image, b.mirror_text = mirrors.image, mirrors.text
            b.mirror_mask, b.mirror_labels = b.all_mirror_mask[rows], all_labels[rows]
        else:
            b.mirror_image, b.mirror_text = b.all_mirror_image, b.all_mirror_text
            b.mirror_mask, b.mirror_labels = b.all_mirror_mask, all_labels

    @staticmethod
    def _itc_rows(b: _Batch) -> tuple[torch.Tensor, ...]:
        """(image anchors, text anchors, image columns, text columns, labels) of the itc softmax:
        the batch's pairs plus, with mirrors, every valid mirrored pair as one more pair."""
        if b.all_mirror_mask is None:
            return b.image, b.text, b.all_image, b.all_text, b.labels
        all_valid, own = b.all_mirror_mask, b.mirror_mask
        return (torch.cat([b.image, b.mirror_image[own]]), torch.cat([b.text, b.mirror_text[own]]),
                torch.cat([b.all_image, b.all_mirror_image[all_valid]]),
                torch.cat([b.all_text, b.all_mirror_text[all_valid]]),
                torch.cat([b.labels, b.mirror_labels[own]]))

    @staticmethod
    def _mirror_row_share(b: _Batch, labels: torch.Tensor) -> float:
        """Turns this rank's mean over its R = A + own-mirror rows into its share of the global
        mean over N + V rows: R * N / (A * (N + V)). 1 without mirrors or without local_loss;
        with local_loss the ranks' means then average to the global loss, as in ClipLoss."""
        if b.all_mirror_mask is None:
            return 1.0
        n, anchors = b.all_image.shape[0], b.image.shape[0]
        total = n + int(b.all_mirror_mask.sum())
        return labels.shape[0] * n / (anchors * total)

    @staticmethod
    def _hide_own_negatives(per_image: torch.Tensor, b: _Batch, text_columns: int) -> torch.Tensor:
        """A mirrored image's own sample's text negatives may *be* its caption (a relation
        replacement reads like the mirrored caption): mask them in its row."""
        k = b.all_negatives.shape[1]
        if b.mirror_mask is None or not k:
            return per_image
        sources = b.labels[b.mirror_mask]
        rows = per_image.shape[0] - sources.shape[0] + torch.arange(sources.shape[0], device=per_image.device)
        columns = text_columns + sources[:, None] * k + torch.arange(k, device=per_image.device)
        hide = torch.zeros_like(per_image, dtype=torch.bool)
        hide[rows[:, None], columns] = True
        return per_image.masked_fill(hide, float("-inf"))

    def _mined_features(self, b: _Batch, share: float):
        anchors, dim, k = b.image.shape[0], b.image.shape[1], self.config.mined_k
        if self.bank is None or len(self.bank) == 0 or share <= 0:
            zeros = b.image.new_zeros(anchors, k, dim)
            invalid = torch.zeros(anchors, k, dtype=torch.bool, device=b.image.device)
            return zeros, invalid, zeros, invalid
        found = mine(b.image, b.text, self.bank.entries(), k, self.config.false_negative_threshold,
                     self.config.miner_backend)
        texts, images = self.bank.texts(), self.bank.images()
        return (texts[found.text_index].float(), found.text_valid,
                images[found.image_index].float(), found.image_valid)

    def _losses(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                mask: torch.Tensor | None, types: torch.Tensor | None,
                logit_bias: torch.Tensor | None, mirrors: _Mirrors | None = None
                ) -> dict[str, torch.Tensor | LoggedValue]:
        cfg, terms = self.config, self.terms
        mask, types = self._metadata(image, text, mask, types)
        step = self.step
        share = self.curriculum(step)
        b = self._gather(image, text, mask, types, share, step, mirrors)
        if self.bank is not None:
            self.bank.to(image.device)
        losses: dict[str, torch.Tensor | LoggedValue] = {}
        stats: dict[str, LoggedValue] = {"hn_curriculum": LoggedValue(share)}

        if terms & {"itc", "importance"}:
            image_rows, text_rows, image_columns, text_columns, labels = self._itc_rows(b)
            per_image, per_text = L.contrastive_logits(image_rows, text_rows, image_columns, text_columns,
                                                       b.all_negatives, b.used, logit_scale, logit_bias)
            per_image = self._hide_own_negatives(per_image, b, text_columns.shape[0])
            if "importance" in terms:
                min_logit = -logit_scale if logit_bias is None else logit_bias - logit_scale
                losses["contrastive_loss"] = L.importance_loss(
                    per_image, per_text, labels, cfg.importance_beta, cfg.importance_tau_plus, min_logit)
            else:
                losses["contrastive_loss"] = L.itc_loss(per_image, per_text, labels)
            losses["contrastive_loss"] = losses["contrastive_loss"] * self._mirror_row_share(b, labels)
        if "choice" in terms:
            losses["choice_loss"] = cfg.choice_weight * L.choice_loss(
                b.image, b.text, b.negatives, b.anchor_used, logit_scale)
        if "intra" in terms:
            losses["intra_loss"] = cfg.intra_weight * share * L.intra_loss(
                b.image, b.text, b.negatives, b.anchor_used, logit_scale)
        if "rank" in terms:
            margins = torch.cat([self.thresholds.values().to(image.device), image.new_zeros(1)])
            losses["rank_loss"] = cfg.rank_weight * share * L.rank_loss(
                b.image, b.text, b.negatives, b.anchor_used, margins[b.anchor_types])
            seen = self.thresholds.seen().to(image.device).float()
            stats["hn_rank_thr"] = LoggedValue((margins[:-1] * seen).sum() / seen.sum().clamp(min=1))
        if "mined" in terms:
            mined_text, text_valid, mined_image, image_valid = self._mined_features(b, share)
            losses["mined_loss"] = share * L.mined_loss(
                b.image, b.text, b.all_image, b.all_text, b.labels,
                mined_text, text_valid, mined_image, image_valid, logit_scale)
            stats["hn_mined"] = LoggedValue(text_valid.sum(dim=1).float().mean())
        if b.mirror_mask is not None:
            if cfg.mirror_weight > 0:
                losses["mirror_loss"] = cfg.mirror_weight * share * L.mirror_loss(
                    b.image, b.text, b.mirror_image, b.mirror_text, b.mirror_mask, logit_scale)
            stats["hn_mirrored"] = LoggedValue(b.all_mirror_mask.float().mean())
        if b.all_mask.shape[1]:
            stats["hn_negatives"] = LoggedValue(b.used.sum(dim=1).float().mean())
            stats["hn_masked"] = LoggedValue(1 - b.all_mask.float().mean())

        if torch.is_grad_enabled():
            if self.grad_calls % self.accum_freq == self.accum_freq - 1:
                self._end_of_step(b)
            self.grad_calls += 1
        return {**losses, **stats}

    @torch.no_grad()
    def _end_of_step(self, b: _Batch) -> None:
        """Once per optimizer step (last micro-batch call): fold the global batch into the state."""
        if "rank" in self.terms and b.all_mask.shape[1]:
            self.thresholds.update(L.rank_gaps(b.all_image, b.all_text, b.all_negatives), b.all_types, b.all_mask)
        if self.bank is not None:
            self.bank.push(b.all_image, b.all_text)

    # ------------------------------------------------------------------ state

    def state_dict(self, *args, **kwargs) -> dict[str, object]:
        """Everything a resumed run needs: step, memory bank and rank thresholds (CPU tensors)."""
        return {
            "step": self.step,
            "thresholds": self.thresholds.state_dict(),
            "bank": None if self.bank is None else self.bank.state_dict(),
        }

    def load_state_dict(self, state: dict[str, object], strict: bool = True, assign: bool = False) -> None:
        """Continue from `state_dict()`: the bank and thresholds resume exactly.

        The step stays the one given to the constructor: OpenCLIP's resumed epoch decides where
        the LR schedule restarts, and the curriculum must follow the same clock (a resume with
        another batch size or world size changes steps per epoch). The saved step is kept in
        `state["step"]` for the caller to compare.
        """
        self.grad_calls = 0
        self.thresholds.load_state_dict(state["thresholds"])
        if self.bank is not None and state.get("bank") is not None:
            self.bank.load_state_dict(state["bank"])
        elif self.bank is None and state.get("bank") is not None and strict:
            raise ValueError("the saved state has a memory bank but --hn-memory-bank-size is 0; "
                             "resume with the saved size or drop the state file")
