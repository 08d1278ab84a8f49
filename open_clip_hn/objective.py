"""The hard-negative objective OpenCLIP's train step calls in place of `ClipLoss`.

`HardNegativeLoss` is the stateful edge around the pure terms of `losses.py`: it reads what the
model hooks added (`packing.PackedOutputs`), gathers the batch across ranks once
(`distributed.py`, `mirror.gather_mirrors`), applies the curriculum, loops over the registered
terms (`terms.py`), and — once per optimizer step — updates the bank and the rank thresholds.
Its `state_dict()` holds everything a resumed run needs to continue where it stopped.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import losses as L
from .config import HNConfig
from .curriculum import RankThresholds, curriculum_value, negative_keep_mask, warmup_steps
from .distributed import gather_rows
from .memory_bank import MemoryBank
from .miner import mine
from .mirror import MirrorPairs, gather_mirrors
from .packing import PackedOutputs
from .terms import (LoggedValue, MinedNegatives, TeacherFeatures, TermBatch, TermContext, active_terms,
                    weight_of)


class HardNegativeLoss(torch.nn.Module):
    """Sum of the `--hn-loss` terms; keys of the returned dict follow OpenCLIP's `*_loss` naming.

    Distributed semantics are ClipLoss's: without `local_loss` every rank computes the loss of the
    whole global batch; with it, each rank averages over its own anchors against all gathered
    columns. `gather_with_grad` makes the gather differentiable; without it, under `local_loss`,
    this rank's hard negatives keep the gradient from this rank's anchors (ClipLoss keeps no
    column's, and a negative is never an anchor).
    """

    def __init__(self, config: HNConfig, *, rank: int = 0, world_size: int = 1, local_loss: bool = False,
                 gather_with_grad: bool = False, accum_freq: int = 1, start_step: int = 0,
                 total_steps: int | None = None, on_step_end: Callable[[], None] | None = None):
        """`on_step_end` runs once per optimizer step, after the objective's own update (the
        run's EMA teacher, `teacher.py`)."""
        super().__init__()
        config.check_values()  # a config built in code: term names, types and ranges checked
        if accum_freq < 1:
            raise ValueError(f"accum_freq must be >= 1, got {accum_freq}")
        warmup_steps(config.curriculum_warmup, total_steps)  # a share needs the run's length
        self.config = config
        self.terms = active_terms(config)
        self.rank = rank
        self.world_size = world_size
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.accum_freq = accum_freq
        self.total_steps = total_steps
        self.start_step = start_step
        self.grad_calls = 0
        self.negative_counts = torch.zeros(2, dtype=torch.long)  # [slots, valid] since last taken
        # [rows, mirrored pairs used, converse pairs used] of steps whose share was above 0
        self.mirror_counts = torch.zeros(3, dtype=torch.long)
        self.mined_counts = torch.zeros(2, dtype=torch.long)  # [slots searched, valid] since last taken
        self.on_step_end = on_step_end
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
                packed: PackedOutputs | None = None, logit_bias: torch.Tensor | None = None,
                output_dict: bool = False, **model_outputs):
        """OpenCLIP calls `loss(**model_out, output_dict=True)`: what the model hooks added is read
        from `model_outputs`. Your own loop may pass it as `packed` instead."""
        from_outputs = PackedOutputs.read(model_outputs)
        if packed is not None and not from_outputs.empty:
            raise ValueError("hard-negative outputs given twice: as `packed` and as model output keys")
        packed = from_outputs if packed is None else packed
        mirrors = None if packed.mirrors is None else packed.mirrors.float()
        teacher = None
        if packed.teacher_image is not None:
            teacher = (packed.teacher_image.float(), packed.teacher_text.float(),
                       packed.teacher_logit_scale.float()[0])
        tokens = None
        if packed.image_tokens is not None:
            tokens = (packed.image_tokens.float(), packed.text_tokens.float(), packed.text_token_mask)
        # the terms run in fp32 even under bf16/fp16 autocast: -inf masks and logsumexp need the range
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            losses = self._losses(image_features.float(), text_features.float(), logit_scale.float(),
                                  packed.neg_mask, packed.neg_types,
                                  None if logit_bias is None else logit_bias.float(), mirrors,
                                  packed.neg_blind, teacher, tokens)
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
                share: float, step: int, mirrors: MirrorPairs | None = None,
                blind: torch.Tensor | None = None,
                teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> TermBatch:
        batch, dim = image.shape
        if self.config.negative_grad == "none":
            text = L.fix_negatives(text, batch)
        positives, negatives = L.split_text_features(text, batch)
        k = negatives.shape[1]
        if blind is not None:
            blind = blind.to(types.device, torch.long)
        teacher_all = None if teacher is None else teacher[:2]
        if self.world_size == 1:
            all_image, all_text, all_negatives, all_mask, all_types = image, positives, negatives, mask, types
            all_blind = blind
        else:
            parts = [image.unsqueeze(1), text.view(batch, 1 + k, dim)]
            if teacher is not None:  # the teacher's rows ride in the same gather (constants)
                parts += [teacher[0].unsqueeze(1), teacher[1].unsqueeze(1)]
            grouped = torch.cat(parts, dim=1)
            gathered = gather_rows(grouped, rank=self.rank, world_size=self.world_size,
                                   with_grad=self.gather_with_grad, keep_local_grad=not self.local_loss)
            all_image, all_text, all_negatives = gathered[:, 0], gathered[:, 1], gathered[:, 2:2 + k]
            if self.local_loss and not self.gather_with_grad:
                # OpenCLIP's local loss keeps no column's gradient: a positive still learns as an
                # anchor, but a hard negative is only ever a column, so this rank's negatives
                # keep their gradient from this rank's anchors
                all_negatives = torch.cat([all_negatives[:self.rank * batch], negatives,
                                           all_negatives[(self.rank + 1) * batch:]])
            if teacher is not None:
                teacher_all = (gathered[:, 2 + k].detach(), gathered[:, 3 + k].detach())
            columns = [mask.long(), types] + ([] if blind is None else [blind])
            meta = gather_rows(torch.stack(columns, dim=1), rank=self.rank,
                               world_size=self.world_size)
            all_mask, all_types = meta[:, 0].bool(), meta[:, 1]
            all_blind = None if blind is None else meta[:, 2]
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
        gathered_mirrors = None
        if mirrors is not None:
            # its own stream (seed + 1): the kept mirrors do not follow the kept text negatives
            keep = negative_keep_mask((all_image.shape[0], 1), share, seed=self.config.seed + 1,
                                      step=step, device=all_mask.device)[:, 0]
            gathered_mirrors = gather_mirrors(mirrors, keep, rank=self.rank, world_size=self.world_size,
                                              local=local, with_grad=self.gather_with_grad)
        gathered_teacher = None
        if teacher_all is not None:
            rows = slice(self.rank * batch, (self.rank + 1) * batch) if local else slice(None)
            gathered_teacher = TeacherFeatures(teacher_all[0], teacher_all[1], teacher_all[0][rows],
                                               teacher_all[1][rows], teacher[2])
        return TermBatch(all_image, all_text, all_negatives, all_mask, all_types, used, *anchors, labels,
                         mirrors=gathered_mirrors, all_blind=all_blind, teacher=gathered_teacher)

    def _token_scores(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                      token_mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """The anchors' token-level scores [A, 1 + K]: each rank scores its own samples (a
        caption only meets its own image), then the rows are gathered like the features."""
        if not bool(token_mask[:, 0].any(dim=-1).all()):
            raise ValueError("--hn-loss local: a positive caption has no token to score (its row "
                             "of hn_text_token_mask is all False); every caption needs at least "
                             "its end-of-text token")
        if self.config.negative_grad == "none":  # as for the negatives' pooled features
            text_tokens = torch.cat([text_tokens[:, :1], text_tokens[:, 1:].detach()], dim=1)
        scores = L.local_alignment_scores(image_tokens, text_tokens,
                                          token_mask.to(image_tokens.device, torch.bool), logit_scale)
        if self.world_size == 1 or self.local_loss:
            return scores
        return gather_rows(scores, rank=self.rank, world_size=self.world_size,
                           with_grad=self.gather_with_grad, keep_local_grad=True)

    def _mine(self, b: TermBatch, share: float) -> MinedNegatives:
        anchors, dim, k = b.image.shape[0], b.image.shape[1], self.config.mined_k
        if self.bank is None or len(self.bank) == 0 or share <= 0:
            zeros = b.image.new_zeros(anchors, k, dim)
            invalid = torch.zeros(anchors, k, dtype=torch.bool, device=b.image.device)
            return MinedNegatives(zeros, invalid, zeros, invalid)
        found = mine(b.image, b.text, self.bank.entries(), k, self.config.false_negative_threshold,
                     self.config.miner_backend)
        if torch.is_grad_enabled():
            self.mined_counts = self.mined_counts.to(found.text_valid.device)  # no host sync per step
            self.mined_counts[0] += found.text_valid.numel() + found.image_valid.numel()
            self.mined_counts[1] += found.text_valid.sum() + found.image_valid.sum()
        texts, images = self.bank.texts(), self.bank.images()
        return MinedNegatives(texts[found.text_index].float(), found.text_valid,
                              images[found.image_index].float(), found.image_valid)

    def _losses(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                mask: torch.Tensor | None, types: torch.Tensor | None,
                logit_bias: torch.Tensor | None, mirrors: MirrorPairs | None = None,
                blind: torch.Tensor | None = None,
                teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor | LoggedValue]:
        mask, types = self._metadata(image, text, mask, types)
        if teacher is None and any("teacher" in t.needs for t in self.terms):
            raise ValueError("--hn-distill: the model output has no teacher features; attach the "
                             "teacher with HardNegativeRun.model_created (teacher.attach_teacher) "
                             "or pass PackedOutputs(teacher_image=..., teacher_text=..., "
                             "teacher_logit_scale=...)")
        step = self.step
        share = self.curriculum(step)
        b = self._gather(image, text, mask, types, share, step, mirrors, blind, teacher)
        if tokens is not None and self.config.uses_tokens and share > 0:  # nothing used at share 0
            b.token_scores = self._token_scores(*tokens, logit_scale)
        if self.bank is not None:
            self.bank.to(image.device)
        ctx = TermContext(self.config, logit_scale, logit_bias, share, self.thresholds,
                          mine=lambda: self._mine(b, share))
        losses: dict[str, torch.Tensor | LoggedValue] = {}
        stats: dict[str, LoggedValue] = {"hn_curriculum": LoggedValue(share)}
        for term in self.terms:
            if "mirrors" in term.needs and b.mirrors is None:
                continue  # a batch without mirrored pairs (e.g. a caller's own loop)
            result = term.compute(b, ctx)
            value, term_stats = result if isinstance(result, tuple) else (result, {})
            plain = [key for key, stat in term_stats.items() if not isinstance(stat, LoggedValue)]
            if plain:  # a plain tensor in the loss dict is summed into the loss OpenCLIP trains on
                raise TypeError(f"loss term {term.name!r} returned statistic(s) {plain} that are not "
                                "terms.LoggedValue: wrap each as LoggedValue(value), or OpenCLIP adds "
                                "them to the loss")
            factor = weight_of(term, self.config) * (share if term.curriculum else 1.0)
            losses[term.output] = factor * value
            stats.update(term_stats)
        if b.mirrors is not None:
            stats["hn_mirrored"] = LoggedValue(b.mirrors.all_used.float().mean())
        if b.all_mask.shape[1]:
            stats["hn_negatives"] = LoggedValue(b.used.sum(dim=1).float().mean())
            stats["hn_masked"] = LoggedValue(1 - b.all_mask.float().mean())
            if b.all_blind is not None and self.config.plausibility is not None:  # the shortcut's share
                known = b.all_mask & (b.all_blind >= 0)
                rejected = known & (b.all_blind == 1)
                stats["hn_blind"] = LoggedValue(rejected.sum() / known.sum().clamp(min=1))

        if torch.is_grad_enabled():
            if self.grad_calls % self.accum_freq == self.accum_freq - 1:
                self._end_of_step(b, logit_scale, share)
            self.grad_calls += 1
        return {**losses, **stats}

    def take_negative_counts(self) -> tuple[int, int]:
        """(negative slots, valid negatives) seen by optimizer steps since the last call."""
        slots, valid = (int(v) for v in self.negative_counts.tolist())
        self.negative_counts.zero_()
        return slots, valid

    def take_mirror_counts(self) -> tuple[int, int, int]:
        """(rows, mirrored pairs used, converse pairs used) of the optimizer steps since the last
        call whose curriculum share was above 0 (the warmup uses none by design)."""
        rows, mirrored, converse = (int(v) for v in self.mirror_counts.tolist())
        self.mirror_counts.zero_()
        return rows, mirrored, converse

    def take_mined_counts(self) -> tuple[int, int]:
        """(bank slots searched, valid mined negatives) since the last call; searches of an empty
        bank or at a curriculum share of 0 are not counted."""
        slots, valid = (int(v) for v in self.mined_counts.tolist())
        self.mined_counts.zero_()
        return slots, valid

    @torch.no_grad()
    def _end_of_step(self, b: TermBatch, logit_scale: torch.Tensor, share: float) -> None:
        """Once per optimizer step (last micro-batch call): fold the global batch into the state."""
        self.negative_counts = self.negative_counts.to(b.all_mask.device)  # no host sync per step
        self.negative_counts[0] += b.all_mask.numel()
        self.negative_counts[1] += b.all_mask.sum()
        if b.mirrors is not None and share > 0:
            m = b.mirrors
            self.mirror_counts = self.mirror_counts.to(m.all_used.device)
            self.mirror_counts[0] += m.all_used.numel()
            self.mirror_counts[1] += m.all_used.sum()
            if m.all_converse_used is not None:
                self.mirror_counts[2] += m.all_converse_used.sum()
        if any(t.name == "rank" for t in self.terms) and b.all_mask.shape[1]:
            gaps = L.rank_gaps(b.all_image, b.all_text, b.all_negatives, logit_scale)
            self.thresholds.update(gaps, b.all_types, b.all_mask)
        if self.bank is not None:
            self.bank.push(b.all_image, b.all_text)
        if self.on_step_end is not None:
            self.on_step_end()

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
                             "resume with the saved size")
