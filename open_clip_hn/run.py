"""One training run of the plugin: what OpenCLIP's seams share, in one explicit object.

`hooks.py` (the adapter) builds a `HardNegativeRun` from the flags and calls it at OpenCLIP's seams,
in the order OpenCLIP's `main` reaches them:

    configure (flags -> HNConfig)            HardNegativeRun(config)
    create_model_and_transforms              run.model_created(model, preprocess_val)
    pt_load of --resume                      run.checkpoint_loaded(path, checkpoint)
    get_data                                 run.train_tokenizer(...), run.data_ready(...)
    create_loss                              run.create_loss(...)   (restores the resumed state)
    after each train_one_epoch               run.epoch_end(...)     (state beside the checkpoint)

Nothing here imports `open_clip_train`: what the run needs from OpenCLIP's arguments is passed in,
so the same object serves the monkeypatched route and the upstream plugin hook points.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import provenance
from . import state as hn_state
from .argtypes import InputError
from .config import BEHAVIOUR_BEFORE_FLAG, BOOKKEEPING_FIELDS, TRAIN_DATA_VOCABULARY, HNConfig, flag_of
from .packing import PackedNegativeTokenizer, attach_model_hooks
from .preemption import EpochPosition, StopRequest

TAGGERS = {"nltk": "NLTK's averaged perceptron POS tagger",
           "lexicon": "the plugin's own POS tagger (NLTK's tagger data is not installed)"}


@dataclass(frozen=True)
class TrainCaptions:
    """Where OpenCLIP's `--train-data` captions are, for `--hn-vocabulary train-data`."""

    train_data: str
    is_csv: bool
    synthetic: bool = False
    csv_separator: str = "\t"
    csv_caption_key: str = "title"


def epoch_checkpoints(completed_epoch: int, epochs: int, save_frequency: int,
                      save_most_recent: bool, latest_name: str) -> list[str]:
    """The file names OpenCLIP's `main` writes after `completed_epoch` (its own rules:
    `epoch_N.pt` at the last epoch and every `--save-frequency`, the latest name always with
    `--save-most-recent`)."""
    names = []
    if completed_epoch == epochs or (save_frequency > 0 and completed_epoch % save_frequency == 0):
        names.append(f"epoch_{completed_epoch}.pt")
    if save_most_recent:
        names.append(latest_name)
    return names


def epoch_restart(epoch: int) -> str:
    """Where a step checkpoint of `epoch` (0-based) cannot continue: OpenCLIP refuses --resume
    PATH into an experiment folder that exists, so the epoch checkpoint starts a new one."""
    if epoch == 0:
        return (", or start the run over in a new experiment folder (--name NEW_NAME): it stopped "
                "in its first epoch, before any epoch checkpoint")
    return (", or continue from the newest epoch checkpoint in a new experiment folder: "
            f"--resume LOGS/NAME/checkpoints/epoch_N.pt --name NEW_NAME (N at most {epoch}, "
            "the epochs this one follows)")


class TrainingDiverged(RuntimeError):
    """The model's weights hold NaN/inf: the checkpoint that would hold them is not written (with
    --delete-previous-checkpoint or --save-most-recent it would replace the last good one)."""


def check_finite_weights(model: torch.nn.Module, when: str, checkpoint_dir: str | None) -> None:
    """`TrainingDiverged` where any weight of `model` is NaN/inf (every rank checks its copy,
    so all stop together). One device sync for all the tensors."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    kept = ""
    if checkpoint_dir:
        newest = hn_state.checkpoints_newest_first(checkpoint_dir)
        kept = (f"; the newest checkpoint is {newest[0]}, from before" if newest
                else "; no checkpoint of the run was written before")
    raise TrainingDiverged(
        f"the run diverged: after {when}, {len(bad)} weight tensor(s) hold NaN/inf (first: "
        f"{bad[0]}), so no checkpoint was written for it{kept}; lower --lr, raise --warmup or "
        "--grad-clip-norm, or lower the hard-negative weights")


def no_hard_negative_step(c: HNConfig, total_steps: int) -> str | None:
    """Why the curriculum keeps every one of `total_steps` steps at no hard negatives (a
    recipe's warmup in steps longer than a short run: the run would be vanilla OpenCLIP and exit
    0), or None."""
    from .curriculum import curriculum_value, warmup_steps

    if not (c.uses_text_negatives or c.mirror or c.memory_bank_size):
        return None
    share = curriculum_value(total_steps - 1, kind=c.curriculum, warmup=c.curriculum_warmup,
                             start=c.curriculum_start, end=c.curriculum_end, total_steps=total_steps)
    warmup = warmup_steps(c.curriculum_warmup, total_steps)
    if warmup < total_steps and not (share == 0 and c.curriculum_start == 0):
        return None
    return (f"the curriculum leaves no step with hard negatives (--hn-curriculum-warmup "
            f"{c.curriculum_warmup}: {warmup} of the run's {total_steps} steps; start "
            f"{c.curriculum_start:g}, end {c.curriculum_end:g}), so the run would train as "
            "vanilla OpenCLIP: lower --hn-curriculum-warmup (a share such as 12.5% keeps its "
            "part of a run of any length), raise the share, or train longer")


class HardNegativeRun:
    """The plugin's part of one training run: config, loss and the state to save and resume."""

    def __init__(self, config: HNConfig):
        self.config = config
        self.loss = None
        self.preprocess_val: Any = None
        self.eval_tokenizer: Any = None
        self.start_step = 0
        self.total_steps: int | None = None
        self.pending_state: dict[str, Any] | None = None
        self.resume_position: EpochPosition | None = None  # a step checkpoint was resumed
        self.stop = StopRequest()
        self._stop_installed = False
        self.teacher = None  # --hn-distill's Teacher (teacher.py)
        self.pretrained: str | None = None  # --pretrained: the weights the model was created with
        self.resumed = False

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    # ------------------------------------------------------------------ model

    def model_created(self, model: torch.nn.Module, preprocess_val, pretrained: str | None = None) -> None:
        """Attach the packing hooks (negatives and mirrored pairs ride in one forward).
        `pretrained` (--pretrained) names the weights `model` was created with: a frozen
        teacher whose saved state is missing on a resume is those weights, as at the start."""
        master = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if self.config.config_file and master:  # the first hook after OpenCLIP sets up logging
            from .recipes import resolve_recipe

            logging.info("Hard-negative recipe: %s", os.path.abspath(resolve_recipe(self.config.config_file)))
        if self.config.dropped and master:
            logging.info("Recipe settings for a part this command line switched off run at their "
                         "defaults: %s (from --hn-config %s)", ", ".join(self.config.dropped),
                         self.config.config_file)
        self.preprocess_val = preprocess_val
        self.pretrained = pretrained
        if self.config.distill != "none":  # copied before any hook is attached
            from .teacher import Teacher

            self.teacher = Teacher(model, self.config.distill, self.config.distill_ema_decay)
        if self.config.packs_texts:
            attach_model_hooks(model, self.config.packed_negatives, bool(self.config.mirror),
                               self.config.packs_converse)
        if self.config.uses_tokens:  # after the packing hooks: it reads the unpacked rows
            from .token_features import attach_token_hooks

            attach_token_hooks(model, self.config.packed_negatives)
        if self.teacher is not None:
            from .teacher import attach_teacher

            attach_teacher(model, self.teacher, self.config.packed_negatives, bool(self.config.mirror),
                           self.config.packs_converse)

    # ------------------------------------------------------------------ data

    @staticmethod
    def _captions(captions: TrainCaptions | None, flag: str, fix: str) -> list[str]:
        """The --train-data captions for `flag train-data`; errors name the flag and the fix."""
        from .negatives.lexicon import VocabularyError
        from .negatives.shards import train_data_captions

        if captions is None or captions.synthetic:
            raise VocabularyError(f"{flag} train-data: synthetic data has no captions; {fix}")
        try:
            return list(train_data_captions(captions.train_data, is_csv=captions.is_csv,
                                            csv_separator=captions.csv_separator,
                                            csv_caption_key=captions.csv_caption_key))
        except VocabularyError as err:
            raise VocabularyError(f"{flag} train-data: {err}; {fix}") from None

    def vocabulary(self, captions: TrainCaptions | None) -> frozenset[str] | None:
        """--hn-vocabulary's words: a file's, or with `train-data` those of the training captions."""
        from .negatives.lexicon import VocabularyError, read_vocabulary
        from .negatives.shards import word_counts

        vocabulary = self.config.vocabulary
        if vocabulary is None:
            return None
        if vocabulary != TRAIN_DATA_VOCABULARY:
            words = read_vocabulary(vocabulary)
            logging.info("Negatives stay inside the %d words of %s", len(words), vocabulary)
            return words
        fix = ("write the word list once with `python -m open_clip_hn.negatives vocabulary` and "
               "pass its path to --hn-vocabulary")
        counts, _ = word_counts(self._captions(captions, "--hn-vocabulary", fix))
        if not counts:
            raise VocabularyError(f"--hn-vocabulary train-data: no words in the captions of "
                                  f"{captions.train_data} (webdataset captions are read from the "
                                  ".txt members); pass a word list instead")
        logging.info("Negatives stay inside the %d words of the --train-data captions", len(counts))
        return frozenset(counts)

    def plausibility(self, captions: TrainCaptions | None):
        """--hn-plausibility's model: a caption file's or saved model's, or the --train-data
        captions' (built once, cached on disk; loader workers load the cached file)."""
        from .negatives.plausibility import PlausibilityError, from_captions, resolve

        source = self.config.plausibility
        if source is None:
            return None
        if source != TRAIN_DATA_VOCABULARY:  # a CSV's caption column is OpenCLIP's, as for training
            key = (captions or TrainCaptions).csv_caption_key
            return resolve(source, caption_key=key, key_flag="--csv-caption-key")
        fix = ("build the model once with `python -m open_clip_hn.negatives plausibility` and pass "
               "its path to --hn-plausibility")
        try:
            model = from_captions(self._captions(captions, "--hn-plausibility", fix),
                                  source=captions.train_data)
        except PlausibilityError as err:
            raise PlausibilityError(
                f"--hn-plausibility train-data: {err}; pass a larger caption file or a saved model "
                "to --hn-plausibility, or --hn-plausibility none to train without the filter (a "
                "recipe's setting included)") from None
        logging.info("Negatives are kept only where they read about as plausibly as their caption: "
                     "%r", model)
        return model

    @functools.cached_property
    def excluded_negatives(self) -> tuple[str, ...]:
        """--hn-exclude-negatives' captions, read once: `configure` reads them while the flags are
        parsed, so a bad input stops the run by name before any work."""
        from .eval_sets import excluded_captions

        return excluded_captions(self.config.exclude_negatives, "--hn-exclude-negatives")

    def train_tokenizer(self, tokenizer: Callable, captions: TrainCaptions | None
                        ) -> PackedNegativeTokenizer:
        """The train split's tokenizer: each caption with its K typed negatives in one row."""
        config, generator = self.config, None
        if config.generates_negatives:
            from .negatives import NegativeGenerator

            if config.lm:
                logging.info("Replacement words of replace_object and replace_attribute negatives "
                             "are proposed by the masked LM in %s", os.path.abspath(config.lm))

            generator = NegativeGenerator(types=config.types, seed=config.seed, lm_path=config.lm,
                                          vocabulary=self.vocabulary(captions),
                                          plausibility=self.plausibility(captions),
                                          swap_reorders=config.swap_reorders == "keep",
                                          exclude=self.excluded_negatives)
            if self.excluded_negatives:
                logging.info("Online negatives never equal one of the %d distinct captions of %s",
                             len(set(self.excluded_negatives)), config.exclude_negatives)
        parser = None
        if config.phrases_mirrors:
            from .negatives import NegativeGenerator

            parser = generator or NegativeGenerator(seed=config.seed)  # the negatives' one if any
        if config.parses_captions:  # every rank reads its captions with the same tagger
            self._check_tagger((generator or parser).tagger_name)
        return PackedNegativeTokenizer(tokenizer, config.packed_negatives, generator, config.types,
                                       config.mirror, parser if config.packs_converse else None,
                                       parser=parser)

    @staticmethod
    def _check_tagger(name: str) -> None:
        """Log the POS tagger the loader parses captions with, and refuse ranks that parse with
        different ones: nodes with and without NLTK's tagger data would mix two parsers'
        negatives in every batch."""
        names = [name]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            names = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(names, name)
        if len(set(names)) > 1:
            ranks = ", ".join(f"rank {rank}: {tagger}" for rank, tagger in enumerate(names))
            raise InputError(f"the ranks parse captions with different POS taggers ({ranks}): NLTK's "
                             "tagger data is installed on some nodes only; install it on every "
                             "node (python -m nltk.downloader averaged_perceptron_tagger_eng) or "
                             "on none")
        logging.info("Captions are parsed with %s", TAGGERS[name])

    def data_ready(self, tokenizer: Callable, epoch: int, steps_per_epoch: int | None,
                   epochs: int, world_size: int = 1, workers: int | None = None,
                   seed: int | None = None) -> None:
        """OpenCLIP built its data for `epoch`: the step clock of the curriculum follows it. A
        step checkpoint continues only where the batches it skips are the ones it trained: the
        same steps per epoch, ranks, `--seed` (it orders the shards and samples) and (`workers`,
        where the order depends on them: webdataset splits shards by loader worker; None for CSV
        and resampled shards) loader workers."""
        self.eval_tokenizer = tokenizer
        if steps_per_epoch is not None:
            self.start_step = epoch * steps_per_epoch
            self.total_steps = steps_per_epoch * epochs
            self._check_some_step_has_hard_negatives()
            position = self.resume_position
            if position is not None and position.epoch == epoch and position.step > 0:
                if position.steps_per_epoch != steps_per_epoch:
                    raise hn_state.StateError(
                        f"the step checkpoint was saved with {position.steps_per_epoch} steps per "
                        f"epoch, this run has {steps_per_epoch} (batch size, --accum-freq, world "
                        "size, --workers or --train-num-samples changed); keep them" + epoch_restart(epoch))
                ranks = len(position.rng_epoch_start)
                if ranks != world_size:
                    raise hn_state.StateError(
                        f"the step checkpoint was saved by {ranks} rank(s), this run has "
                        f"{world_size}: each rank's shards and sample order depend on the world "
                        "size, so the batches skipped would not be the ones trained; resume with "
                        f"{ranks} rank(s)" + epoch_restart(epoch))
                if workers is not None and position.workers is not None and position.workers != workers:
                    raise hn_state.StateError(
                        f"the step checkpoint was saved with --workers {position.workers}, this run "
                        f"has --workers {workers}: webdataset splits the shards among the loader "
                        "workers, so the batches skipped would not be the ones trained; resume with "
                        f"--workers {position.workers}" + epoch_restart(epoch))
                if seed is not None and position.seed is not None and position.seed != seed:
                    raise hn_state.StateError(
                        f"the step checkpoint was saved with --seed {position.seed}, this run has "
                        f"--seed {seed}: the seed orders the shards and samples, so the batches "
                        f"skipped would not be the ones trained; resume with --seed {position.seed}"
                        + epoch_restart(epoch))
                self.start_step += position.step

    def _check_some_step_has_hard_negatives(self) -> None:
        problem = self.total_steps and no_hard_negative_step(self.config, self.total_steps)
        if problem:
            raise InputError(problem)

    def check_evaluation_sets(self) -> None:
        """Read every --hn-eval-compositional set and image once, before the first step, so a
        broken set fails now and not after an epoch of training."""
        from .eval import check_compositional_sets

        try:
            counts = check_compositional_sets(self.config.eval_compositional)
        except ValueError as err:
            raise InputError(f"--hn-eval-compositional {self.config.eval_compositional}: {err}") from None
        logging.info("--hn-eval-compositional: %d set(s) checked (%s)", len(counts),
                     ", ".join(f"{name}: {c['items']} items" for name, c in counts.items()))

    def epoch_trained(self, epoch: int) -> None:
        """Warn loudly when an epoch's negatives were all masked slots (nothing generated), its
        mined term never found a bank entry, or its mirror or converse term never had a pair."""
        loss = self.loss
        if loss is None:
            return
        slots, valid = loss.take_negative_counts()
        if self.config.uses_text_negatives and slots and not valid:
            logging.warning("Every hard-negative slot of epoch %d was masked: no caption yielded a "
                            "negative of --hn-types %s (precomputed shards without neg.json, a "
                            "vocabulary or plausibility filter that rejects everything, "
                            "--hn-exclude-negatives holding every negative, or captions the "
                            "generator cannot parse); the run is training without them",
                            epoch, ",".join(self.config.types))
        searched, mined = loss.take_mined_counts()
        if searched and not mined:
            logging.warning("The mined term found no usable memory-bank entry in epoch %d: every "
                            "entry searched was within --hn-false-negative-threshold %g of its anchor's "
                            "image or text (a threshold too low, or a model whose embeddings are "
                            "all alike); the mined term trained nothing", epoch,
                            self.config.false_negative_threshold)
        rows, mirrored, converse = loss.take_mirror_counts()
        axes = ",".join(self.config.mirror)
        if rows and not mirrored:
            logging.warning("No caption of epoch %d had a mirrored pair for --hn-mirror %s (none "
                            "names a relation along those axes, or two colours for a colour "
                            "exchange): the mirror term trained nothing", epoch, axes)
        elif rows and self.config.packs_converse and not converse:
            logging.warning("No mirrored caption of epoch %d could be phrased as a converse (a "
                            "relation with one object named on each side): the converse term "
                            "(--hn-converse-weight) trained nothing", epoch)

    def position_for_epoch(self, epoch: int) -> EpochPosition | None:
        """The resumed step position if `epoch` is the one it was saved in (used once)."""
        position = self.resume_position
        if position is None or position.epoch != epoch:
            return None
        self.resume_position = None
        return position

    def install_stop_handlers(self) -> None:
        """From the first epoch on, SIGUSR2/SIGTERM wait for the step in flight (preemption.py)."""
        if not self._stop_installed:
            self.stop.install()
            self._stop_installed = True

    # ------------------------------------------------------------------ loss and state

    def create_loss(self, *, rank: int, world_size: int, local_loss: bool, gather_with_grad: bool,
                    accum_freq: int):
        """The hard-negative objective, continuing the resumed state if there is one."""
        from .objective import HardNegativeLoss

        loss = HardNegativeLoss(self.config, rank=rank, world_size=world_size, local_loss=local_loss,
                                gather_with_grad=gather_with_grad, accum_freq=accum_freq,
                                start_step=self.start_step, total_steps=self.total_steps,
                                on_step_end=None if self.teacher is None else self.teacher.update)
        try:
            if self.teacher is not None:
                self._restore_teacher()
            if self.pending_state is not None:
                saved = self.pending_state["loss"]
                loss.load_state_dict(saved)
        except ValueError as err:
            raise hn_state.StateError(
                f"the resumed plugin state does not fit this run: {err} (--hn-drop-state starts "
                "the memory bank, rank thresholds and teacher fresh instead; the curriculum follows "
                "the step count)") from None
        if self.pending_state is not None:
            if saved["step"] != self.start_step:
                logging.warning("Hard-negative state was saved at step %s; OpenCLIP resumes at step "
                                "%s (batch size, world size or samples changed): the curriculum "
                                "follows OpenCLIP's step", saved["step"], self.start_step)
            logging.info("=> restored hard-negative state (epoch %s, step %s)",
                         self.pending_state["epoch"], self.start_step)
        self.loss = loss
        return loss

    def _restore_teacher(self) -> None:
        """A resumed run continues the saved teacher. Without one, a frozen teacher of a run
        created with --pretrained stays those weights (what it was at the start); otherwise the
        resumed weights are it."""
        saved = None if self.pending_state is None else self.pending_state.get("teacher")
        if saved is not None:
            self.teacher.load_state_dict(saved)
        elif self.resumed:
            why = ("--hn-drop-state: the saved teacher is not used" if self.config.drop_state
                   else "no saved teacher for this checkpoint")
            if self.config.distill == "frozen" and self.pretrained:
                logging.warning("--hn-distill frozen: %s; the teacher is --pretrained %s, the weights "
                                "the run started from", why, self.pretrained)
                return
            logging.warning("--hn-distill %s: %s; the teacher starts from the resumed weights",
                            self.config.distill, why)
            self.teacher.reset_from_student()

    def input_identities(self) -> dict[str, dict[str, Any]]:
        """What the files the flags name hold (`files.content_identity`: size and the hashes of
        both ends), so a resume can tell a file changed under the same path."""
        from .files import content_identity
        from .neighbors import MANIFEST

        named = {"--hn-vocabulary": self.config.vocabulary, "--hn-plausibility": self.config.plausibility,
                 "--hn-exclude-negatives": self.config.exclude_negatives,
                 "--hn-image-neighbors": self.config.image_neighbors and os.path.join(
                     self.config.image_neighbors, MANIFEST)}
        return {flag: {"path": path, **content_identity(path)} for flag, path in named.items()
                if path and os.path.isfile(path)}

    def state(self) -> dict[str, Any]:
        assert self.loss is not None, "the loss is created before the first epoch ends"
        state = {"config": dataclasses.asdict(self.config), "loss": self.loss.state_dict(),
                 "inputs": self.input_identities()}
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        return state

    def checkpoint_loaded(self, path: str, checkpoint, picked: bool = False) -> None:
        """On a resume from `path`, pick up the plugin state: inside a step checkpoint, else
        beside the checkpoint of its epoch (`StateError` names a damaged one). A step
        checkpoint's place in its epoch is kept under --hn-drop-state too: it is OpenCLIP's
        part of the resume (the epoch's first steps would otherwise be trained twice).

        `picked`: `--resume latest` chose `path` where the plugin cannot walk back past it
        (OpenCLIP reads `epoch_latest.pt` itself under --save-most-recent; the remote pick), so
        a missing state is a warning and the run goes on without it, as a refusal would fail
        every restart of the job (a kill between OpenCLIP's two saves of an epoch leaves
        `epoch_latest.pt` one epoch behind its record)."""
        self.resumed = True
        if not isinstance(checkpoint, dict) or "epoch" not in checkpoint:
            return
        position = EpochPosition.from_checkpoint(checkpoint, path)
        if position is not None:
            self.resume_position = position
            logging.info("=> %s is a step checkpoint: epoch %d continues at step %d", path,
                         position.epoch, position.step)
        if self.config.drop_state:
            logging.warning("--hn-drop-state: resuming %s without its plugin state (memory bank, "
                            "rank thresholds and distillation teacher start fresh; the curriculum "
                            "follows the step count as before)", path)
            return
        if position is not None:
            if checkpoint.get(hn_state.EMBEDDED_STATE_KEY) is not None:
                embedded = checkpoint[hn_state.EMBEDDED_STATE_KEY]
                self._warn_config_changes(embedded.get("config", {}), embedded.get("inputs"))
                self.pending_state = checkpoint[hn_state.EMBEDDED_STATE_KEY]
            return
        try:
            found = hn_state.find_state(path, checkpoint["epoch"], checkpoint.get("state_dict"))
        except hn_state.MissingState as err:
            if not picked:
                raise
            logging.warning("%s; --resume latest picked it and cannot fall back, so the run goes on "
                            "without it: bank, thresholds and teacher start fresh", err)
            return
        if found is None:  # a checkpoint of plain OpenCLIP (no record of a state beside it)
            logging.warning("No hard-negative state for epoch %s beside %s: bank, thresholds and "
                            "teacher start fresh (the curriculum follows the step count)",
                            checkpoint["epoch"], path)
            return
        state_file, saved = found
        self._warn_config_changes(saved.get("config", {}), saved.get("inputs"))
        self.pending_state = saved
        if saved.get("rng_epoch_start") is not None:  # the next epoch replays as it would have
            self.resume_position = EpochPosition(checkpoint["epoch"], 0, 0, 0,
                                                 saved["rng_epoch_start"], None)
        logging.info("=> found hard-negative state %s", state_file)

    def _warn_config_changes(self, saved: dict[str, Any], inputs: dict[str, Any] | None = None) -> None:
        """Name each flag that differs from the saved run's; a field an older version did not
        save had its default then, or for a flag whose default is new behaviour, the old one
        (`config.BEHAVIOUR_BEFORE_FLAG`). Also each input file that a flag names as before but
        whose contents changed since (`inputs`: the saved `input_identities`)."""
        for flag, identity in self.input_identities().items():
            before = (inputs or {}).get(flag)
            if before is not None and before.get("path") == identity["path"] and before != identity:
                logging.warning("Resuming with %s %s changed since the checkpoint was saved (its "
                                "contents differ): from here on the run trains on other %s than "
                                "before", flag, identity["path"],
                                "neighbours" if flag == "--hn-image-neighbors" else "negatives")
        defaults = {f.name: f.default for f in dataclasses.fields(self.config)
                    if f.default is not dataclasses.MISSING}
        for name, value in dataclasses.asdict(self.config).items():
            if name in BOOKKEEPING_FIELDS or (name not in saved and name not in defaults):
                continue
            before = saved.get(name, BEHAVIOUR_BEFORE_FLAG.get(name, defaults.get(name)))
            if before != value:
                logging.warning("Resuming with %s changed: %r -> %r", flag_of(name),
                                before, value)

    def save_state(self, checkpoint_dir: str, completed_epoch: int, checkpoints: list[str],
                   trained_as: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        """The plugin state of every epoch OpenCLIP checkpoints (rank 0; all ranks agree), and
        beside each checkpoint the model it was trained as (provenance.py). `weights` (the
        model's state dict, which OpenCLIP's checkpoint of this epoch will hold) ties the state
        to that checkpoint (`state.weights_digest`)."""
        if checkpoints:
            path = hn_state.save_state(checkpoint_dir, completed_epoch,
                                       {**self.state(), "trained_as": trained_as,
                                        hn_state.WEIGHTS_DIGEST_KEY: hn_state.weights_digest(weights)})
            sidecars = [os.path.join(checkpoint_dir, c) for c in checkpoints]
            try:
                provenance.write_sidecars(sidecars, trained_as)
            except OSError as err:
                raise hn_state.CheckpointWriteError(
                    hn_state.write_failure(provenance.sidecar_path(sidecars[0]), err)) from err
            logging.info("Saved hard-negative state to %s", path)
        hn_state.prune_states(checkpoint_dir, completed_epoch)

    # ------------------------------------------------------------------ evaluation

    def evaluation_due(self, completed_epoch: int, epochs: int) -> bool:
        """Every --hn-eval-every epochs and after the last one, as OpenCLIP's --val-frequency (a
        run shorter than the interval is still evaluated once)."""
        return bool(self.config.eval_compositional) and (
            completed_epoch % self.config.eval_every == 0 or completed_epoch == epochs)

    def evaluate(self, model: torch.nn.Module, *, device, batch_size: int, autocast,
                 input_dtype) -> dict[str, float]:
        """--hn-eval-compositional's per-type accuracies for the model being trained; a stop
        signal ends it (`eval.EvaluationStopped`), since OpenCLIP's epoch checkpoint waits for it."""
        from .eval import evaluate_compositional

        unwrapped = model.module if hasattr(model, "module") else model
        return evaluate_compositional(unwrapped, self.preprocess_val, self.eval_tokenizer,
                                      self.config.eval_compositional, device=device,
                                      batch_size=batch_size, autocast=autocast,
                                      input_dtype=input_dtype,
                                      stop=lambda: self.stop.received is not None)
