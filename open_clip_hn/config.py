"""The plugin's flags and the one frozen config they become.

Configuration flows one way: `add_hn_arguments` defines the `--hn-*` flags, `HNConfig.from_args`
validates them into a frozen dataclass, and components receive that dataclass (never `args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .argtypes import (argparse_type, cosine, decay, non_negative_float, non_negative_int, optional_path,
                       path_value, unit_float)
from .curriculum import parse_warmup
from .mirror import FLIP_COLOUR_AXES, parse_axes
from .negatives.taxonomy import LM_TYPES, NEGATIVE_TYPES, SWAP_TYPES, parse_types
from .recipes import ListRecipesAction, flag_actions, spell_out_flags
from .sample_order import SAMPLE_SHUFFLE_MODES
from .terms import TERMS, active_terms, loss_help, missing_needs, selectable_terms

NEGATIVE_SOURCES = ("none", "online", "precomputed")
CURRICULA = ("const", "linear", "cosine", "step")
MINER_BACKENDS = ("torch", "faiss")
RANK_THRESHOLD_MODES = ("adaptive-mean", "adaptive-max")
DISTILL_TEACHERS = ("none", "frozen", "ema")
CHOICE_GRAD_MODES = ("both", "image", "text")
# Flags whose default is not the behaviour before they existed: a saved run older than the flag
# ran with this value (named when a resume changes it; run.HardNegativeRun._warn_config_changes).
BEHAVIOUR_BEFORE_FLAG = {"sample_shuffle": "process"}
TRAIN_DATA_VOCABULARY = "train-data"  # --hn-vocabulary: the words of the training captions


def _loss_terms(value: str) -> tuple[str, ...]:
    terms = tuple(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    known = selectable_terms()
    unknown = [t for t in terms if t not in known]
    if not terms or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown loss term(s) {', '.join(unknown) or '(empty)'}; "
            f"use a comma list of: {', '.join(known)}"
        )
    return terms


def _rank_threshold(value: str) -> str:
    if value in RANK_THRESHOLD_MODES:
        return value
    try:
        non_negative_float(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected {' or '.join(RANK_THRESHOLD_MODES)} or a fixed margin >= 0, got {value!r}"
        ) from None
    return value


# HNConfig fields that record how the flags were given, not a setting (not compared on resume)
BOOKKEEPING_FIELDS = ("given", "typed", "dropped")


def flag_of(field: str) -> str:
    """The command-line flag of an `HNConfig` field (`config_file` is `--hn-config`)."""
    return "--hn-config" if field == "config_file" else "--hn-" + field.replace("_", "-")


@dataclass(frozen=True)
class HNConfig:
    """Every plugin setting, validated. Built once from the flags; read-only afterwards."""

    negatives: str = "none"
    num_negatives: int = 4
    types: tuple[str, ...] = NEGATIVE_TYPES
    loss: tuple[str, ...] = ("itc",)
    seed: int = 0
    lm: str | None = None
    vocabulary: str | None = None  # word file or 'train-data': the words negatives may bring in
    plausibility: str | None = None  # caption file, saved model or 'train-data': the plausibility filter's model
    swap_reorders: str = "keep"  # keep | drop: swap negatives that only reorder the noun phrases
    exclude_negatives: str | None = None  # evaluation folder or caption file: never a negative
    negative_grad: str = "full"  # full | none: whether the text negatives' features carry gradient
    choice_grad: str = "both"  # both | image | text: the tower(s) the choice term trains
    # objectives
    # `<term>_weight` for each term registered with a weight (terms.py; a test checks the pairing)
    choice_weight: float = 1.0
    local_weight: float = 1.0
    intra_weight: float = 1.0
    rank_weight: float = 1.0
    rank_threshold: str = "adaptive-mean"
    importance_beta: float = 0.5
    importance_tau_plus: float = 0.0
    memory_bank_size: int = 0
    memory_bank_fp16: bool = False
    mined_k: int = 16
    false_negative_threshold: float = 0.9
    miner_backend: str = "torch"
    # mirrored image pairs (image-side negatives for spatial relations)
    mirror: tuple[str, ...] = ()
    mirror_weight: float = 1.0
    converse_weight: float = 0.0
    converse_margin: float = 0.0
    # capability-preserving distillation and softer hard-negative terms (issue 21)
    distill: str = "none"
    distill_weight: float = 1.0
    distill_ema_decay: float = 0.999
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0
    # curriculum
    curriculum: str = "const"
    curriculum_warmup: int | str = 0  # optimizer steps, or a share of them ('12.5%')
    curriculum_start: float = 1.0
    curriculum_end: float = 1.0
    # recipes, image neighbours, evaluation
    config_file: str | None = None
    image_neighbors: str | None = None
    image_neighbors_per_sample: int = 1
    eval_compositional: str | None = None
    eval_every: int = 1
    # checkpoints inside an epoch (preemption.py), resuming
    save_every_steps: int = 0
    drop_state: bool = False
    sample_shuffle: str = "seeded"
    # bookkeeping filled by the hooks, not by flags: the --hn-* flags of the run (recipe and
    # command line), those typed on the command line itself, and the recipe's settings put back
    # at their defaults because the command line switched their part off ("--flag value")
    given: tuple[str, ...] = field(default=(), compare=False)
    typed: tuple[str, ...] = field(default=(), compare=False)
    dropped: tuple[str, ...] = field(default=(), compare=False)

    @property
    def enabled(self) -> bool:
        """True when any `--hn-*` flag was given: only then does the plugin change the run."""
        return bool(self.given)

    @property
    def uses_text_negatives(self) -> bool:
        return self.negatives != "none" and self.num_negatives > 0

    @property
    def uses_tokens(self) -> bool:
        """True when a chosen term scores captions token by token (`local`, token_features.py)."""
        return "local" in self.loss

    @property
    def packed_negatives(self) -> int:
        """Negative slots K in each packed row (0 when only the mirrored caption is packed)."""
        return self.num_negatives if self.uses_text_negatives else 0

    @property
    def packs_texts(self) -> bool:
        """Train captions travel packed (with negatives and/or the mirrored caption)."""
        return self.uses_text_negatives or bool(self.mirror)

    @property
    def packs_converse(self) -> bool:
        """Packed rows also carry the converse captions (the converse term is on)."""
        return bool(self.mirror) and self.converse_weight > 0

    @property
    def generates_negatives(self) -> bool:
        """Text negatives are generated in the loader (online), not read from shards."""
        return self.negatives == "online" and self.uses_text_negatives

    @property
    def phrases_mirrors(self) -> bool:
        """The loader phrases captions for the mirror term: converse captions, or the composed
        axes' (horizontal+colour, vertical+colour)."""
        return self.packs_converse or bool(set(self.mirror) & set(FLIP_COLOUR_AXES))

    @property
    def parses_captions(self) -> bool:
        """The loader parses captions (WordNet and a POS tagger)."""
        return self.generates_negatives or self.phrases_mirrors

    @property
    def fixed_rank_threshold(self) -> float | None:
        return None if self.rank_threshold in RANK_THRESHOLD_MODES else float(self.rank_threshold)

    @classmethod
    def from_args(cls, args: argparse.Namespace, recipe: "HNConfig | None" = None) -> "HNConfig":
        """Build the config from a namespace produced by a parser with `add_hn_arguments`; the
        settings of `recipe` (the `--hn-config` file's own configuration) for a part of the run
        that the command line switched off are dropped (`without_recipe_settings_for_parts_off`)."""
        config = cls.unchecked(args)
        config.check_values()  # out of range is an error wherever the value came from
        config = without_recipe_settings_for_parts_off(config, recipe)
        config.check_combination()
        return config

    @classmethod
    def unchecked(cls, args: argparse.Namespace) -> "HNConfig":
        """The config of a namespace as it is (`hn_given`/`hn_typed` say how flags were given)."""
        values = {f.name: getattr(args, f"hn_{f.name}") for f in dataclasses.fields(cls)
                  if f.name not in BOOKKEEPING_FIELDS and hasattr(args, f"hn_{f.name}")}
        return cls(**values, given=tuple(getattr(args, "hn_given", ())),
                   typed=tuple(getattr(args, "hn_typed", ())))

    def update_args(self, args: argparse.Namespace) -> None:
        """Put the settings back on the namespace `from_args` read, so that what OpenCLIP records
        (params.txt) and `--hn-print-config` prints is what the run does: a recipe's settings
        that `from_args` dropped are at their defaults there too."""
        for f in dataclasses.fields(self):
            if f.name not in BOOKKEEPING_FIELDS and hasattr(args, f"hn_{f.name}"):
                setattr(args, f"hn_{f.name}", getattr(self, f.name))

    def validate(self) -> None:
        """Every check of the settings, alone and together; raise ValueError naming the flags."""
        self.check_values()
        self.check_combination()

    def check_values(self) -> None:
        """The checks of one setting at a time that argparse's types leave (ranges, choices)."""
        if isinstance(self.loss, str) or not all(isinstance(name, str) for name in self.loss):
            raise ValueError(f"--hn-loss (HNConfig.loss) is a tuple of term names such as "
                             f"('clip', 'choice'), got {self.loss!r}")
        unknown = [name for name in self.loss if name not in TERMS]
        if unknown:
            raise ValueError(f"--hn-loss: unknown loss term(s) {', '.join(unknown)}; known: "
                             f"{', '.join(selectable_terms())}")
        if self.importance_tau_plus >= 1:
            raise ValueError("--hn-importance-tau-plus is a class prior in [0, 1): with 1 every "
                             "negative would be a false negative; use a value below 1")
        if self.curriculum_start > 1 or self.curriculum_end > 1:
            raise ValueError("--hn-curriculum-start/--hn-curriculum-end are shares in [0, 1]")
        if self.eval_every < 1:
            raise ValueError("--hn-eval-every must be >= 1 (epochs)")
        if self.negative_grad not in ("full", "none"):
            raise ValueError(f"--hn-negative-grad must be full or none, got {self.negative_grad!r}")
        if self.choice_grad not in CHOICE_GRAD_MODES:
            raise ValueError(f"--hn-choice-grad must be one of {', '.join(CHOICE_GRAD_MODES)}, "
                             f"got {self.choice_grad!r}")
        if self.swap_reorders not in ("keep", "drop"):
            raise ValueError(f"--hn-swap-reorders must be keep or drop, got {self.swap_reorders!r}")
        if self.image_neighbors_per_sample < 1:
            raise ValueError("--hn-image-neighbors-per-sample must be >= 1")
        if not 0 <= self.distill_ema_decay < 1:
            raise ValueError(f"--hn-distill-ema-decay must be in [0, 1), got {self.distill_ema_decay} "
                             "(1 would never move the teacher: use --hn-distill frozen)")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--hn-label-smoothing must be in [0, 1), got {self.label_smoothing}")

    def check_combination(self) -> None:
        """The checks across flags that argparse cannot express."""
        if self.negatives != "none" and self.num_negatives == 0:
            raise ValueError(
                f"--hn-negatives {self.negatives} with --hn-num-negatives 0 generates nothing; "
                "give K >= 1 or use --hn-negatives none"
            )
        contrastive = [name for name in dict.fromkeys(self.loss) if TERMS[name].output == "contrastive_loss"]
        if len(contrastive) > 1:
            raise ValueError(f"--hn-loss {','.join(self.loss)}: {' and '.join(contrastive)} are each "
                             "OpenCLIP's contrastive loss (a run computes one of them, so the other "
                             "would be dropped); keep one of them")
        missing = missing_needs(self) + ignored_flags(self)
        if missing:
            raise ValueError(missing[0])
        if self.uses_text_negatives and not any(t.uses_text_negatives for t in active_terms(self)):
            readers = ", ".join(name for name, term in TERMS.items() if term.selectable and term.uses_text_negatives)
            raise ValueError(f"--hn-negatives {self.negatives}: no loss term of this run reads text "
                             f"negatives (--hn-loss {','.join(self.loss)}), so they would be made and "
                             f"encoded for nothing; add a term that does ({readers}), or pass "
                             "--hn-negatives none")
        if self.distill != "none" and self.distill_weight == 0:
            raise ValueError(f"--hn-distill {self.distill} with --hn-distill-weight 0 keeps, runs and "
                             "saves a teacher every step for a term that counts nothing; pass "
                             "--hn-distill none to turn distillation off")
        if self.curriculum != "const" and self.curriculum_start == self.curriculum_end:
            raise ValueError(f"--hn-curriculum {self.curriculum} moves the share from "
                             f"--hn-curriculum-start to --hn-curriculum-end, both {self.curriculum_start:g} "
                             "here, so it changes nothing: set --hn-curriculum-start below the end "
                             "(e.g. 0.1), or leave --hn-curriculum out")
        if self.mined_k <= 0 and "mined" in self.loss:
            raise ValueError("--hn-mined-k must be >= 1 with --hn-loss mined")
        if "mined" in self.loss and 0 < self.memory_bank_size < self.mined_k:
            raise ValueError(f"--hn-mined-k {self.mined_k}: the memory bank holds "
                             f"{self.memory_bank_size} pairs (--hn-memory-bank-size), fewer than the "
                             "negatives mined per anchor; raise the bank or lower --hn-mined-k")
        if self.choice_grad != "both" and not any(TERMS[name].output == "contrastive_loss"
                                                  for name in self.loss):
            frozen = "text" if self.choice_grad == "image" else "image"
            raise ValueError(f"--hn-choice-grad {self.choice_grad} needs a contrastive term to train "
                             f"the {frozen} tower, which the choice term then does not: add itc or "
                             "clip to --hn-loss")


# the flag that switches each need of an automatic term on (terms.NEEDS)
NEEDS_FLAGS = {"mirrors": "--hn-mirror AXES", "teacher": "--hn-distill frozen or ema",
               "text_negatives": "--hn-negatives online", "bank": "--hn-memory-bank-size N"}


class Target(NamedTuple):
    """The part of a run that a setting acts on."""

    what: str  # the part, and the flags that turn it on
    on: bool  # whether it is on in this run
    note: str = ""  # where the setting belongs instead, if anywhere


def _online_only(c: HNConfig, what: str, on: bool, precompute_flag: str) -> Target:
    """A setting of the online generator; precomputed negatives take it at precompute time."""
    note = (f"for precomputed negatives pass {precompute_flag} to `python -m open_clip_hn.negatives "
            "precompute`" if c.negatives == "precomputed" else "")
    return Target(what, on, note)


def _settings_and_targets(c: HNConfig) -> dict[str, Target]:
    """Flag -> the part of the run it acts on, for the flags that only tune a part of the run that
    another flag switches on."""
    mined = Target("the mined term (--hn-loss ...,mined)", "mined" in c.loss)
    bank = Target("a term that reads the memory bank (--hn-loss ...,mined, or a registered term "
                  "that needs it)", any("bank" in term.needs for term in active_terms(c)))
    importance = Target("the importance term (--hn-loss ...,importance)", "importance" in c.loss)
    generated, online = "online text negatives (--hn-negatives online)", c.negatives == "online"
    terms = active_terms(c)
    active = {term.name for term in terms}
    scheduled = c.packs_texts or any(term.curriculum for term in terms)
    schedule = Target("the curriculum, which schedules text negatives, mirrored pairs and the "
                      "intra/rank/mined/mirror terms (none of them is on)", scheduled)
    lowest_share = min(c.curriculum_start, 1.0 if c.curriculum == "const" else c.curriculum_end)
    softened = Target("the softmaxes that hold text negatives (itc, choice or local in --hn-loss)",
                      bool({"itc", "choice", "local"} & active))
    targets = {
        "--hn-seed": Target("online text negatives (--hn-negatives online) and the curriculum's "
                            "draw of which negatives a share below 1 keeps",
                            (online and c.uses_text_negatives) or (c.packs_texts and lowest_share < 1),
                            "for precomputed negatives pass --seed to `python -m "
                            "open_clip_hn.negatives precompute`" if c.negatives == "precomputed" else ""),
        "--hn-label-smoothing": softened,
        "--hn-focal-gamma": softened,
        "--hn-curriculum": schedule,
        "--hn-curriculum-warmup": schedule,
        "--hn-curriculum-start": schedule,
        "--hn-curriculum-end": Target("a curriculum that moves (--hn-curriculum linear, cosine or "
                                      "step; const stays at --hn-curriculum-start)",
                                      scheduled and c.curriculum != "const"),
        "--hn-types": Target("text negatives (--hn-negatives online or precomputed)",
                             c.negatives != "none"),
        "--hn-num-negatives": Target("text negatives (--hn-negatives online or precomputed)",
                                     c.negatives != "none"),
        "--hn-negative-grad": Target("text negatives (--hn-negatives online or precomputed, "
                                     "--hn-num-negatives K >= 1)", c.uses_text_negatives),
        "--hn-vocabulary": _online_only(c, generated, online, "--vocabulary"),
        "--hn-plausibility": _online_only(c, generated, online, "--plausibility"),
        "--hn-swap-reorders": _online_only(c, "online swap negatives (--hn-negatives online, "
                                              f"--hn-types with {' or '.join(SWAP_TYPES)})",
                                           online and bool(set(SWAP_TYPES) & set(c.types)),
                                           "--swap-reorders drop"),
        "--hn-exclude-negatives": _online_only(c, generated, online, "--exclude"),
        "--hn-lm": _online_only(c, f"online {' and '.join(LM_TYPES)} negatives (--hn-negatives "
                                   "online, --hn-types with either)",
                                online and bool(set(LM_TYPES) & set(c.types)), "--lm"),
        "--hn-choice-grad": Target("the choice term (--hn-loss ...,choice at --hn-choice-weight > 0)",
                                   "choice" in active and c.choice_weight > 0),
        "--hn-converse-margin": Target("the converse term (--hn-converse-weight W > 0 with "
                                       "--hn-mirror AXES)", "converse" in active),
        "--hn-distill-ema-decay": Target("an EMA teacher (--hn-distill ema)", c.distill == "ema"),
        "--hn-image-neighbors-per-sample": Target("image neighbours (--hn-image-neighbors DIR)",
                                                  c.image_neighbors is not None),
        "--hn-eval-every": Target("the in-training evaluation (--hn-eval-compositional DIR)",
                                  c.eval_compositional is not None),
        "--hn-importance-tau-plus": importance,
        "--hn-importance-beta": importance,
        "--hn-rank-threshold": Target("the rank term (--hn-loss ...,rank)", "rank" in c.loss),
        "--hn-memory-bank-size": bank,
        "--hn-memory-bank-fp16": bank,
        "--hn-mined-k": mined,
        "--hn-false-negative-threshold": mined,
        "--hn-miner-backend": mined,
    }
    for term in TERMS.values():  # a weight above 0 for a term that is off
        if term.weight and getattr(c, term.weight_field) > 0:
            how = (f"--hn-loss ...,{term.name}" if term.selectable
                   else " and ".join(NEEDS_FLAGS.get(n, n) for n in term.needs))
            targets[f"--hn-{term.name}-weight"] = Target(f"the {term.name} term ({how})",
                                                         term.name in active)
    return targets


def _field(flag: str) -> str:
    return flag[len("--hn-"):].replace("-", "_")


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(HNConfig)}


def _settings_for_parts_off(c: HNConfig) -> dict[str, Target]:
    """The settings other than their default for a part of the run that is off: they would
    change nothing. A zero or empty value says "off" itself (`--hn-num-negatives 0`, a weight
    of 0), so it is never one of them."""
    return {flag: target for flag, target in _settings_and_targets(c).items()
            if not target.on and getattr(c, _field(flag))
            and getattr(c, _field(flag)) != _default(flag)}


def without_recipe_settings_for_parts_off(c: HNConfig, recipe: HNConfig | None) -> HNConfig:
    """`c` with the recipe's settings for a part that the command line switched off back at
    their defaults: a recipe is a bundle whose parts the command line may switch off
    (`--hn-config recommended --hn-mirror none` drops its converse term's settings too) without
    undoing each of their settings, and the config then says what the run does. Only parts the
    recipe itself has on: a recipe's setting for a part it leaves off is its own mistake, refused
    like a typed one (`ignored_flags`)."""
    if recipe is None:
        return c
    from_recipe = set(c.given) - set(c.typed)
    on_in_recipe = {flag for flag, target in _settings_and_targets(recipe).items() if target.on}
    dropped = [flag for flag in _settings_for_parts_off(c) if flag in from_recipe and flag in on_in_recipe]
    return dataclasses.replace(c, **{_field(flag): _default(flag) for flag in dropped},
                               dropped=tuple(f"{flag} {_value_text(getattr(c, _field(flag)))}"
                                             for flag in dropped))


def _default(flag: str) -> Any:
    """The setting of `flag` when no flag or recipe gives it (HNConfig's field default)."""
    return _FIELD_DEFAULTS[_field(flag)]


def _value_text(value: Any) -> str:
    """A setting as its flag takes it (`horizontal,vertical` for a list)."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def ignored_flags(c: HNConfig) -> list[str]:
    """One message per setting other than its default for a part of the run that is off: it
    would change nothing, while the user meant something the run would silently not do.
    `HNConfig.from_args` first drops a recipe's settings for a part the command line switched
    off, so what is refused was typed, set by a recipe for a part the recipe itself leaves off
    (named by its key, `_origin`), or set where no command line was given. A typed default or a
    zero is not refused (`--hn-memory-bank-size 0` switches a recipe's bank off)."""
    return [f"{flag}{_origin(c, flag)} acts on {target.what}, which is off in this run: turn it "
            f"on, or drop {flag}" + (f"; {target.note}" if target.note else "")
            for flag, target in _settings_for_parts_off(c).items()]


def _origin(c: HNConfig, flag: str) -> str:
    """Where a setting came from, when not the command line: the recipe file's key."""
    if c.config_file is None or flag in c.typed or flag not in c.given:
        return ""
    return f" (key {flag[2:]} of --hn-config {c.config_file})"


def with_origin(c: HNConfig, message: str) -> str:
    """`message` about the flag it starts with, plus the recipe key it came from where a recipe
    set it; a path there is read from the working folder, as on the command line."""
    flag = re.match(r"--hn-[a-z0-9-]+", message)
    origin = _origin(c, flag.group(0)) if flag else ""
    if not origin or origin in message:
        return message
    return (f"{message}{origin}; a recipe's relative paths are read from the working folder, "
            "as on the command line")


def add_hn_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every `--hn-*` flag (and `--model-config`) to `parser`, in one argument group."""
    group = parser.add_argument_group(
        "open_clip_hn (hard negatives)",
        "Plugin flags. With none of them the run is exactly open_clip_train.main's run.",
    )
    add = group.add_argument
    add("--model-config", dest="model_config", type=path_value, default=None, metavar="PATH.json",
        help="Register an OpenCLIP model config file (open_clip.add_model_config) so that "
             "--model FILE_STEM can use a custom or tiny architecture.")
    add("--hn-config", dest="hn_config_file", type=path_value, default=None, metavar="NAME|PATH.yaml",
        help="Recipe: a shipped name (negclip, ce-clip, diht, cm-hnco, fsc-clip, "
             "concept-permutation, recommended; see --hn-list-configs) or a YAML file whose keys "
             "are flag names; flags on the command line override it.")
    add("--hn-list-configs", action=ListRecipesAction,
        help="Print the shipped recipes (names for --hn-config) with the first line of each "
             "header, and exit.")
    add("--hn-print-config", dest="hn_print_config", action="store_true", default=False,
        help="Print the resolved configuration (recipe + overrides) and exit.")
    add("--hn-negatives", dest="hn_negatives", choices=NEGATIVE_SOURCES, default="none",
        help="Where text hard negatives come from: 'online' generates them in the loader "
             "workers, 'precomputed' reads neg.json from shards written by "
             "`python -m open_clip_hn.negatives precompute`. Default: none.")
    add("--hn-num-negatives", dest="hn_num_negatives", type=non_negative_int, default=4,
        metavar="K", help="Hard negatives per caption (K); captions with fewer valid negatives "
                          "get masked slots, never duplicates. Default: 4.")
    add("--hn-types", dest="hn_types", type=argparse_type(parse_types), default=NEGATIVE_TYPES,
        metavar="A,B,...",
        help=f"Comma list of negative types to generate (default: all): {', '.join(NEGATIVE_TYPES)}.")
    add("--hn-loss", dest="hn_loss", type=_loss_terms, default=("itc",), metavar="TERMS",
        help=loss_help())
    add("--hn-seed", dest="hn_seed", type=int, default=0,
        help="Seed of the negative generator; negatives are a pure function of the caption, "
             "the seed, K and the generator's settings. Default: 0.")
    add("--hn-lm", dest="hn_lm", type=path_value, default=None, metavar="PATH",
        help="Local masked language model (transformers) that proposes replacement words; "
             "proposals pass the same WordNet validity filter.")
    add("--hn-vocabulary", dest="hn_vocabulary", type=optional_path, default=None, metavar="PATH",
        help="Text file of the words online negatives may bring in (a word list, or the training "
             "captions themselves), or 'train-data': the words of the --train-data captions, read "
             "at start (local shards or CSV; for large data write the file once with `python -m "
             "open_clip_hn.negatives vocabulary`). Replacements stay inside the data's own words, "
             "so the text tower cannot reject a negative for a word it never saw. 'none' (the "
             "default): any lexicon word.")
    add("--hn-plausibility", dest="hn_plausibility", type=optional_path, default=None,
        metavar="{train-data,PATH,none}",
        help="Keep only online negatives that read about as plausibly as their caption under a "
             "Kneser-Ney trigram model of captions, so the text tower cannot reject a negative "
             "without the image: 'train-data' (the --train-data captions, read at start; local "
             "shards or CSV), a caption file (txt/csv/tsv/jsonl; a table's --csv-caption-key column) "
             "or a model saved by `python -m "
             "open_clip_hn.negatives plausibility`; built once and cached. A caption with no "
             "plausible negative of a type gets none of it (masked slot). 'none' (the default): "
             "no filter.")
    add("--hn-swap-reorders", dest="hn_swap_reorders", choices=("keep", "drop"), default="keep",
        help="Swap negatives (swap_objects, swap_attributes) that only put the caption's noun "
             "phrases in another order ('a dog chasing a cat' -> 'a cat chasing a dog'): 'keep' "
             "(the default; SugarCrepe's swap-object items are of this kind) or 'drop', so the "
             "swaps only rebind (attributes or nouns move between objects that keep their "
             "places). A reordered caption is a relation negative in effect: an image tower that "
             "does not read positions yet cannot tell it apart. Online negatives only.")
    add("--hn-exclude-negatives", dest="hn_exclude_negatives", type=optional_path, default=None,
        metavar="PATH",
        help="Never use these captions as online text negatives (compared word for word, ignoring "
             "case and punctuation): a folder of SugarCrepe/ARO-layout evaluation sets (the "
             "positives of its choice sets, the captions of its image-pair sets and of retrieval/; "
             "the layout --hn-eval-compositional reads; images need not be there) or a .txt file, "
             "one caption per line, read before training. Mirrored and converse captions are not "
             "filtered. Where the "
             "caption space is small or templated, generated negatives can be word for word the "
             "positives of your evaluation, which training then teaches as wrong. 'none' (the "
             "default): no exclusion.")
    add("--hn-negative-grad", dest="hn_negative_grad", choices=("full", "none"), default="full",
        help="Whether the loss terms train the text tower through the generated text negatives' "
             "features (the K per caption, and their token features for local): 'full' (the "
             "default, as NegCLIP and CE-CLIP) or 'none', where those features are constants, "
             "so a term can only move the image and the positive caption against them. With "
             "'none' the text tower cannot learn to push "
             "a caption away because it was seen as a negative (in a small or templated caption "
             "space a caption is often another image's negative); to win a choice the image must "
             "be read. Mirrored and converse captions (--hn-mirror) keep their gradient.")
    add("--hn-choice-grad", dest="hn_choice_grad", choices=CHOICE_GRAD_MODES, default="both",
        help="Which tower the choice term trains: 'both' (the default); 'image', where the caption "
             "and its negatives are constants in the term, so only the image tower (and the logit "
             "scale) learns to pick the caption; 'text', where the image is a constant, so only the "
             "text tower learns to tell the caption from its negatives. Other terms are unchanged; "
             "needs choice at a weight above 0 and a contrastive term (itc or clip). "
             "Measured on the two ViT settings of issue 21: neither brings the swap errors nearer "
             "the targets beyond one seed's spread (benchmarks/RESULTS.md, session 22).")
    for term in TERMS.values():
        if term.weight:
            add(f"--hn-{term.name}-weight", dest=f"hn_{term.weight_field}", type=non_negative_float,
                default=term.weight_default,
                help=f"Weight of the '{term.name}' term"
                     f"{': ' + term.weight_help if term.weight_help else ''}. "
                     f"Default: {term.weight_default}.")
    add("--hn-rank-threshold", dest="hn_rank_threshold", type=_rank_threshold,
        default="adaptive-mean", metavar="{adaptive-mean,adaptive-max,MARGIN}",
        help="Per-type rank margin, in logits (logit scale x cosine, CE-CLIP's units): set after "
             "each step from that step's gaps s*cos(I,T) - s*cos(I,T_neg) of the type, their mean "
             "or their largest / 5, clamped to [0, 10] (CE-CLIP's rule); or a fixed MARGIN "
             "(CE-CLIP's fixed default is 2.0). Default: adaptive-mean.")
    add("--hn-importance-beta", dest="hn_importance_beta", type=non_negative_float, default=0.5,
        help="Concentration beta of importance weights exp(beta*s*cos), s the logit scale (HCL's "
             "beta on sim/t): at s=100, beta 0.5 weighs negatives by exp(50*cos). Default: 0.5.")
    add("--hn-importance-tau-plus", dest="hn_importance_tau_plus", type=unit_float, default=0.0,
        help="Debiasing class prior tau+ in [0, 1) (HCL). Default: 0 (no debiasing).")
    add("--hn-memory-bank-size", dest="hn_memory_bank_size", type=non_negative_int, default=0,
        metavar="N", help="Memory bank of the last N image/text embeddings from all ranks "
                          "(for --hn-loss mined). Default: 0 (off).")
    add("--hn-memory-bank-fp16", dest="hn_memory_bank_fp16", action="store_true", default=False,
        help="Store the memory bank in fp16 (half the memory).")
    add("--hn-mined-k", dest="hn_mined_k", type=non_negative_int, default=16,
        help="Mined negatives per anchor and direction. Default: 16.")
    add("--hn-false-negative-threshold", dest="hn_false_negative_threshold", type=cosine,
        default=0.9, help="Bank entries whose image or text cosine similarity to the anchor's "
                          "pair exceeds this are treated as false negatives and dropped. Default: 0.9.")
    add("--hn-miner-backend", dest="hn_miner_backend", choices=MINER_BACKENDS, default="torch",
        help="Top-k search over the bank: torch (exact matmul) or faiss (GPU build when a GPU "
             "is present). Default: torch.")
    add("--hn-mirror", dest="hn_mirror", type=argparse_type(parse_axes), default=(),
        metavar="AXES",
        help="Comma list of mirror axes (horizontal, vertical, colour, horizontal+colour, "
             "vertical+colour): each image whose caption names a relation along an axis "
             "(left/right; above/below, top/bottom, over/under) gets a flipped copy paired with the "
             "caption whose relation words are exchanged; with 'colour', each image whose caption "
             "names two colours gets a copy with those colours exchanged, paired with the caption "
             "whose colour words are exchanged; 'horizontal+colour' and 'vertical+colour' do both "
             "(each colour stays in place and the objects' shapes trade places). A caption that "
             "allows several gets one, by a hash of the caption. The pair joins the itc batch and "
             "the mirror term; it is the image-side hard negative that makes the image encoder read "
             "the layout, bind colours to objects, or tell which shape is where. Vertical flips "
             "and colour exchanges suit rendered scenes with flat colours more than photos. "
             "'none' (the default): off.")
    add("--hn-converse-margin", dest="hn_converse_margin", type=unit_float, default=0.0,
        metavar="MARGIN",
        help="With --hn-converse-weight: a hinge instead of the cross-entropy, each converse "
             "choice only needs to be won by this cosine margin, so the text tower moves only as "
             "far as the mirror term needs (on world2 the cross-entropy cost retrieval). "
             "Default: 0 (cross-entropy).")
    add("--hn-distill", dest="hn_distill", choices=DISTILL_TEACHERS, default="none",
        help="Distil toward the model being continued, so retrieval is kept while the hard "
             "negatives teach composition: the student's image<->text similarity distribution over "
             "the ordinary batch matches a teacher's (KL; term 'distill', --hn-distill-weight). "
             "'frozen': the weights the run started from; 'ema': an exponential moving average of "
             "the student (DeGLA). The teacher is saved with the plugin state. Default: none.")
    add("--hn-distill-ema-decay", dest="hn_distill_ema_decay", type=decay, default=0.999,
        help="EMA decay of --hn-distill ema's teacher per optimizer step, in [0, 1). "
             "Default: 0.999.")
    add("--hn-label-smoothing", dest="hn_label_smoothing", type=unit_float, default=0.0,
        metavar="EPS",
        help="Label smoothing on the softmaxes that hold text negatives: choice and local (as "
             "FSC-CLIP softens its hard-negative losses) and, where it is on, itc's image->text "
             "side (this plugin's extension; FSC-CLIP's contrastive loss stays plain): EPS of the target "
             "spread over the row's valid columns. Default: 0 (off).")
    add("--hn-focal-gamma", dest="hn_focal_gamma", type=non_negative_float, default=0.0,
        metavar="GAMMA",
        help="Focal weighting on the same softmaxes, FSC-CLIP's form: each column's term "
             "-q_j log p_j weighs (1 - p_j)^GAMMA, so what the model already gets right weighs "
             "less. Default: 0 (off).")
    add("--hn-curriculum", dest="hn_curriculum", choices=CURRICULA, default="const",
        help="Schedule of the hard-negative share and of the intra/rank/mined/mirror weights over "
             "training. Default: const.")
    add("--hn-curriculum-warmup", dest="hn_curriculum_warmup", type=argparse_type(parse_warmup),
        default=0, metavar="STEPS|P%",
        help="Optimizer steps without hard negatives at the start, or a share of the run's steps "
             "(12.5%%: the same part of a run of any length). Default: 0.")
    add("--hn-curriculum-start", dest="hn_curriculum_start", type=unit_float, default=1.0,
        help="Curriculum value right after warmup (share in [0, 1]). Default: 1.0.")
    add("--hn-curriculum-end", dest="hn_curriculum_end", type=unit_float, default=1.0,
        help="Curriculum value at the end of training. Default: 1.0.")
    add("--hn-image-neighbors", dest="hn_image_neighbors", type=path_value, default=None,
        metavar="DIR",
        help="Neighbour index from `python -m open_clip_hn.neighbors build` (image kNN) or `... "
             "rebinding` (captions with the same words bound differently): batches then hold "
             "samples together with their neighbours (hard image negatives).")
    add("--hn-image-neighbors-per-sample", dest="hn_image_neighbors_per_sample",
        type=non_negative_int, default=1,
        help="Neighbours placed next to each anchor sample. Default: 1.")
    add("--hn-eval-compositional", dest="hn_eval_compositional", type=path_value, default=None,
        metavar="DIR",
        help="Evaluation sets scored during training, as `python -m open_clip_hn.eval "
             "--compositional DIR` scores them (SugarCrepe or ARO *.json, Winoground-style "
             "*.jsonl, and DIR/retrieval/ when present); each set's accuracy is logged like "
             "OpenCLIP's metrics.")
    add("--hn-save-every-steps", dest="hn_save_every_steps", type=non_negative_int, default=0,
        metavar="N", help="Also save a checkpoint every N optimizer steps inside an epoch "
                          "(epoch_E_step_S.pt, OpenCLIP's format plus the position in the epoch "
                          "and the plugin's state; the previous one is removed), so a kill loses "
                          "at most N steps; --resume latest continues at that step. With any "
                          "--hn-* flag a checkpoint is also saved when SIGUSR2 or SIGTERM arrives "
                          "(preemption, time limit). Usable without hard negatives, but not "
                          "with OpenCLIP's --siglip or --distill-model (the plugin's objective is "
                          "a softmax contrastive loss and refuses both). Default: 0 (only at the "
                          "signal).")
    add("--hn-sample-shuffle", dest="hn_sample_shuffle", choices=SAMPLE_SHUFFLE_MODES,
        default="seeded",
        help="Generator of OpenCLIP's webdataset sample shuffle buffer. seeded: from --seed, the "
             "epoch, the rank and the loader worker, so every read of an epoch gives the same "
             "samples in the same order (and the workers' random crops, seeded the same way at "
             "each epoch's start): a run stopped inside an epoch resumes (--resume latest) "
             "with exactly the samples it would have trained on, and one command trains on one "
             "order. process: OpenCLIP's own (webdataset seeds it from the process id and the "
             "clock). The order of CSV data is already reproducible. Default: seeded (with any "
             "--hn-* flag; without one the run is OpenCLIP's).")
    add("--hn-drop-state", dest="hn_drop_state", action="store_true", default=False,
        help="On --resume, ignore the checkpoint's plugin state (memory bank, rank thresholds, "
             "distillation teacher) and start it fresh: for a damaged state, with --resume latest "
             "too (the newest checkpoint whose weights load). A step checkpoint still continues "
             "at its step, and the curriculum follows the step count. Without this flag a resume "
             "with no --hn-* flag from a checkpoint that has plugin state is refused.")
    add("--hn-eval-every", dest="hn_eval_every", type=int, default=1, metavar="EPOCHS",
        help="Run --hn-eval-compositional every N epochs and after the last one. Default: 1.")
    return parser


def given_hn_flags(argv: list[str], parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """The `--hn-*` flags a command line sets, by their full names as `parser` reads them: an
    abbreviation (`--hn-mirror-w 2`) or a `--flag=value` names its flag (`spell_out_flags`)."""
    argv = spell_out_flags(argv, parser)
    argv = argv[:argv.index("--")] if "--" in argv else argv
    known = flag_actions(parser)
    return tuple(dict.fromkeys(name for name in (a.split("=", 1)[0] for a in argv)
                               if name.startswith("--hn-") and name in known))
