"""The adapter: the only module that touches `open_clip_train`. It hooks OpenCLIP's seams, never its loop.

`Plugin` is the plugin object. On an OpenCLIP with plugin hook points (patches/) it is registered
under the `open_clip_train.plugins` entry-point group and enabled by `--plugins open_clip_hn`; on
a stock OpenCLIP, `install()` replaces names in `open_clip_train.main` with thin wrappers that
call the originals and the same `Plugin` methods, so both routes train alike:

    parse_args                   OpenCLIP's parser + the --hn-* flags -> Plugin.configure
    create_model_and_transforms  -> Plugin.model_created
    pt_load (--resume)           -> Plugin.checkpoint_loaded
    get_data                     -> Plugin.get_data (wraps OpenCLIP's)
    create_loss                  -> Plugin.create_loss (wraps OpenCLIP's)
    train_one_epoch              -> Plugin.train_one_epoch (wraps OpenCLIP's), Plugin.epoch_end
    get_latest_checkpoint        newest readable checkpoint, step checkpoints included
    torch (main's name for it)   the same module, with `save` atomic (temp file + rename)
                                 -> Plugin.checkpoint_saved after epoch_N.pt

The last two are what the patch changes in OpenCLIP itself.

The plugin's part of the run lives in one `run.HardNegativeRun`, built by `configure` and held by
the plugin object; with no `--hn-*` flag there is none, and every hook hands straight through.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import logging
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import weakref
from typing import Any, Iterator

import open_clip
import open_clip_train.data as oc_data
import open_clip_train.main as oc_main
import open_clip_train.params as oc_params
import torch
from open_clip_train.distributed import is_master
from open_clip_train.precision import get_autocast

from . import provenance
from . import state as hn_state
from .argtypes import InputError
from .config import (BOOKKEEPING_FIELDS, TRAIN_DATA_VOCABULARY, HNConfig, add_hn_arguments, given_hn_flags,
                     with_origin)
from .distributed import any_rank
from .eval import EvaluationStopped, log_metrics
from .eval_sets import first_few
from .files import read_model_config, remove_stale_temps, unknown_model_hint
from .negatives.shards import lacks_end_marker
from .negatives.taxonomy import NEGATIVE_TYPES
from .packing import PackedNegativeTokenizer, samples_with_precomputed_negatives
from .preemption import (POSITION_KEY, EpochPosition, SteppedLoader, StepCheckpointer,
                         counting_from_position, epoch_of_checkpoint_name, ignore_stop_signals_in_workers,
                         prune_step_checkpoints)
from .recipes import expand_recipe, recipe_argv, recipe_path, spell_out_flags
from .run import (HardNegativeRun, TrainCaptions, check_finite_weights, epoch_checkpoints,
                  no_hard_negative_step)
from .sample_order import seed_sample_shuffle

PLUGIN_NAME = "open_clip_hn"


# ---------------------------------------------------------------------------- arguments


class _CapturedParser(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("captured")
        self.parser = parser


def build_parser() -> argparse.ArgumentParser:
    """OpenCLIP's own argument parser with the plugin's `--hn-*` group added.

    OpenCLIP builds its parser inside `parse_args`; we capture it at its `parse_args` call, so
    `--help` lists every flag of both and unknown flags fail with argparse's usual message.
    """
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _CapturedParser(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        oc_params.parse_args([])
    except _CapturedParser as captured:
        parser = captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    parser.prog = "python -m open_clip_hn.train"
    return add_hn_arguments(parser)


def _hn_parser() -> argparse.ArgumentParser:
    return add_hn_arguments(argparse.ArgumentParser(
        prog="python -m open_clip_hn.train", add_help=False, allow_abbrev=False))


def _with_recipe(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    try:
        return expand_recipe(argv, parser)
    except (OSError, ValueError) as err:
        parser.error(f"--hn-config {recipe_path(spell_out_flags(argv, parser))}: {err}")


def _register_model_config(path: str, model: str, parser: argparse.ArgumentParser) -> None:
    try:
        read_model_config(path)
    except ValueError as err:
        parser.error(str(err))
    open_clip.add_model_config(path)
    name = os.path.splitext(os.path.basename(path))[0]
    if model != name:
        logging.warning("--model-config registered model '%s' but --model is '%s'", name, model)


def _check_compatible(config: HNConfig, args: argparse.Namespace) -> None:
    """Refuse OpenCLIP modes the hard-negative objective does not implement (never fall back)."""
    if args.siglip:
        raise ValueError("--siglip: the hard-negative objectives are softmax (InfoNCE) losses; "
                         "drop --siglip or the --hn-* flags")
    if args.distill_model:
        raise ValueError("--distill-model: OpenCLIP's distillation from another model is not "
                         "combined with hard negatives; --hn-distill distils from the model being "
                         "continued")
    if args.horovod:
        raise ValueError("--horovod: use torch.distributed (the default) with hard negatives")
    if "coca" in args.model.lower():
        raise ValueError(f"--model {args.model}: CoCa's captioning loss is not supported with --hn-*")
    if config.eval_compositional and not os.path.isdir(config.eval_compositional):
        raise ValueError(f"--hn-eval-compositional {config.eval_compositional}: no such folder; pass "
                         "a folder of SugarCrepe/ARO-layout sets (see README, Evaluation)")
    _check_local_train_data(args)
    if config.negatives == "precomputed" and args.train_data:
        _check_precomputed_settings(config, args)
    if config.image_neighbors:
        from .neighbors import check_index

        if _not_webdataset(args):
            raise ValueError(f"--hn-image-neighbors reads webdataset shards (it finds each sample "
                             f"by shard and key), got {_train_data_named(args)}; write the data as "
                             "shards, or drop --hn-image-neighbors")
        shards = oc_data.expand_urls(args.train_data)[0] if args.train_data else None
        check_index(config.image_neighbors, shards, config.image_neighbors_per_sample)
    _check_resume_latest_finds_the_run(args)
    if args.resume not in (None, "latest") and not hn_state.is_url(args.resume):
        try:
            hn_state.load_checkpoint_file(args.resume)
        except ValueError as err:
            raise ValueError(f"--resume {args.resume}: {err}; pass a checkpoint of the run "
                             "(epoch_N.pt, or --resume latest)") from None
    if config.lm:
        from .negatives.lm import check_masked_lm

        check_masked_lm(config.lm, "--hn-lm")
    if config.vocabulary not in (None, TRAIN_DATA_VOCABULARY) and not os.path.isfile(config.vocabulary):
        raise ValueError(f"--hn-vocabulary {config.vocabulary}: {_not_a_file(config.vocabulary)}; pass a word list "
                         f"(`python -m open_clip_hn.negatives vocabulary` writes one) or "
                         f"{TRAIN_DATA_VOCABULARY}")
    if config.plausibility not in (None, TRAIN_DATA_VOCABULARY) and not os.path.isfile(config.plausibility):
        raise ValueError(f"--hn-plausibility {config.plausibility}: {_not_a_file(config.plausibility)}; "
                         "pass a caption file, "
                         f"a model (`python -m open_clip_hn.negatives plausibility` writes one) or "
                         f"{TRAIN_DATA_VOCABULARY}")
    _check_run_flags(config, args)


def _check_run_flags(config: HNConfig, args: argparse.Namespace) -> None:
    """The plugin's flags against OpenCLIP's (data, resume, model), reading no file but a model
    config: also before `--hn-print-config` prints the recipe, so a printed configuration is one
    a run accepts. `local` reads a ViT's patch tokens, so another model is refused here."""
    if config.sample_shuffle != "seeded" and _not_webdataset(args):
        raise ValueError(f"--hn-sample-shuffle {config.sample_shuffle} acts on webdataset's shuffle "
                         f"buffer, and {_train_data_named(args)} is not webdataset (its order is "
                         "already reproducible); drop the flag")
    locked = {"text": args.lock_text, "image": args.lock_image}.get(config.choice_grad)
    if "choice" in config.loss and locked:
        raise ValueError(f"--hn-choice-grad {config.choice_grad} trains only the {config.choice_grad} "
                         f"tower through the choice term, and --lock-{config.choice_grad} freezes it: "
                         "the term would train nothing; drop one of them")
    if config.save_every_steps and not (args.logs and args.logs.lower() != "none"):
        raise ValueError(f"--hn-save-every-steps {config.save_every_steps} writes checkpoints, and "
                         "--logs none saves none; pass --logs DIR, or drop --hn-save-every-steps")
    if config.drop_state and args.resume is None:
        raise ValueError("--hn-drop-state acts on a resume, and this run resumes nothing; pass "
                         "--resume PATH|latest, or drop --hn-drop-state")
    if ":" not in args.model and _model_config(args) is None:
        raise ValueError(f"--model {args.model}: OpenCLIP has no model of that name; "
                         f"{unknown_model_hint(args.model)}")
    _check_run_length(config, args)
    _check_text_lock(args)
    if config.uses_tokens:
        from .token_features import check_token_model_config

        model_config = _model_config(args)
        if model_config is not None:
            check_token_model_config(model_config)


def _check_text_lock(args: argparse.Namespace) -> None:
    """OpenCLIP's `CLIP` (its built-in text tower) locks the text tower only with its LayerNorms
    frozen: `--lock-text` alone ends in an AssertionError once the model is built."""
    if not args.lock_text or args.lock_text_freeze_layer_norm or getattr(args, "force_custom_text", False):
        return
    model_config = _model_config(args)
    if model_config is None or model_config.get("custom_text") or \
            "hf_model_name" in model_config.get("text_cfg", {}):
        return
    raise ValueError(f"--lock-text: OpenCLIP locks the built-in text tower of --model {args.model} "
                     "only with its LayerNorms frozen (it asserts 'Unfreezing LayerNorm is not "
                     "supported'); add --lock-text-freeze-layer-norm")


def _bank_smaller_than_a_step(config: HNConfig, args: argparse.Namespace, world: int) -> str | None:
    """Why the memory bank cannot hold what one optimizer step pushes (every rank's pairs, all
    `--accum-freq` micro-batches), or None."""
    global_batch = args.batch_size * world * args.accum_freq
    if not 0 < config.memory_bank_size < global_batch:
        return None
    accum = f" x --accum-freq {args.accum_freq}" if args.accum_freq > 1 else ""
    return (f"--hn-memory-bank-size {config.memory_bank_size} is smaller than one global batch "
            f"({args.batch_size} x {world} ranks{accum} = {global_batch}): the bank would hold only "
            f"part of the latest batch; pass at least {global_batch} (several batches is usual)")


def _check_run_length(config: HNConfig, args: argparse.Namespace) -> None:
    """What the command line alone decides of the memory bank and the curriculum (the world size
    as the launcher's environment gives it), checked again once the data is built: refused
    here, before OpenCLIP makes the run's folder (which then blocks the --name) and before
    `--hn-print-config` prints a configuration the run would refuse."""
    from open_clip_train.distributed import world_info_from_env

    world = world_info_from_env()[2]
    problem = _bank_smaller_than_a_step(config, args, world)
    if problem:
        raise ValueError(problem)
    if args.train_num_samples and not _not_webdataset(args):  # OpenCLIP's count of its batches
        batches = math.ceil(args.train_num_samples / (args.batch_size * world))
        workers = max(1, args.workers)
        steps = math.ceil(batches / workers) * workers // args.accum_freq * args.epochs
        problem = steps and no_hard_negative_step(config, steps)
        if problem:
            raise ValueError(problem)


def _check_local_train_data(args: argparse.Namespace) -> None:
    """Local `--train-data` is there as OpenCLIP will read it. Every webdataset shard exists:
    OpenCLIP's loader logs a missing shard and goes on, so a mistyped range trains on part of
    the data (or, with none found, waits forever for a sample). A CSV has the image and caption
    columns (OpenCLIP's loader raised a bare KeyError). Remote (`://`) and `pipe:` sources are
    read as given."""
    if not args.train_data or args.dataset_type == "synthetic":
        return
    captions = _train_captions(args)
    if captions.is_csv:
        if os.path.isfile(args.train_data):
            import pandas as pd

            try:
                columns = list(pd.read_csv(args.train_data, sep=args.csv_separator, nrows=0).columns)
            except (ValueError, UnicodeDecodeError, OSError):  # pandas' parser errors: OpenCLIP's to report
                return
            missing = [f"{flag} {key}" for flag, key in (("--csv-img-key", args.csv_img_key),
                                                          ("--csv-caption-key", args.csv_caption_key))
                       if key not in columns]
            if missing:
                raise ValueError(f"--train-data {args.train_data}: no column named by "
                                 f"{' or '.join(missing)} (its columns: {', '.join(map(str, columns))}); "
                                 "pass the columns' names (and --csv-separator)")
        return
    if captions.synthetic:
        return
    urls = oc_data.expand_urls(args.train_data)[0]
    missing = [url for url in urls if not hn_state.is_url(url) and not url.startswith("pipe:")
               and not os.path.isfile(url)]
    if missing:
        raise ValueError(f"--train-data: {len(missing)} of {len(urls)} shards not found "
                         f"({first_few(missing, 3)}); "
                         "fix the path or the brace range (OpenCLIP's loader would skip them)")
    first = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"  # one read per shard
    cut = [url for url in urls if first and os.path.isfile(url) and lacks_end_marker(url)]
    if cut:
        logging.warning("--train-data: %d of %d shards do not end in tar's end-of-archive marker, so "
                        "they look cut short (%s): OpenCLIP's loader trains on what it can read of "
                        "them and skips the rest with a log line; re-create or re-download them",
                        len(cut), len(urls), first_few(cut, 3))


def _train_data_named(args: argparse.Namespace) -> str:
    if args.dataset_type == "synthetic":
        return "--dataset-type synthetic"
    return f"--train-data {args.train_data} (--dataset-type {args.dataset_type})"


def _not_webdataset(args: argparse.Namespace) -> bool:
    """The train data is CSV or synthetic (as OpenCLIP's `get_data` will read it)."""
    if args.dataset_type == "synthetic":
        return True
    if not args.train_data:
        return False
    captions = _train_captions(args)
    return captions.is_csv or captions.synthetic


def _model_config(args: argparse.Namespace) -> dict | None:
    """`--model`'s OpenCLIP config, from `--model-config` when that file names it, else from
    OpenCLIP's registry; None for a hub or local-folder model (`hf-hub:`, `local-dir:`), whose
    config is read when the model is built (and the built model checked then)."""
    if args.model_config and os.path.splitext(os.path.basename(args.model_config))[0] == args.model:
        return read_model_config(args.model_config)
    if ":" in args.model:  # get_model_config would download or open files here
        return None
    return open_clip.get_model_config(args.model)


def _print_config_if_asked(namespace: argparse.Namespace, argv: list[str],
                           parser: argparse.ArgumentParser) -> None:
    """`--hn-print-config`: print the resolved recipe and exit, once its flags pass a run's
    checks of them (`HNConfig.from_args`): a printed configuration that training refuses would be
    a broken recipe."""
    if namespace.hn_print_config:
        from .recipes import format_resolved_config

        config = _hn_config(namespace, argv, parser)
        try:
            _check_run_flags(config, namespace)
        except ValueError as err:
            parser.error(str(err))
        print(format_resolved_config(namespace, parser))
        sys.exit(0)


def _hn_config(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> HNConfig:
    """The checked configuration of the `--hn-*` flags of `argv` (recipe already expanded; the
    caller put the flags typed on the command line in `args.hn_typed`), also put back on `args`
    (a recipe's settings for a part the command line switched off are dropped there too)."""
    args.hn_given = given_hn_flags(argv, parser)
    try:
        config = HNConfig.from_args(args, recipe=recipe_config(args, parser))
    except ValueError as err:
        parser.error(str(err))
    config.update_args(args)
    args.hn_dropped = config.dropped  # recorded with the run's flags (params.txt)
    return config


def recipe_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> HNConfig | None:
    """The `--hn-config` file's own configuration (unchecked), to tell the parts it switches on
    from those the command line switches on or off."""
    if args.hn_config_file is None:
        return None
    return HNConfig.unchecked(_hn_parser().parse_known_args(recipe_argv(args.hn_config_file, parser))[0])


def configure(args: argparse.Namespace, argv: list[str],
              parser: argparse.ArgumentParser) -> HardNegativeRun | None:
    """The run's plugin part from the parsed flags (None without `--hn-*` flags); bad
    combinations end in `parser.error`."""
    config = _hn_config(args, argv, parser)
    run = None
    try:
        if config.enabled:
            _check_compatible(config, args)
            run = HardNegativeRun(config)
            run.excluded_negatives  # read now: a bad one stops the run before any work
            if config.parses_captions:
                check_caption_parser()
    except ValueError as err:
        parser.error(with_origin(config, str(err)))
    if args.model_config:
        _register_model_config(args.model_config, args.model, parser)
    try:
        picked = check_resume_latest(args, with_state=_resumes_state(run))
        if run is not None:
            _check_resumed_model(args, picked or args.resume)
    except hn_state.StateError as err:
        parser.error(str(err))
    return run


def _check_resume_latest_finds_the_run(args: argparse.Namespace) -> None:
    """`--resume latest` finds the run it is meant to continue. OpenCLIP starts over without a
    word where it cannot: without --name (each run gets a new dated folder, so a stopped run's
    checkpoints are left behind), and with --save-most-recent in a folder of epoch checkpoints
    but no `epoch_latest.pt` (it then trains from scratch over them)."""
    if args.resume != "latest":
        return
    if args.name is None:
        raise ValueError("--resume latest continues the experiment --name names; without --name "
                         "OpenCLIP makes a new dated folder for every run, so it never resumes (a "
                         "stopped run's checkpoints are left behind): pass --name NAME")
    if args.save_most_recent and args.remote_sync is None:
        folder = os.path.join(args.logs, args.name, "checkpoints")
        newest = hn_state.checkpoints_newest_first(folder)
        if newest and not os.path.exists(os.path.join(folder, oc_main.LATEST_CHECKPOINT_NAME)):
            raise ValueError(f"--resume latest with --save-most-recent resumes only "
                             f"{os.path.join(folder, oc_main.LATEST_CHECKPOINT_NAME)}, which is not "
                             f"there, while the run's folder holds {newest[0]}: OpenCLIP would train "
                             "from scratch over its checkpoints; run without --save-most-recent (then "
                             "--resume latest takes the newest), or pass another --name")


def check_caption_parser() -> None:
    """WordNet and the POS tagger the loader will parse captions with, loaded here (and then
    inherited by forked loader workers): missing or damaged NLTK data failed in a loader worker
    after training had begun, or at the first caption needing it, possibly hours in."""
    from .negatives import NegativeGenerator, NLTKDataError

    try:
        NegativeGenerator().load()
    except NLTKDataError as err:
        raise ValueError(str(err)) from None


def _resumes_state(run: HardNegativeRun | None) -> bool:
    """A resume of this run needs the checkpoint's plugin state (so `--resume latest` skips a
    checkpoint whose state is damaged): the plugin is on and --hn-drop-state is not given."""
    return run is not None and not run.config.drop_state


def _warn_random_teacher(args: argparse.Namespace, config: HNConfig) -> None:
    """--hn-distill keeps what the continued model does; a run that starts from random weights
    has nothing to keep, and its teacher pulls the student toward a random model's similarities."""
    pretrained_elsewhere = (args.model.startswith(("hf-hub:", "local-dir:"))
                            or getattr(args, "pretrained_image", False))
    if config.distill != "none" and not (args.pretrained or args.resume or pretrained_elsewhere) \
            and is_master(args):
        logging.warning("--hn-distill %s with neither --pretrained nor --resume: the teacher starts as "
                        "the randomly initialised model, so the distill term pulls toward a random "
                        "model's similarities; continue a trained checkpoint (--pretrained PATH) or "
                        "pass --hn-distill none", config.distill)


def _check_resumed_model(args: argparse.Namespace, checkpoint: str | None) -> None:
    """The checkpoint a run resumes was trained as this `--model` (its record, provenance.py):
    another model of the same weight shapes (GELU vs QuickGELU, an edited config) loads without
    an error, trains on as the wrong network and records the new model as the checkpoint's."""
    if (not checkpoint or checkpoint == "latest" or hn_state.is_url(checkpoint)
            or not os.path.isfile(checkpoint)):
        return
    try:
        record = provenance.read_record(checkpoint)
    except ValueError:  # an unreadable sidecar: eval names it; the resume does not depend on it
        return
    problem = record and provenance.model_mismatch(record, args.model, _model_config(args))
    if problem:
        raise hn_state.StateError(
            f"--resume {checkpoint}: {problem}; resume with the --model (and --model-config) it "
            f"was trained with, or start a new run from its weights with --pretrained {checkpoint}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """OpenCLIP's `parse_args` plus the `--hn-*` flags (and an optional recipe file); configures
    the installed plugin's run."""
    with early_warnings(new_command_line=True):
        parser = build_parser()
        typed = given_hn_flags(argv, parser)  # before the recipe's flags join them
        argv = _with_recipe(list(argv), parser)
        namespace = parser.parse_args(argv)  # --help, unknown flags and bad values end here
        namespace.hn_typed = typed
        _print_config_if_asked(namespace, argv, parser)
        hn_namespace, openclip_argv = _hn_parser().parse_known_args(argv)
        args = _ORIGINALS.get("parse_args", oc_params.parse_args)(openclip_argv)
        for name, value in vars(hn_namespace).items():
            setattr(args, name, value)
        args.hn_typed = typed
        _PLUGIN.run = configure(args, argv, parser)
    _PLUGIN.args, _PLUGIN.resumes_latest = args, args.resume == "latest"
    if _PLUGIN.run is None:  # a run without --hn-* keeps exactly OpenCLIP's args
        for name in (*vars(hn_namespace), *(f"hn_{name}" for name in BOOKKEEPING_FIELDS)):
            delattr(args, name)
    return args


# ---------------------------------------------------------------------------- model


class CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP that accepts OpenCLIP's `device_ids=[cpu]`: torch refuses device ids for CPU modules.

    OpenCLIP 3.3 passes `device_ids=[device]` whatever the device, which makes every CPU
    (gloo) multi-process run fail at start-up; with no device ids the behaviour is the same.
    Applied to every run this adapter starts, with or without `--hn-*` flags (README says so).
    """

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


LOCK_NAME = ".hn-lock"  # in the experiment folder, held by the process that trains into it
_EARLY_WARNINGS: list[logging.LogRecord] = []  # logged while the command line was read
_HAD_EARLY_WARNINGS: weakref.WeakSet = weakref.WeakSet()  # root handlers present then (they logged them)


class _EarlyWarnings(logging.Handler):
    """Keeps the warnings logged while the command line is read (before OpenCLIP sets up its
    log), printing them where nothing else would (`echo`)."""

    def __init__(self, echo: bool):
        super().__init__(logging.WARNING)
        self.echo = echo
        self.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s",
                                            datefmt="%Y-%m-%d,%H:%M:%S"))  # OpenCLIP's

    def emit(self, record: logging.LogRecord) -> None:
        _EARLY_WARNINGS.append(record)
        if self.echo:
            sys.stderr.write(self.format(record) + "\n")


@contextlib.contextmanager
def early_warnings(new_command_line: bool = False) -> Iterator[None]:
    """Warnings logged inside reach stderr and, once OpenCLIP has set up the run's log,
    `out.log` (`log_early_warnings`). Without this the first `logging.warning` configured the
    root logger itself, which then printed every later line of the run twice, and `out.log`
    never held the warning. A new command line drops what an earlier one left unlogged."""
    if new_command_line:
        _EARLY_WARNINGS.clear()
    root = logging.getLogger()
    handler = _EarlyWarnings(echo=not root.handlers)
    _HAD_EARLY_WARNINGS.update(root.handlers)  # a caller's own log got them already
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def log_early_warnings() -> None:
    """Write the warnings of `early_warnings` into the run's log files (OpenCLIP's `out.log`:
    model creation is the first hook after it is set up); they were printed when they came."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler not in _HAD_EARLY_WARNINGS:
            for record in _EARLY_WARNINGS:
                handler.handle(record)
    _EARLY_WARNINGS.clear()
    _HAD_EARLY_WARNINGS.clear()


def _model_created(run: HardNegativeRun | None, model, preprocess_val, args: argparse.Namespace,
                   device) -> None:
    """What both routes do once OpenCLIP has made the model: CPU DDP allowed, the early warnings
    logged into `out.log`, and, for a plugin run, the folder claimed and the run attached."""
    _allow_cpu_ddp(device)
    log_early_warnings()
    if run is not None:
        claim_experiment_folder(args)
        _warn_random_teacher(args, run.config)
        run.model_created(model, preprocess_val, args.pretrained)


_LOCKS: dict[str, Any] = {}  # lock path -> its open file, held until the process ends


def claim_experiment_folder(args: argparse.Namespace) -> None:
    """Refuse a second run training into an experiment folder a live process trains into (two
    jobs submitted with one --logs/--name, or a resubmission while the first still runs): both
    would resume the same checkpoints and overwrite each other's. Rank 0 holds a POSIX lock on
    LOCK_NAME for its lifetime: it goes with the process (a requeued job is not refused), and
    unlike flock it is not shared with forked loader workers, which may outlive a killed run."""
    import fcntl
    import socket

    if not args.log_path or args.rank != 0:  # --log-local: each node's first task logs too
        return
    folder = os.path.dirname(args.log_path)
    path = os.path.join(folder, LOCK_NAME)
    if path in _LOCKS:
        return
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
        handle.seek(0)
        holder = handle.read().strip() or "a process"
        handle.close()
        raise InputError(f"{holder} is training into {folder}: two runs in one experiment folder "
                         "overwrite each other's checkpoints; wait for it to end (or stop it), or "
                         "pass another --name") from None
    except OSError as err:  # a file system without locks
        handle.close()
        logging.warning("Cannot lock %s (%s): a second run into %s would not be refused", path, err, folder)
        return
    job = os.environ.get("SLURM_JOB_ID")
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}" + (f" (SLURM job {job})" if job else ""))
    handle.flush()
    _LOCKS[path] = handle
    _remove_killed_saves(args.checkpoint_path)


def _remove_killed_saves(folder: str) -> None:
    """Remove the temp files of saves a kill interrupted (a whole checkpoint's size each, which
    nothing else removes): with the folder's lock held, no training run writes here (another
    live process of this host keeps its temps). The patched OpenCLIP writes `epoch_N.pt.tmp`,
    --save-most-recent `tmp.pt`; this plugin's writes are `files.atomic_open`'s temps."""
    if not os.path.isdir(folder):
        return
    removed = remove_stale_temps(folder, every_writer_gone=True)
    for name in os.listdir(folder):  # the patched OpenCLIP's and --save-most-recent's temps
        if re.fullmatch(r"epoch_(\d+|latest)\.pt\.tmp|tmp\.pt", name):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    if removed:
        logging.info("Removed %d temp file(s) of interrupted saves from %s: %s", len(removed), folder,
                     ", ".join(sorted(removed)))


def _allow_cpu_ddp(device) -> None:
    if torch.device(device).type == "cpu" and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel


# ---------------------------------------------------------------------------- data


@contextlib.contextmanager
def _precomputed_negatives_source() -> Iterator[None]:
    """While OpenCLIP builds its train pipeline, read `neg.json` members along with each sample."""
    original = oc_data.tarfile_to_samples_nothrow

    def source(src, handler=oc_data.log_and_continue):
        return samples_with_precomputed_negatives(original(src, handler=handler), handler)

    oc_data.tarfile_to_samples_nothrow = source
    try:
        yield
    finally:
        oc_data.tarfile_to_samples_nothrow = original


def _precomputed_shards(args: argparse.Namespace) -> list[str]:
    data = args.train_data or ""
    if not (args.dataset_type == "webdataset" or data.endswith(".tar") or "::" in data):
        raise ValueError(f"--hn-negatives precomputed needs webdataset shards, got --train-data "
                         f"{data!r} (--dataset-type {args.dataset_type})")
    return oc_data.expand_urls(data)[0]  # every local shard, not the first


def _check_precomputed_settings(config: HNConfig, args: argparse.Namespace) -> None:
    """The run's K and types against what precompute made (its settings files only: at parse
    time, before any set-up, and from submit.py before queueing)."""
    from .negatives.manifest import check_precomputed_settings

    check_precomputed_settings(_precomputed_shards(args), config.num_negatives,
                               None if set(config.types) == set(NEGATIVE_TYPES) else config.types,
                               num_is_default="--hn-num-negatives" not in config.given)


def _check_precomputed_shards(args: argparse.Namespace) -> None:
    from .negatives.manifest import check_precomputed_shards

    check_precomputed_shards(_precomputed_shards(args))


def _train_captions(args: argparse.Namespace) -> TrainCaptions:
    data = args.train_data or ""
    synthetic = args.dataset_type == "synthetic"
    is_csv = not synthetic and oc_data.get_dataset_fn(data, args.dataset_type) is oc_data.get_csv_dataset
    return TrainCaptions(data, is_csv=is_csv, synthetic=synthetic, csv_separator=args.csv_separator,
                         csv_caption_key=args.csv_caption_key)


def train_tokenizer(run: HardNegativeRun, tokenizer, args: argparse.Namespace) -> PackedNegativeTokenizer:
    """The run's packing tokenizer for OpenCLIP's train split (`--train-data` read only when
    `--hn-vocabulary` or `--hn-plausibility train-data` needs its captions)."""
    needs_captions = TRAIN_DATA_VOCABULARY in (run.config.vocabulary, run.config.plausibility)
    return run.train_tokenizer(tokenizer, _train_captions(args) if needs_captions else None)


def _fold_precomputed_after(stage, handler, samples):
    """`stage`, then the precomputed-negatives fold for the samples it brought in (a no-op for
    samples already folded: their neg.json member is gone)."""
    return samples_with_precomputed_negatives(stage(samples), handler)


def _add_image_neighbors(loader, config: HNConfig, args: argparse.Namespace) -> None:
    """Make each train batch hold samples together with their image neighbours (NegCLIP)."""
    from .neighbors import insert_before_decode, neighbor_stage

    stage = neighbor_stage(config.image_neighbors, config.image_neighbors_per_sample,
                           args.batch_size, shards=oc_data.expand_urls(args.train_data)[0])
    if config.negatives == "precomputed":  # neighbours are read past the stage that folds neg.json
        stage = functools.partial(_fold_precomputed_after, stage, oc_data.log_and_continue)
    insert_before_decode(loader, stage)
    logging.info("Hard image negatives: each sample is followed by %d of its neighbours from %s",
                 config.image_neighbors_per_sample, config.image_neighbors)


def _get_data(run: HardNegativeRun, args, preprocess_fns, epoch, tokenizer, get):
    """OpenCLIP's `get_data`, with the train split tokenized together with its hard negatives."""
    config = run.config
    if config.eval_compositional and is_master(args):
        run.check_evaluation_sets()  # every set and image read once, before the first step
    if not config.packs_texts:
        data = get(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    else:
        if config.negatives == "precomputed":
            _check_precomputed_shards(args)
        train_args = copy.copy(args)
        train_args.val_data = train_args.imagenet_val = train_args.imagenet_v2 = None
        source = (_precomputed_negatives_source() if config.negatives == "precomputed"
                  else contextlib.nullcontext())
        with source:
            data = get(train_args, preprocess_fns, epoch=epoch,
                       tokenizer=train_tokenizer(run, tokenizer, args))
        if args.val_data or args.imagenet_val or args.imagenet_v2:
            eval_args = copy.copy(args)
            eval_args.train_data = None
            evaluation = get(eval_args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
            data.update({k: v for k, v in evaluation.items() if k != "train"})
    if config.sample_shuffle == "seeded" and "train" in data:
        seed_sample_shuffle(data["train"], args.seed, args.rank)
    if config.image_neighbors and "train" in data:
        _add_image_neighbors(data["train"].dataloader, config, args)
    if "train" in data:  # a stop signal to the process group must not end the workers first
        ignore_stop_signals_in_workers(data["train"].dataloader)
    run.data_ready(tokenizer, epoch, _steps_per_epoch(data, args), args.epochs, world_size=args.world_size,
                   workers=None if args.dataset_resampled or _not_webdataset(args) else args.workers,
                   seed=args.seed)
    return data


def _steps_per_epoch(data: dict, args: argparse.Namespace) -> int | None:
    """Optimizer steps in one epoch, as OpenCLIP's `train_one_epoch` counts them (None: no
    training data, an evaluation-only run)."""
    return data["train"].dataloader.num_batches // args.accum_freq if "train" in data else None


# ---------------------------------------------------------------------------- step checkpoints


def _openclip_checkpoint(model, optimizer, scaler, epoch: int, args: argparse.Namespace) -> dict:
    """The dict OpenCLIP's `main` saves (its keys, its model: not the compiled wrapper)."""
    original = getattr(model, "_orig_mod", model)
    checkpoint = {"epoch": epoch, "name": args.name, "state_dict": original.state_dict(),
                  "optimizer": optimizer.state_dict()}
    if scaler is not None:
        checkpoint["scaler"] = scaler.state_dict()
    return checkpoint


def sync_before_stop(args: argparse.Namespace) -> None:
    """--remote-sync: the stop's checkpoint goes to the remote folder before the process ends.
    OpenCLIP syncs every --remote-sync-frequency seconds and once at a normal end, so a stopped
    run's newest checkpoints stayed local (lost with a node's scratch disk); its sync process is
    ended first, as OpenCLIP ends it, or it would outlive the run."""
    from open_clip_train.file_utils import keep_running_remote_sync, remote_sync

    for child in multiprocessing.active_children():
        if getattr(child, "_target", None) is keep_running_remote_sync:
            child.terminate()
    local, remote = os.path.join(args.logs, args.name), os.path.join(args.remote_sync, args.name)
    if args.save_most_recent:
        logging.warning("--save-most-recent: the stop's checkpoint is %s, which OpenCLIP's remote "
                        "sync leaves out; it stays in %s", oc_main.LATEST_CHECKPOINT_NAME, local)
    if remote_sync(local, remote, args.remote_sync_protocol):
        logging.info("Remote sync to %s after the stop's checkpoint done", remote)
    else:
        logging.error("Remote sync of the stop's checkpoint to %s failed: it is only in %s", remote, local)


def _train_epoch_in_steps(run: HardNegativeRun, model, data, loss, epoch, optimizer, scaler,
                          scheduler, dist_model, args, tb_writer, train_one_epoch) -> None:
    """OpenCLIP's epoch over a `SteppedLoader`: step checkpoints, the signal, a resumed step."""
    run.install_stop_handlers()
    info = data["train"]
    loader = info.dataloader
    steps_per_epoch = _steps_per_epoch(data, args)
    position = run.position_for_epoch(epoch)

    def build(at: EpochPosition) -> dict:
        checkpoint = _openclip_checkpoint(model, optimizer, scaler, at.epoch, args)
        checkpoint[POSITION_KEY] = at.to_dict()
        if run.loss is not None:
            checkpoint[hn_state.EMBEDDED_STATE_KEY] = {"epoch": at.epoch, "step": at.step, **run.state(),
                                     "trained_as": provenance.record_for_args(args)}
        return checkpoint

    def epoch_started(at_epoch: int, rng_states: list) -> None:
        if is_master(args) and args.save_logs and at_epoch > 0:
            hn_state.add_epoch_start_rng(args.checkpoint_path, at_epoch, rng_states)

    def check(at: EpochPosition) -> None:
        check_finite_weights(model, f"epoch {at.epoch + 1}, step {at.step}",
                             args.checkpoint_path if args.save_logs else None)

    checkpointer = StepCheckpointer(
        args.checkpoint_path, run.config.save_every_steps, run.stop, build=build, check=check,
        steps_per_epoch=steps_per_epoch,
        samples_per_step=args.batch_size * args.accum_freq * args.world_size,
        world_size=args.world_size, device=args.device, is_master=is_master(args) and args.save_logs,
        latest_name=oc_main.LATEST_CHECKPOINT_NAME if args.save_most_recent else None,
        on_epoch_start=epoch_started, workers=args.workers, seed=args.seed,
        before_stop=functools.partial(sync_before_stop, args) if args.remote_sync and is_master(args) else None)
    info.dataloader = SteppedLoader(loader, args.accum_freq, checkpointer.for_epoch(epoch), position,
                                    skip_by_drawing=not args.dataset_resampled, rank=args.rank)
    try:
        with counting_from_position(train_one_epoch):
            train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                            tb_writer=tb_writer)
    finally:
        info.dataloader = loader


class _AtomicSaveTorch:
    """`torch` as `open_clip_train.main` sees it, with `save` writing through a temp file: a kill
    during OpenCLIP's own epoch checkpoint leaves the previous file, never a truncated one."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def save(obj, f, *args, **kwargs) -> None:
        try:
            hn_state.atomic_torch_save(obj, f, *args, **kwargs)
        except hn_state.CheckpointWriteError as err:
            if _PLUGIN.run is None:  # without --hn-* flags the failure is OpenCLIP's, as it raised it
                raise err.__cause__ from None
            raise
        if isinstance(f, (str, os.PathLike)):
            _PLUGIN.checkpoint_saved(os.fspath(f), _PLUGIN.args)


def get_latest_checkpoint(path: str, remote: bool):
    """OpenCLIP's `--resume latest` pick, skipping unreadable files (interrupted writes) and,
    with the plugin on, checkpoints whose plugin state is damaged; step checkpoints
    (epoch_E_step_S.pt) sort inside epoch E."""
    if remote:
        return latest_remote_checkpoint(path)
    found = hn_state.latest_good_checkpoint(path, with_state=_resumes_state(_PLUGIN.run))
    return None if found is None else found[0]


def latest_remote_checkpoint(path: str) -> str | None:
    """`--resume latest` with `--remote-sync` (S3): the newest checkpoint `aws s3 ls` lists.
    OpenCLIP takes the last name listed, which is the plugin's `epoch_N.pt.json` or `.pt.hn`
    beside `epoch_N.pt` (it then loaded a JSON file as the checkpoint); this picks among the
    checkpoints alone, in the local pick's order. Their files are not read here (each would be
    downloaded): the pick's plugin state is read when the checkpoint is loaded."""
    if shutil.which("aws") is None:
        raise hn_state.StateError("--resume latest with --remote-sync lists the remote folder with the "
                                  "AWS CLI (`aws s3 ls`, as OpenCLIP does), which is not on PATH: "
                                  "install it (pip install awscli)")
    listing = subprocess.run(["aws", "s3", "ls", path + "/"], capture_output=True, text=True)
    if listing.returncode == 1:  # nothing there yet (a first start)
        return None
    if listing.returncode != 0:  # credentials, network: starting over would write over the run
        raise hn_state.StateError(f"--resume latest with --remote-sync: `aws s3 ls {path}/` failed "
                                  f"(exit {listing.returncode}: {listing.stderr.strip()[:300]}); fix "
                                  "the access to the remote folder and start again")
    names = [fields[3] for fields in (line.split(None, 3) for line in listing.stdout.splitlines())
             if len(fields) == 4]  # "2026-12-07 18:00:00  123456 epoch_1.pt" ("PRE dir/" skipped)
    # OpenCLIP's checkpoints only: not its --save-most-recent temp file (tmp.pt)
    newest = hn_state.checkpoint_names_newest_first(n for n in names if n.startswith("epoch_"))
    return os.path.join(path, newest[0]) if newest else None


def check_resume_latest(args: argparse.Namespace, with_state: bool) -> str | None:
    """`--resume latest`: every rank refuses a folder whose checkpoints none can be resumed.

    OpenCLIP's `main` picks on the master alone and broadcasts the pick: a `StateError` there
    left the other ranks waiting in the broadcast until the launcher or the distributed timeout
    ended them, with nothing useful in their logs; and a patched OpenCLIP's own pick skips
    unreadable files without refusing, so a run whose every checkpoint is damaged started over
    on top of them. Run at parse time on every rank (before the distributed set-up), so all stop
    with the same error; the master's pick later warns about what it skips. A remote folder
    (--remote-sync), --save-most-recent and an unnamed run (a new dated folder) are left to
    OpenCLIP, as its master leaves them. Returns the checkpoint the pick will resume, or None.
    """
    if (args.resume != "latest" or args.name is None or args.remote_sync is not None
            or args.save_most_recent):
        return None
    found = hn_state.latest_good_checkpoint(os.path.join(args.logs, args.name, "checkpoints"),
                                            with_state=with_state, warn=False)
    return None if found is None else found[0]


def _set_aside_unresumable(args: argparse.Namespace, run: HardNegativeRun) -> None:
    """The patched route: a patched OpenCLIP picks `--resume latest` itself, the newest file
    that reads, even when its plugin state is damaged (the run then stopped on that state though
    an older pair was good). The master sets such newer checkpoints aside (`*.pt.broken`, kept)
    before OpenCLIP's pick, so it resumes the pair the monkeypatch route would."""
    if (args.resume != "latest" or args.name is None or args.remote_sync is not None
            or args.save_most_recent):
        return
    from open_clip_train.distributed import world_info_from_env

    if world_info_from_env()[1] == 0:
        hn_state.set_aside_broken_checkpoints(os.path.join(args.logs, args.name, "checkpoints"),
                                              with_state=_resumes_state(run))


def _check_bank(config: HNConfig, args: argparse.Namespace) -> None:
    """The memory bank against one global batch (each step pushes all ranks' pairs: a smaller
    bank would keep only the last ranks' part of the latest batch) and against the free memory
    of the device it will live on (before training; the world size is known here)."""
    from .memory_bank import check_bank_fits

    if config.memory_bank_size <= 0:
        return
    problem = _bank_smaller_than_a_step(config, args, args.world_size)
    if problem:
        raise InputError(problem)
    dim = (open_clip.get_model_config(args.model) or {}).get("embed_dim")
    if dim is None:
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        check_bank_fits(config.memory_bank_size, dim, config.memory_bank_fp16, available, str(device))
    except ValueError as err:
        raise InputError(str(err)) from None


def _checkpoint_loaded(run: HardNegativeRun | None, path: str, checkpoint,
                       args: argparse.Namespace, resumes_latest: bool) -> None:
    """A resume: the run picks up its state; without `--hn-*` flags a checkpoint that has plugin
    state is refused (continuing it as plain OpenCLIP would drop bank, thresholds and curriculum
    without a word)."""
    if run is not None:
        # what --resume latest picked where the plugin cannot walk back (OpenCLIP's own read of
        # epoch_latest.pt under --save-most-recent, the remote pick)
        picked = resumes_latest and (args.save_most_recent or bool(args.remote_sync))
        run.checkpoint_loaded(path, checkpoint, picked=picked)
        if args.distributed:
            _add_ddp_prefix(checkpoint)
        return
    if isinstance(checkpoint, dict) and "epoch" in checkpoint:
        states = hn_state.state_files_beside(path, checkpoint["epoch"])
        if hn_state.EMBEDDED_STATE_KEY in checkpoint:
            states.insert(0, path)
        if states:
            raise hn_state.StateError(
                f"--resume {path}: this checkpoint was trained with open_clip_hn (plugin state in "
                f"{states[0]}), but no --hn-* flag is given; pass the run's --hn-* flags (or its "
                "--hn-config), or --hn-drop-state alone to continue as contrastive training "
                "without hard negatives or the plugin state")


def _add_ddp_prefix(checkpoint) -> None:
    """A checkpoint of a one-process run resumed on several ranks: OpenCLIP strips DDP's
    `module.` prefix for the opposite move but loads this one into the DDP wrapper as it is,
    which fails on every key; the weights are the same, so the prefix is added."""
    if not isinstance(checkpoint, dict) or "epoch" not in checkpoint:
        return
    weights = checkpoint.get("state_dict")
    if isinstance(weights, dict) and weights and not any(k.startswith("module.") for k in weights):
        checkpoint["state_dict"] = {f"module.{k}": v for k, v in weights.items()}


# ---------------------------------------------------------------------------- the plugin


class Plugin:
    """The plugin object: OpenCLIP's hook points (`--plugins open_clip_hn`, see patches/).

    It needs no base class, so this module imports whether or not the installed OpenCLIP has the
    hooks; every public method is a hook (the patch refuses a plugin method that is not one).
    """

    def __init__(self):
        self.run: HardNegativeRun | None = None
        self.typed: tuple[str, ...] = ()  # the --hn-* flags of the command line, before the recipe's
        self.args: argparse.Namespace | None = None  # the monkeypatched route's (parse_args sets it)
        self.resumes_latest = False  # --resume latest as given (OpenCLIP then replaces args.resume)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_hn_arguments(parser)

    def expand_argv(self, argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
        with early_warnings(new_command_line=True):
            self.typed = given_hn_flags(argv, parser)
            return _with_recipe(list(argv), parser)

    def configure(self, args: argparse.Namespace, argv: list[str],
                  parser: argparse.ArgumentParser) -> None:
        with early_warnings():
            args.hn_typed = self.typed
            self.resumes_latest = args.resume == "latest"
            _print_config_if_asked(args, argv, parser)
            self.run = configure(args, argv, parser)
            if self.run is not None:
                _set_aside_unresumable(args, self.run)

    def model_created(self, model, preprocess_train, preprocess_val, args) -> None:
        _model_created(self.run, model, preprocess_val, args, args.device)

    def checkpoint_loaded(self, path: str, checkpoint, args) -> None:
        _checkpoint_loaded(self.run, path, checkpoint, args, self.resumes_latest)

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None, *, get_data):
        if self.run is None:
            return get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        return _get_data(self.run, args, preprocess_fns, epoch, tokenizer, get_data)

    def create_loss(self, args, *, create_loss):
        if self.run is None:
            return create_loss(args)
        _check_bank(self.run.config, args)
        return self.run.create_loss(rank=args.rank, world_size=args.world_size,
                                    local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                                    accum_freq=args.accum_freq)

    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                        tb_writer=None, *, train_one_epoch):
        """OpenCLIP's epoch; with the plugin on, over a loader that saves between steps."""
        if self.run is None:
            return train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model,
                                   args, tb_writer=tb_writer)
        return _train_epoch_in_steps(self.run, model, data, loss, epoch, optimizer, scaler, scheduler,
                                     dist_model, args, tb_writer, train_one_epoch)

    def checkpoint_saved(self, path: str, args) -> None:
        """`epoch_N.pt` is on disk: the step checkpoints of epochs before N are superseded, and
        with `--delete-previous-checkpoint` so are the state and record of epoch N-1, whose
        checkpoint OpenCLIP deletes right after this (at the last epoch nothing else would)."""
        completed = epoch_of_checkpoint_name(path)
        if self.run is None or completed is None:
            return
        folder = os.path.dirname(path)
        prune_step_checkpoints(folder, before_epoch=completed)
        if args.delete_previous_checkpoint:
            # with --save-most-recent, epoch_latest.pt is epoch N-1's until OpenCLIP rewrites it
            # right after: a kill in between resumes it without its state (a warning says so)
            hn_state.drop_state_and_record(folder, completed - 1)

    def epoch_end(self, model, data, loss, epoch, optimizer, args, tb_writer=None) -> None:
        """After epoch `epoch` (0-based), before OpenCLIP's checkpoint: plugin state, eval."""
        run = self.run
        if run is None:
            return
        completed = epoch + 1
        check_finite_weights(model, f"epoch {completed}", args.checkpoint_path if args.save_logs else None)
        run.epoch_trained(completed)
        failure = None
        if args.save_logs:
            try:
                run.save_state(args.checkpoint_path, completed, epoch_checkpoints(
                    completed, args.epochs, args.save_frequency, args.save_most_recent,
                    oc_main.LATEST_CHECKPOINT_NAME), provenance.record_for_args(args), model.state_dict())
            except hn_state.CheckpointWriteError as err:
                failure = err
        if any_rank(failure is not None, device=args.device, world_size=args.world_size):
            raise failure or hn_state.CheckpointWriteError(
                f"rank 0 could not write the plugin state of epoch {completed} (its log names the "
                "file and the cause); this rank stops with it")
        if run.evaluation_due(completed, args.epochs) and is_master(args):
            device_type = torch.device(args.device).type
            try:
                metrics = run.evaluate(model, device=args.device, batch_size=args.batch_size,
                                       autocast=get_autocast(args.precision, device_type=device_type),
                                       input_dtype=open_clip.get_input_dtype(args.precision))
            except EvaluationStopped:  # a scheduler's grace period must see the checkpoint written
                logging.warning("--hn-eval-compositional after epoch %d stopped at the stop signal, "
                                "so that the epoch's checkpoint is written first; evaluate it with "
                                "`python -m open_clip_hn.eval`", completed)
            except Exception:  # never lose the epoch: OpenCLIP's checkpoint comes after this hook
                logging.exception("--hn-eval-compositional failed after epoch %d; training goes on "
                                  "and the epoch's checkpoint is written", completed)
            else:
                steps = _steps_per_epoch(data, args) or 0
                log_metrics(metrics, completed,
                            results_dir=args.checkpoint_path if args.save_logs else None,
                            tb_writer=tb_writer, use_wandb=bool(args.wandb), step=steps * completed)


_PLUGIN = Plugin()  # the plugin object of the monkeypatched route (install() below)


# ---------------------------------------------------------------------------- wrappers


_ORIGINALS: dict[str, Any] = {}


def create_model_and_transforms(*args, **kwargs):
    model, preprocess_train, preprocess_val = _ORIGINALS["create_model_and_transforms"](*args, **kwargs)
    _model_created(_PLUGIN.run, model, preprocess_val, _PLUGIN.args, kwargs.get("device", "cpu"))
    return model, preprocess_train, preprocess_val


def pt_load(file_path, map_location=None):
    checkpoint = _ORIGINALS["pt_load"](file_path, map_location=map_location)
    _checkpoint_loaded(_PLUGIN.run, file_path, checkpoint, _PLUGIN.args, _PLUGIN.resumes_latest)
    return checkpoint


def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    return _PLUGIN.get_data(args, preprocess_fns, epoch, tokenizer, get_data=_ORIGINALS["get_data"])


def create_loss(args):
    return _PLUGIN.create_loss(args, create_loss=_ORIGINALS["create_loss"])


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                    tb_writer=None):
    _PLUGIN.train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                            tb_writer, train_one_epoch=_ORIGINALS["train_one_epoch"])
    _PLUGIN.epoch_end(model, data, loss, epoch, optimizer, args, tb_writer)


_WRAPPERS = {
    "parse_args": parse_args,
    "create_model_and_transforms": create_model_and_transforms,
    "get_data": get_data,
    "create_loss": create_loss,
    "train_one_epoch": train_one_epoch,
    "pt_load": pt_load,
    "get_latest_checkpoint": get_latest_checkpoint,
    "torch": _AtomicSaveTorch(),
}


def official_hooks() -> bool:
    """Whether the installed `open_clip_train` has the plugin hook points of patches/."""
    try:
        from open_clip_train import plugins
    except ImportError:
        return False
    return getattr(plugins, "ENTRY_POINT_GROUP", None) == "open_clip_train.plugins"


def install() -> None:
    """Make `open_clip_train.main.main` take the `--hn-*` flags in this process (idempotent).

    On an OpenCLIP with the plugin hook points this enables the plugin through them (adds it
    to `$OPEN_CLIP_TRAIN_PLUGINS`, which they read) and patches nothing; otherwise it replaces
    OpenCLIP's seams in `open_clip_train.main` with the wrappers above.
    """
    if official_hooks():
        from open_clip_train.plugins import ENV_VAR

        enabled = [name.strip() for name in os.environ.get(ENV_VAR, "").split(",") if name.strip()]
        if PLUGIN_NAME not in enabled:
            os.environ[ENV_VAR] = ",".join(enabled + [PLUGIN_NAME])
        return
    if _ORIGINALS:
        return
    for name, wrapper in _WRAPPERS.items():
        _ORIGINALS[name] = getattr(oc_main, name)
        setattr(oc_main, name, wrapper)


def _not_a_file(path: str) -> str:
    return "a folder, not a file" if os.path.isdir(path) else "file not found"


def made_experiment_folder() -> str | None:
    """The experiment folder OpenCLIP made for this run when it holds no checkpoint yet: a run
    refused after OpenCLIP's set-up leaves it, and OpenCLIP then refuses the same --name."""
    args = _PLUGIN.args
    log_path = getattr(args, "log_path", None)
    if not log_path or _PLUGIN.resumes_latest:  # OpenCLIP refuses no folder to --resume latest
        return None
    folder = os.path.dirname(log_path)
    return None if hn_state.checkpoints_newest_first(os.path.join(folder, "checkpoints")) else folder


def run_openclip_main(argv: list[str]):
    """`open_clip_train.main.main(argv)` with the plugin installed (returns what it returns).
    The run's experiment-folder lock is released when it ends, also in a process that goes on
    (a notebook), where it would refuse the next run into that folder."""
    install()
    _PLUGIN.args, _PLUGIN.resumes_latest = None, False  # not a previous in-process run's
    try:
        return oc_main.main(argv)
    finally:
        for handle in _LOCKS.values():
            handle.close()  # closing the file releases its POSIX lock
        _LOCKS.clear()
