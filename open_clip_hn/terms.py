"""The loss-term registry: one decorated function per term, and everything else derives from it.

A term declares its name, what it needs (text negatives, a memory bank, mirrored pairs), whether
it has a weight flag (`--hn-<name>-weight`) and whether the curriculum scales it. From the
registry come `--hn-loss`'s choices and help, the weight flags, the cross-flag validation in
`config.py`, the objective's loop (`objective.py`) and README's term table
(`python -m open_clip_hn.terms` prints it). Adding a term is one decorated function plus its test:

    @register_term("my_term", summary="...", source="...", needs=("text_negatives",), weight=True)
    def my_term(b: TermBatch, ctx: TermContext) -> torch.Tensor:
        return L.my_pure_function(b.image, b.text, b.negatives, b.anchor_used, ctx.logit_scale)

A term function receives the gathered batch and the step's context and returns its unweighted
loss (or `(loss, stats)`, each stat a `LoggedValue`: a plain tensor would be summed into the
loss, so it is refused); the objective applies the weight and, where declared, the curriculum.
A package term with `weight=True` has its `<name>_weight` field in `HNConfig`; a term
registered from outside the package has no weight flag (scale inside the function) and is
registered before the trainer parses its flags (README: "Your own loss term").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

import torch

from . import losses as L

if TYPE_CHECKING:
    from .config import HNConfig
    from .curriculum import RankThresholds
    from .mirror import MirrorBatch


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


@dataclass(frozen=True)
class Need:
    """Something a term needs from the run, and the flags that provide it."""

    what: str
    fix: str
    provided: Callable[["HNConfig"], bool]


NEEDS = {
    "text_negatives": Need("text hard negatives", "add --hn-negatives online (or precomputed) "
                           "and --hn-num-negatives K >= 1", lambda c: c.uses_text_negatives),
    "bank": Need("a memory bank", "set --hn-memory-bank-size N > 0",
                 lambda c: c.memory_bank_size > 0),
    "mirrors": Need("mirrored pairs", "set --hn-mirror AXES", lambda c: bool(c.mirror)),
    "teacher": Need("a teacher model", "set --hn-distill frozen or ema", lambda c: c.distill != "none"),
}


@dataclass(frozen=True)
class TeacherFeatures:
    """The teacher's features of the ordinary batch (--hn-distill), gathered like the student's."""

    all_image: torch.Tensor  # [N, D]
    all_text: torch.Tensor   # [N, D] positive captions only
    image: torch.Tensor      # [A, D] the anchors' rows
    text: torch.Tensor       # [A, D]
    logit_scale: torch.Tensor


@dataclass
class TermBatch:
    """The global batch as the terms see it (after gathering and the curriculum's share)."""

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
    mirrors: "MirrorBatch | None" = None  # --hn-mirror's pairs, gathered
    all_blind: torch.Tensor | None = None  # [N, K] 1 where a text-only reader rejects the negative
    teacher: TeacherFeatures | None = None  # --hn-distill's teacher features, gathered
    token_scores: torch.Tensor | None = None  # [A, 1 + K] the anchors' token-level scores (local)


@dataclass(frozen=True)
class MinedNegatives:
    """Bank entries mined for each anchor, in both directions (features and validity)."""

    text: torch.Tensor        # [A, k, D]
    text_valid: torch.Tensor  # [A, k]
    image: torch.Tensor       # [A, k, D]
    image_valid: torch.Tensor  # [A, k]


@dataclass
class TermContext:
    """What a term may use besides the batch: scales, the config and the objective's state."""

    config: "HNConfig"
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None
    share: float                        # the curriculum's value at this step
    thresholds: "RankThresholds"        # per-type rank margins
    mine: Callable[[], MinedNegatives]  # search the memory bank for this batch's anchors


TermResult = Union[torch.Tensor, "tuple[torch.Tensor, dict[str, LoggedValue]]"]


@dataclass(frozen=True)
class Term:
    name: str
    compute: Callable[[TermBatch, TermContext], TermResult]
    summary: str
    source: str
    output: str                    # key of the loss in OpenCLIP's loss dict
    needs: tuple[str, ...] = ()
    weight: bool = False           # has --hn-<name>-weight (HNConfig.<name>_weight)
    weight_help: str = ""
    weight_default: float = 1.0    # 0: an automatic term that is off unless its weight is given
    curriculum: bool = False       # scaled by the curriculum's value
    selectable: bool = True        # chosen with --hn-loss; else on whenever its needs are met
    doc_name: str = ""             # how README's table names it
    reads: tuple[str, ...] = ()    # what it uses where the run has it, without needing it (itc)

    @property
    def uses_text_negatives(self) -> bool:
        return "text_negatives" in self.needs + self.reads

    @property
    def weight_field(self) -> str | None:
        return f"{self.name}_weight" if self.weight else None


TERMS: dict[str, Term] = {}


def register_term(name: str, *, summary: str, source: str, output: str | None = None,
                  needs: tuple[str, ...] = (), weight: bool = False, weight_help: str = "",
                  weight_default: float = 1.0, curriculum: bool = False, selectable: bool = True,
                  doc_name: str = "", reads: tuple[str, ...] = ()):
    """Decorator: register `fn(batch, ctx)` as the loss term `name` (see the module docstring)."""
    unknown = [n for n in needs + reads if n not in NEEDS]
    if unknown or name in TERMS:
        raise ValueError(f"term {name!r}: " + (f"unknown needs {unknown}; known: {list(NEEDS)}"
                                                if unknown else "registered twice"))
    config = getattr(sys.modules.get(__package__ + ".config"), "HNConfig", None)  # None: built-ins
    if weight and config is not None and f"{name}_weight" not in config.__dataclass_fields__:
        raise ValueError(f"term {name!r}: weight=True needs the field {name}_weight in HNConfig, "
                         "which only the package's own terms have; leave weight out and scale the "
                         "loss inside the term")

    def decorate(fn: Callable[[TermBatch, TermContext], TermResult]):
        TERMS[name] = Term(name, fn, summary, source, output or f"{name}_loss", needs, weight,
                           weight_help, weight_default, curriculum, selectable,
                           doc_name or f"`{name}`", reads)
        return fn

    return decorate


def selectable_terms() -> tuple[str, ...]:
    """`--hn-loss`'s choices, in registration order."""
    return tuple(name for name, term in TERMS.items() if term.selectable)


def active_terms(config: "HNConfig") -> tuple[Term, ...]:
    """The terms a run computes: those chosen with --hn-loss, then the automatic ones whose needs
    the config meets and whose weight is above 0."""
    chosen = set(config.loss)
    active = []
    for name, term in TERMS.items():
        if term.selectable:
            if name in chosen:
                active.append(term)
        elif all(NEEDS[n].provided(config) for n in term.needs) and weight_of(term, config) > 0:
            active.append(term)
    return tuple(active)


def weight_of(term: Term, config: "HNConfig") -> float:
    return getattr(config, term.weight_field) if term.weight else 1.0


def missing_needs(config: "HNConfig") -> list[str]:
    """One message per need that the terms chosen with --hn-loss have and the flags do not
    provide. (An automatic term's weight above 0 while its needs are off is a setting for a part
    that is off: `config.ignored_flags` refuses it where typed, and a recipe's is dropped.)"""
    messages = []
    for need_name, need in NEEDS.items():
        lacking = sorted(n for n in config.loss if need_name in TERMS[n].needs)
        if lacking and not need.provided(config):
            rest = [n for n in config.loss if n not in lacking]
            without = f", or leave {','.join(lacking)} out (--hn-loss {','.join(rest)})" if rest else ""
            messages.append(f"--hn-loss {','.join(lacking)} needs {need.what}; {need.fix}{without}")
    return messages


def loss_help() -> str:
    """`--hn-loss`'s help text."""
    parts = [f"{t.name} ({t.summary})" for t in TERMS.values() if t.selectable]
    return "Comma list of loss terms: " + ", ".join(parts) + ". Default: itc."


def markdown_table() -> str:
    """README's term table (a test keeps README equal to it)."""
    rows = ["| term | what it is | source | weight flag | scaled by the curriculum |",
            "| --- | --- | --- | --- | --- |"]
    for t in TERMS.values():
        flag = f"`--hn-{t.name}-weight`" if t.weight else ""
        rows.append(f"| {t.doc_name} | {t.summary} | {t.source} | {flag} | "
                    f"{'yes' if t.curriculum else ''} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- the terms


def _itc_logits(b: TermBatch, ctx: TermContext):
    """itc's logits, with the mirrored pairs as extra pairs; and the row share that makes the
    ranks' means average to the global loss."""
    image, text, image_columns, text_columns, labels = b.image, b.text, b.all_image, b.all_text, b.labels
    if b.mirrors is not None:
        image, text, image_columns, text_columns, labels = b.mirrors.itc_rows(
            image, text, image_columns, text_columns, labels)
    per_image, per_text = L.contrastive_logits(image, text, image_columns, text_columns,
                                               b.all_negatives, b.used, ctx.logit_scale, ctx.logit_bias)
    share = 1.0
    if b.mirrors is not None:
        per_image = b.mirrors.hide_own_negatives(per_image, b.labels, b.all_negatives.shape[1],
                                                 text_columns.shape[0])
        share = b.mirrors.row_share(b.image.shape[0], labels.shape[0])
    return per_image, per_text, labels, share


@register_term("itc", output="contrastive_loss", source="NegCLIP", reads=("text_negatives",),
               summary="InfoNCE; image→text over all positives and all valid hard negatives of "
                       "every rank, text→image over positives")
def itc(b: TermBatch, ctx: TermContext) -> torch.Tensor:
    per_image, per_text, labels, share = _itc_logits(b, ctx)
    c = ctx.config
    if c.label_smoothing or c.focal_gamma:
        return L.softened_itc_loss(per_image, per_text, labels, c.label_smoothing, c.focal_gamma) * share
    return L.itc_loss(per_image, per_text, labels) * share


@register_term("clip", output="contrastive_loss",
               source="OpenCLIP's ClipLoss (FSC-CLIP keeps its hard negatives out of it)",
               summary="OpenCLIP's InfoNCE over the ordinary batch only: text negatives and "
                       "mirrored pairs train through their own terms, never the retrieval "
                       "objective (in place of itc)")
def clip(b: TermBatch, ctx: TermContext) -> torch.Tensor:
    no_negatives = b.all_negatives[:, :0]
    per_image, per_text = L.contrastive_logits(b.image, b.text, b.all_image, b.all_text, no_negatives,
                                               b.used[:, :0], ctx.logit_scale, ctx.logit_bias)
    return L.itc_loss(per_image, per_text, b.labels)


@register_term("choice", weight=True, needs=("text_negatives",), source="this plugin",
               summary="per image, a softmax over its own caption and that caption's valid "
                       "negatives")
def choice(b: TermBatch, ctx: TermContext) -> torch.Tensor:
    c = ctx.config
    image, text, negatives = b.image, b.text, b.negatives
    if c.choice_grad == "image":  # --hn-choice-grad: the captions are constants here
        text, negatives = text.detach(), negatives.detach()
    elif c.choice_grad == "text":
        image = image.detach()
    if c.label_smoothing or c.focal_gamma:
        return L.softened_choice_loss(image, text, negatives, b.anchor_used, ctx.logit_scale,
                                      c.label_smoothing, c.focal_gamma)
    return L.choice_loss(image, text, negatives, b.anchor_used, ctx.logit_scale)


@register_term("local", weight=True, needs=("text_negatives",), source="FSC-CLIP (local HN loss)",
               weight_help="FSC-CLIP's local hard-negative loss (its COCO recipe: 0.2); needs "
                           "OpenCLIP's ViT image tower and built-in text tower",
               summary="choice scored token by token: each caption token against the image patches "
                       "it matches most, log-sum-exp over the tokens; per image a softmax over its "
                       "caption and that caption's valid negatives (OpenCLIP's ViT)")
def local(b: TermBatch, ctx: TermContext) -> torch.Tensor:
    if ctx.share == 0:
        return b.image.new_zeros(())  # the curriculum's warmup: no negative is used
    if b.token_scores is None:
        raise ValueError("--hn-loss local: the model output has no token features; attach them "
                         "with HardNegativeRun.model_created (token_features.attach_token_hooks) "
                         "or pass PackedOutputs(image_tokens=..., text_tokens=..., "
                         "text_token_mask=...)")
    c = ctx.config
    return L.local_choice_loss(b.token_scores, b.anchor_used, c.label_smoothing, c.focal_gamma)


@register_term("intra", weight=True, curriculum=True, needs=("text_negatives",),
               source="CE-CLIP (IMC)", weight_help="CE-CLIP IMC",
               summary="each caption against every hard negative of the batch in text space, "
                       "its image the positive")
def intra(b: TermBatch, ctx: TermContext) -> torch.Tensor:
    return L.intra_loss(b.image, b.text, b.all_negatives, b.used, ctx.logit_scale)


@register_term("rank", weight=True, curriculum=True, needs=("text_negatives",),
               source="CE-CLIP (CMR)", weight_help="CE-CLIP CMR",
               summary="hinge relu(thr_type + s(I,T_neg) − s(I,T)) in logits, per-type margins set "
                       "each step from the observed gaps")
def rank(b: TermBatch, ctx: TermContext) -> TermResult:
    margins = torch.cat([ctx.thresholds.values().to(b.image.device), b.image.new_zeros(1)])
    loss = L.rank_loss(b.image, b.text, b.negatives, b.anchor_used, margins[b.anchor_types],
                       ctx.logit_scale)
    seen = ctx.thresholds.seen().to(b.image.device).float()
    return loss, {"hn_rank_thr": LoggedValue((margins[:-1] * seen).sum() / seen.sum().clamp(min=1))}


@register_term("importance", output="contrastive_loss", source="HCL / DiHT", reads=("text_negatives",),
               summary="negatives reweighted ∝ exp(β·s·cos), s the logit scale, with debiasing τ⁺ "
                       "(in place of itc)")
def importance(b: TermBatch, ctx: TermContext) -> torch.Tensor:
    per_image, per_text, labels, share = _itc_logits(b, ctx)
    scale, bias, c = ctx.logit_scale, ctx.logit_bias, ctx.config
    min_logit = (-scale if bias is None else bias - scale).detach()  # a constant, as HCL's e^{-1/t}
    return L.importance_loss(per_image, per_text, labels, c.importance_beta, c.importance_tau_plus,
                             min_logit) * share


@register_term("mined", curriculum=True, needs=("bank",), source="CM-HNCo",
               summary="negatives from a memory bank of all ranks' recent embeddings: close to the "
                       "anchor in one modality, far in the other; false negatives filtered. Its own "
                       "InfoNCE over the ordinary batch with each anchor's mined entries added to "
                       "the denominators, so beside itc the batch's contrast counts twice")
def mined(b: TermBatch, ctx: TermContext) -> TermResult:
    found = ctx.mine()
    loss = L.mined_loss(b.image, b.text, b.all_image, b.all_text, b.labels, found.text,
                        found.text_valid, found.image, found.image_valid, ctx.logit_scale)
    return loss, {"hn_mined": LoggedValue(found.text_valid.sum(dim=1).float().mean())}


@register_term("mirror", weight=True, curriculum=True, needs=("mirrors",), selectable=False,
               source="this plugin (image-side negatives, cf. NegCLIP's hard image negatives)",
               doc_name="`mirror` (`--hn-mirror`)",
               weight_help="each image picks its caption over the mirrored one, each caption picks "
                           "its image over the mirrored one (and the same for the mirrored pair). "
                           "Scaled by the curriculum, whose share also decides which mirrored pairs "
                           "are used; 0 turns the term off (the pairs still join itc)",
               summary="per sample with a relation word, 2-way choices between the pair and its "
                       "mirrored pair (flipped image, caption with left↔right or above↔below "
                       "exchanged), in both directions; the mirrored pair also joins itc as one "
                       "more pair")
def mirror(b: TermBatch, ctx: TermContext) -> TermResult:
    m = b.mirrors
    loss = L.mirror_loss(b.image, b.text, m.image, m.text, m.used, ctx.logit_scale)
    if ctx.share == 0:
        return loss  # no pair is used (curriculum warmup): nothing to score
    # the loss is diluted by the unused rows, the weight and the curriculum; this is not. Over the
    # gathered batch, so every rank logs the global value
    return loss, {"hn_mirror_acc": LoggedValue(
        L.mirror_choice_accuracy(b.all_image, b.all_text, m.all_image, m.all_text, m.all_used))}


@register_term("converse", weight=True, weight_default=0.0, needs=("mirrors",), selectable=False,
               source="this plugin", doc_name="`converse` (`--hn-converse-weight`)",
               weight_help="text only: each caption picks its converse over the mirrored caption "
                           "and that caption's converse. Breaks the plateau where the text tower "
                           "cannot tell a caption from its mirrored caption, so the mirror term's "
                           "choices stay at ln 2 (README, 'Converse captions'). Not scaled by the "
                           "curriculum; needs --hn-mirror; 0 turns it off",
               summary="per caption with a mirrored pair, a 3-way choice in text space: its converse "
                       "(the relation's two objects exchanged in the mirrored caption, the same "
                       "scene) over the mirrored caption and the mirrored caption's converse; and "
                       "the same for the mirrored caption")
def converse(b: TermBatch, ctx: TermContext) -> TermResult:
    m = b.mirrors
    if m.converse is None:
        return b.text.new_zeros(())  # a caller's own loop without converse captions
    loss = L.converse_loss(b.text, m.text, m.converse, m.converse_used, ctx.logit_scale,
                           ctx.config.converse_margin)
    # over the gathered batch, so every rank logs the global value
    return loss, {"hn_converse_acc": LoggedValue(
        L.converse_accuracy(b.all_text, m.all_text, m.all_converse, m.all_converse_used))}


@register_term("distill", weight=True, needs=("teacher",), selectable=False,
               source="DeGLA (EMA self-distillation), CLIP-KD", doc_name="`distill` (`--hn-distill`)",
               weight_help="KL from the teacher's image<->text similarity distribution over the "
                           "ordinary batch to the student's (--hn-distill none turns it off)",
               summary="the student's image→text and text→image softmax over the ordinary batch "
                       "(positives only, each model's own logit scale) matches a frozen or EMA "
                       "teacher's (KL, both directions): keeps retrieval while the other terms "
                       "teach composition")
def distill(b: TermBatch, ctx: TermContext) -> torch.Tensor:
    t = b.teacher
    return L.distill_loss(b.image, b.text, b.all_image, b.all_text, t.image, t.text, t.all_image,
                          t.all_text, ctx.logit_scale, t.logit_scale)


if __name__ == "__main__":
    print(markdown_table())
