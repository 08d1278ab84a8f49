"""--hn-distill's teacher: a frozen or EMA copy of the model being continued.

The teacher encodes the same images and positive captions as the student, under no_grad, in a
forward hook on the student (`attach_teacher`), and its features ride in the model's output
dict (`packing.PackedOutputs`) to the objective's one gather and the `distill` term. Riding in
the output dict is what lets them survive OpenCLIP's `--accum-freq` path (it concatenates every
output value along the batch) and stay glued to their samples across ranks.

The EMA update runs once per optimizer step from the objective's end-of-step (the last
micro-batch's loss call, i.e. *before* that step's optimizer update): the teacher used at step t
averages the student's weights up to step t-1, a one-step lag.

State: the teacher's weights are saved in both modes. For `frozen` they are the weights the run
started from, which a resumed run can no longer rebuild from its checkpoint (that holds the
student's), so they are saved rather than re-derived from `--pretrained` (which a resume
without the saved teacher falls back to: `HardNegativeRun._restore_teacher`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .packing import PackedOutputs, unpack_texts

TEACHER_MODES = ("frozen", "ema")


class Teacher:
    """A frozen (`frozen`) or moving-average (`ema`) copy of `student`, never trained."""

    def __init__(self, student: torch.nn.Module, mode: str, decay: float = 0.999):
        if mode not in TEACHER_MODES:
            raise ValueError(f"--hn-distill {mode!r}: use one of {', '.join(TEACHER_MODES)}")
        if not 0 <= decay < 1:
            raise ValueError(f"--hn-distill-ema-decay must be in [0, 1), got {decay}")
        self.mode, self.decay, self.updates = mode, decay, 0
        self.student = student
        self.module = _hookless_copy(student)

    def reset_from_student(self) -> None:
        """Make the teacher the student's current weights (a resume without a saved teacher)."""
        self.module.load_state_dict(self.student.state_dict())
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step toward the student's current weights (nothing for a frozen teacher)."""
        if self.mode != "ema":
            return
        student = self.student.state_dict()
        for name, value in self.module.state_dict().items():
            source = student[name].to(value.device)
            if value.is_floating_point():
                value.lerp_(source.to(value.dtype), 1 - self.decay)
            else:
                value.copy_(source)
        self.updates += 1

    @torch.no_grad()
    def features(self, images: torch.Tensor, tokens: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features and the teacher's logit scale (exp'd)."""
        image = self.module.encode_image(images, normalize=True)
        text = self.module.encode_text(tokens, normalize=True)
        return image, text, self.module.logit_scale.exp()

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "decay": self.decay, "updates": self.updates,
                "weights": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the saved teacher; refuses another mode, other shapes or non-finite weights."""
        if state.get("mode") != self.mode:
            raise ValueError(f"the saved teacher is --hn-distill {state.get('mode')!r} but this run "
                             f"uses {self.mode!r}; resume with the saved mode")
        weights = state["weights"]
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"the saved teacher has non-finite weights ({', '.join(bad[:3])}), so it "
                             "cannot be resumed")
        try:
            self.module.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"the saved teacher does not fit this model ({err}); resume with the "
                             "model it was saved with") from None
        self.updates = int(state.get("updates", 0))


def _hookless_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of `model` in eval mode, without the hooks attached to `model`."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_backward_hooks", "_backward_pre_hooks"):
            if isinstance(getattr(module, hooks, None), dict):
                getattr(module, hooks).clear()
    clone.requires_grad_(False)
    return clone.eval()


def attach_teacher(model: torch.nn.Module, teacher: Teacher, num_negatives: int,
                   mirror: bool = False, converse: bool = False) -> None:
    """Add the teacher's features of each training forward to the model's output dict.

    A pre-hook placed before the packing hooks keeps the forward's own images and text rows; a
    forward hook (registered after the packing hooks, so it runs after them) encodes the images
    and the positive captions with the teacher. Only in training mode: evaluation forwards pay
    nothing.
    """
    pending: dict[str, Any] = {}

    def keep_inputs(module, args, kwargs):
        pending.clear()
        if module.training:
            pending["image"] = args[0] if args else kwargs.get("image")
            pending["text"] = args[1] if len(args) > 1 else kwargs.get("text")

    def add_features(module, args, kwargs, output):
        image, text = pending.pop("image", None), pending.pop("text", None)
        if not isinstance(output, dict) or not isinstance(image, torch.Tensor) \
                or not isinstance(text, torch.Tensor):
            return output
        unpacked = unpack_texts(text, num_negatives, mirror, converse)
        if unpacked is not None:
            text = unpacked.tokens.view(image.shape[0], 1 + num_negatives, -1)[:, 0]
        features, captions, scale = teacher.features(image, text.to(image.device))
        return PackedOutputs(teacher_image=features, teacher_text=captions,
                             teacher_logit_scale=scale.reshape(1).expand(image.shape[0])).write(output)

    model.register_forward_pre_hook(keep_inputs, with_kwargs=True, prepend=True)
    model.register_forward_hook(add_features, with_kwargs=True)
