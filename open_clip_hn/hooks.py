"""The only module that touches `open_clip_train`: it hooks OpenCLIP's seams, never its loop.

`install()` replaces six names in `open_clip_train.main` with thin wrappers that call the
originals: `parse_args` (the `--hn-*` flags), `create_model_and_transforms` (a forward pre-hook
that unpacks hard negatives from the text tensor), `get_data` (the negative-generating tokenizer),
`create_loss` (the hard-negative objective), `train_one_epoch` (plugin state beside each
checkpoint, in-loop compositional evaluation) and `pt_load` (plugin state on `--resume`).
With no `--hn-*` flag every wrapper hands straight through: the run is OpenCLIP's run.

`Plugin` is the same seams for an OpenCLIP that has plugin hook points (patches/): registered
under the `open_clip_train.plugins` entry-point group, enabled by `--plugins open_clip_hn`, and
preferred by `install()` when present, so that nothing is monkeypatched.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
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
from .config import TRAIN_DATA_VOCABULARY, HNConfig, add_hn_arguments, given_hn_flags
from .mirror import flip_images
from .data import (PackedNegativeTokenizer, samples_with_precomputed_negatives,
                   shard_has_negatives, unpack_texts)

try:
    import wandb
except ImportError:
    wandb = None

_ORIGINALS: dict[str, Any] = {}


@dataclass
class Runtime:
    """What the hooks of one training run share: the config and what the seams hand over."""

    config: HNConfig
    loss: torch.nn.Module | None = None
    pending_state: dict[str, Any] | None = None
    start_step: int = 0
    total_steps: int | None = None
    preprocess_val: Any = None
    tokenizer: Any = None


_runtime: Runtime | None = None


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
    recipe = _hn_parser().parse_known_args(argv)[0].hn_config_file
    if recipe is None:
        return argv
    from .recipes import recipe_argv

    try:
        return recipe_argv(recipe, parser) + argv
    except (OSError, ValueError) as err:
        parser.error(f"--hn-config {recipe}: {err}")


def _register_model_config(path: str, model: str, parser: argparse.ArgumentParser) -> None:
    if not os.path.isfile(path):
        parser.error(f"--model-config {path}: file not found; pass an OpenCLIP model config JSON")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"--model-config {path}: not readable JSON ({err})")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        parser.error(f"--model-config {path}: missing key(s) {', '.join(missing)}; an OpenCLIP "
                     "model config has embed_dim, vision_cfg and text_cfg")
    open_clip.add_model_config(path)
    name = os.path.splitext(os.path.basename(path))[0]
    if model != name:
        logging.warning("--model-config registered model '%s' but --model is '%s'", name, model)


def _check_compatible(config: HNConfig, args: argparse.Namespace) -> None:
    """Refuse OpenCLIP modes the hard-negative objective does not implement (never fall back)."""
    if not config.enabled:
        return
    if args.siglip:
        raise ValueError("--siglip: the hard-negative objectives are softmax (InfoNCE) losses; "
                         "drop --siglip or the --hn-* flags")
    if args.distill_model:
        raise ValueError("--distill-model: distillation is not combined with hard negatives")
    if args.horovod:
        raise ValueError("--horovod: use torch.distributed (the default) with hard negatives")
    if "coca" in args.model.lower():
        raise ValueError(f"--model {args.model}: CoCa's captioning loss is not supported with --hn-*")
    if config.vocabulary not in (None, TRAIN_DATA_VOCABULARY) and not os.path.isfile(config.vocabulary):
        raise ValueError(f"--hn-vocabulary {config.vocabulary}: file not found; pass a word list "
                         f"(`python -m open_clip_hn.negatives vocabulary` writes one) or "
                         f"{TRAIN_DATA_VOCABULARY}")


def _print_config_if_asked(namespace: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if namespace.hn_print_config:
        from .recipes import format_resolved_config

        print(format_resolved_config(namespace, parser))
        sys.exit(0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """OpenCLIP's `parse_args` plus the `--hn-*` flags (and an optional recipe file)."""
    argv = list(argv)
    parser = build_parser()
    argv = _with_recipe(argv, parser)
    namespace = parser.parse_args(argv)  # --help, unknown flags and bad values end here
    _print_config_if_asked(namespace, parser)
    hn_namespace, openclip_argv = _hn_parser().parse_known_args(argv)
    args = _ORIGINALS.get("parse_args", oc_params.parse_args)(openclip_argv)
    for name, value in vars(hn_namespace).items():
        setattr(args, name, value)
    configure(args, argv, parser)
    if not _runtime.config.enabled:  # a run without --hn-* keeps exactly OpenCLIP's args
        for name in (*vars(hn_namespace), "hn_given"):
            delattr(args, name)
    return args


def configure(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> None:
    """Start the run's `Runtime` from the parsed flags; bad combinations end in `parser.error`."""
    global _runtime
    args.hn_given = given_hn_flags(argv)
    try:
        config = HNConfig.from_args(args)
        _check_compatible(config, args)
    except ValueError as err:
        parser.error(str(err))
    if args.model_config:
        _register_model_config(args.model_config, args.model, parser)
    _runtime = Runtime(config=config)


# ---------------------------------------------------------------------------- model


def attach_negative_hooks(model: torch.nn.Module, num_negatives: int, mirror: bool = False) -> None:
    """Unpack packed text rows before the model's forward; add the mask/types to its output.

    The metadata travels as tensors in the output dict, so OpenCLIP's `--accum-freq` path
    concatenates it along the batch like the features it belongs to. With `mirror`, the flipped
    images and their captions ride in the same forward (one encoder call per tower) and come out
    as [B, D] features beside a [B] mask, zero rows where a sample has no mirror.
    """
    pending: dict[str, Any] = {}

    def unpack(module, args, kwargs):
        pending.clear()
        positional = len(args) > 1
        text = args[1] if positional else kwargs.get("text")
        if not isinstance(text, torch.Tensor):
            return None
        unpacked = unpack_texts(text, num_negatives, mirror)
        if unpacked is None:
            return None
        pending["meta"] = unpacked
        tokens = unpacked.tokens
        image = args[0] if args else kwargs.get("image")
        if unpacked.mirror_axis is not None and isinstance(image, torch.Tensor):
            rows = (unpacked.mirror_axis >= 0).nonzero().flatten()
            pending["mirror_rows"] = rows
            flipped = flip_images(image[rows.to(image.device)], unpacked.mirror_axis[rows])
            image = torch.cat([image, flipped])
            tokens = torch.cat([tokens, unpacked.mirror_tokens[rows]])
        if positional:
            args = (image, tokens, *args[2:])
        else:
            kwargs = {**kwargs, "text": tokens}
            if "image" in kwargs:
                kwargs["image"] = image
        return args, kwargs

    def add_metadata(module, args, kwargs, output):
        meta = pending.pop("meta", None)
        rows = pending.pop("mirror_rows", None)
        if meta is None or not isinstance(output, dict):
            return output
        device = output["text_features"].device
        output["hn_neg_mask"] = meta.neg_mask.to(device)
        output["hn_neg_types"] = meta.neg_types.to(device)
        if rows is not None:
            batch = meta.neg_mask.shape[0]
            rows = rows.to(device)
            for key, split in (("image_features", batch), ("text_features", batch * (1 + num_negatives))):
                features = output[key]
                output[key] = features[:split]
                mirrored = features.new_zeros(batch, features.shape[1])
                output[f"hn_mirror_{key}"] = mirrored.index_copy(0, rows, features[split:])
            output["hn_mirror_mask"] = (meta.mirror_axis >= 0).to(device)
        return output

    model.register_forward_pre_hook(unpack, with_kwargs=True)
    model.register_forward_hook(add_metadata, with_kwargs=True)


class CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP that accepts OpenCLIP's `device_ids=[cpu]`: torch refuses device ids for CPU modules.

    OpenCLIP 3.3 passes `device_ids=[device]` whatever the device, which makes every CPU
    (gloo) multi-process run fail at start-up; with no device ids the behaviour is the same.
    """

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def _allow_cpu_ddp(device) -> None:
    if torch.device(device).type == "cpu" and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel


def model_created(model: torch.nn.Module, preprocess_val, device) -> None:
    """Prepare the model OpenCLIP just created: negative-unpacking hooks, CPU DDP."""
    _allow_cpu_ddp(device)
    if _runtime is not None and _runtime.config.enabled:
        _runtime.preprocess_val = preprocess_val
        if _runtime.config.packs_texts:
            attach_negative_hooks(model, _runtime.config.packed_negatives,
                                  bool(_runtime.config.mirror))


def create_model_and_transforms(*args, **kwargs):
    model, preprocess_train, preprocess_val = _ORIGINALS["create_model_and_transforms"](*args, **kwargs)
    model_created(model, preprocess_val, kwargs.get("device", "cpu"))
    return model, preprocess_train, preprocess_val


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


def _check_precomputed_shards(args: argparse.Namespace) -> None:
    data = args.train_data or ""
    if not (args.dataset_type == "webdataset" or data.endswith(".tar") or "::" in data):
        raise ValueError(f"--hn-negatives precomputed needs webdataset shards, got --train-data "
                         f"{data!r} (--dataset-type {args.dataset_type})")
    shards, _ = oc_data.expand_urls(data)
    first = shards[0]
    if os.path.isfile(first) and not shard_has_negatives(first):
        raise ValueError(
            f"--hn-negatives precomputed: shard {first} has no neg.json members; write them with "
            f"`python -m open_clip_hn.negatives precompute --shards '{data}' --output-dir DIR` "
            "and train on DIR, or use --hn-negatives online")


def _vocabulary(config: HNConfig, args: argparse.Namespace) -> frozenset[str] | None:
    """--hn-vocabulary's words: a file's, or with `train-data` those of the training captions."""
    from .negatives.cli import shard_captions
    from .negatives.lexicon import VocabularyError, read_vocabulary, words_of

    if config.vocabulary != TRAIN_DATA_VOCABULARY:
        return None if config.vocabulary is None else read_vocabulary(config.vocabulary)
    data = args.train_data or ""
    fix = ("write the word list once with `python -m open_clip_hn.negatives vocabulary` and pass "
           "its path to --hn-vocabulary")
    if args.dataset_type == "synthetic":
        raise VocabularyError(f"--hn-vocabulary train-data: synthetic data has no captions; {fix}")
    if oc_data.get_dataset_fn(data, args.dataset_type) is oc_data.get_csv_dataset:
        import pandas

        table = pandas.read_csv(data, sep=args.csv_separator)
        if args.csv_caption_key not in table.columns:
            raise VocabularyError(f"--hn-vocabulary train-data: {data} has no column "
                                  f"{args.csv_caption_key!r} (columns: {list(table.columns)}); "
                                  "set --csv-caption-key and --csv-separator")
        captions = table[args.csv_caption_key].astype(str)
    else:
        shards = oc_data.expand_urls(data)[0]
        remote = [s for s in shards if not os.path.isfile(s)]
        if remote:
            raise VocabularyError(f"--hn-vocabulary train-data reads local shards, and {remote[0]} "
                                  f"is not a local file; {fix}")
        captions = (c for shard in shards for c in shard_captions(shard, "txt"))
    words = frozenset(w for caption in captions for w in words_of(caption))
    if not words:
        raise VocabularyError(f"--hn-vocabulary train-data: no words in the captions of {data} "
                              "(webdataset captions are read from the .txt members); pass a word "
                              "list instead")
    logging.info("Negatives stay inside the %d words of the --train-data captions", len(words))
    return words


def _train_tokenizer(config: HNConfig, tokenizer, args: argparse.Namespace):
    generator = None
    if config.negatives == "online" and config.uses_text_negatives:
        from .negatives import NegativeGenerator

        generator = NegativeGenerator(types=config.types, seed=config.seed, lm_path=config.lm,
                                      vocabulary=_vocabulary(config, args))
    return PackedNegativeTokenizer(tokenizer, config.packed_negatives, generator, config.types,
                                   config.mirror)


def _add_image_neighbors(loader, config: HNConfig, args: argparse.Namespace) -> None:
    """Make each train batch hold samples together with their image neighbours (NegCLIP)."""
    from .neighbors import insert_before_decode, neighbor_stage

    stage = neighbor_stage(config.image_neighbors, config.image_neighbors_per_sample,
                           args.batch_size, shards=oc_data.expand_urls(args.train_data)[0])
    insert_before_decode(loader, stage)
    logging.info("Hard image negatives: each sample is followed by %d of its neighbours from %s",
                 config.image_neighbors_per_sample, config.image_neighbors)


def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """OpenCLIP's `get_data`, with the train split tokenized together with its hard negatives."""
    return _get_data(args, preprocess_fns, epoch, tokenizer, get=_ORIGINALS["get_data"])


def _get_data(args, preprocess_fns, epoch, tokenizer, get):
    if _runtime is None or not _runtime.config.enabled:
        return get(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    config = _runtime.config
    _runtime.tokenizer = tokenizer
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
                       tokenizer=_train_tokenizer(config, tokenizer, args))
        if args.val_data or args.imagenet_val or args.imagenet_v2:
            eval_args = copy.copy(args)
            eval_args.train_data = None
            evaluation = get(eval_args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
            data.update({k: v for k, v in evaluation.items() if k != "train"})
    if config.image_neighbors and "train" in data:
        _add_image_neighbors(data["train"].dataloader, config, args)
    if "train" in data:
        steps_per_epoch = data["train"].dataloader.num_batches // args.accum_freq
        _runtime.start_step = epoch * steps_per_epoch
        _runtime.total_steps = steps_per_epoch * args.epochs
    return data


# ---------------------------------------------------------------------------- loss


def create_loss(args):
    """The hard-negative objective when the plugin is on, else OpenCLIP's own loss."""
    return _create_loss(args, create=_ORIGINALS["create_loss"])


def _create_loss(args, create):
    if _runtime is None or not _runtime.config.enabled:
        return create(args)
    from .objective import HardNegativeLoss

    loss = HardNegativeLoss(
        _runtime.config,
        rank=args.rank,
        world_size=args.world_size,
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        accum_freq=args.accum_freq,
        start_step=_runtime.start_step,
        total_steps=_runtime.total_steps,
    )
    if _runtime.pending_state is not None:
        saved = _runtime.pending_state["loss"]
        loss.load_state_dict(saved)
        if saved["step"] != _runtime.start_step:
            logging.warning("Hard-negative state was saved at step %s; OpenCLIP resumes at step %s "
                            "(batch size, world size or samples changed): the curriculum follows "
                            "OpenCLIP's step", saved["step"], _runtime.start_step)
        logging.info("=> restored hard-negative state (epoch %s, step %s)",
                     _runtime.pending_state["epoch"], _runtime.start_step)
    _runtime.loss = loss
    return loss


# ---------------------------------------------------------------------------- checkpoints


def checkpoints_of_epoch(args: argparse.Namespace, completed_epoch: int) -> list[str]:
    """The checkpoint files OpenCLIP's `main` writes after `completed_epoch` (same rules)."""
    paths = []
    if completed_epoch == args.epochs or (
            args.save_frequency > 0 and completed_epoch % args.save_frequency == 0):
        paths.append(os.path.join(args.checkpoint_path, f"epoch_{completed_epoch}.pt"))
    if args.save_most_recent:
        paths.append(os.path.join(args.checkpoint_path, oc_main.LATEST_CHECKPOINT_NAME))
    return paths


def plugin_state() -> dict[str, Any]:
    assert _runtime is not None and _runtime.loss is not None
    return {"config": dataclasses.asdict(_runtime.config), "loss": _runtime.loss.state_dict()}


def save_plugin_state(args: argparse.Namespace, completed_epoch: int) -> None:
    """Save the plugin state of every epoch OpenCLIP checkpoints (rank 0; all ranks agree)."""
    if checkpoints_of_epoch(args, completed_epoch):
        trained_as = provenance.record_for_args(args)  # --model etc., checked by eval (provenance.py)
        path = hn_state.save_state(args.checkpoint_path, completed_epoch,
                                   {**plugin_state(), "trained_as": trained_as})
        provenance.write_sidecars(checkpoints_of_epoch(args, completed_epoch), trained_as)
        logging.info("Saved hard-negative state to %s", path)
    hn_state.prune_states(args.checkpoint_path, completed_epoch)


def pt_load(file_path, map_location=None):
    """OpenCLIP's checkpoint load; on a resume, also pick up the plugin state of its epoch."""
    checkpoint = _ORIGINALS["pt_load"](file_path, map_location=map_location)
    checkpoint_loaded(file_path, checkpoint)
    return checkpoint


def checkpoint_loaded(file_path: str, checkpoint) -> None:
    """On a resume from `file_path`, pick up the plugin state of the checkpoint's epoch."""
    if _runtime is not None and _runtime.config.enabled and isinstance(checkpoint, dict) \
            and "epoch" in checkpoint:
        found = hn_state.find_state(file_path, checkpoint["epoch"])
        if found is None:
            logging.warning("No hard-negative state for epoch %s beside %s: bank, thresholds and "
                            "curriculum start fresh", checkpoint["epoch"], file_path)
        else:
            path, saved = found
            _warn_config_changes(saved.get("config", {}))
            _runtime.pending_state = saved
            logging.info("=> found hard-negative state %s", path)


def _warn_config_changes(saved: dict[str, Any]) -> None:
    current = dataclasses.asdict(_runtime.config)
    changed = {k: (saved[k], v) for k, v in current.items()
               if k in saved and k != "given" and saved[k] != v}
    for name, (old, new) in changed.items():
        logging.warning("Resuming with --hn-%s changed: %r -> %r", name.replace("_", "-"), old, new)


# ---------------------------------------------------------------------------- epoch end


def log_metrics(metrics: dict[str, float], epoch: int, args: argparse.Namespace, tb_writer) -> None:
    """Log evaluation metrics where OpenCLIP logs its own (console, results.jsonl, tb, wandb)."""
    logging.info(f"Eval Epoch: {epoch} " + "\t".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    if args.save_logs:
        with open(os.path.join(args.checkpoint_path, "results.jsonl"), "a+") as f:
            f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
        if tb_writer is not None:
            for name, value in metrics.items():
                tb_writer.add_scalar(f"val/{name}", value, epoch)
    if args.wandb and wandb is not None:
        wandb.log({f"val/{name}": value for name, value in metrics.items()} | {"epoch": epoch})


def evaluate_compositional_in_loop(model, epoch: int, args: argparse.Namespace, tb_writer) -> None:
    from .eval import evaluate_compositional

    unwrapped = model.module if hasattr(model, "module") else model
    metrics = evaluate_compositional(unwrapped, _runtime.preprocess_val, _runtime.tokenizer,
                                     _runtime.config.eval_compositional, device=args.device,
                                     batch_size=args.batch_size,
                                     autocast=get_autocast(args.precision,
                                                           device_type=torch.device(args.device).type),
                                     input_dtype=open_clip.get_input_dtype(args.precision))
    log_metrics(metrics, epoch, args, tb_writer)


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                    tb_writer=None):
    """OpenCLIP's epoch, then the plugin's epoch-end work (state beside checkpoints, eval)."""
    _ORIGINALS["train_one_epoch"](model, data, loss, epoch, optimizer, scaler, scheduler,
                                  dist_model, args, tb_writer=tb_writer)
    epoch_end(model, epoch, args, tb_writer)


def epoch_end(model, epoch: int, args: argparse.Namespace, tb_writer=None) -> None:
    """After epoch `epoch` (0-based), before OpenCLIP's checkpoint: plugin state, eval."""
    if _runtime is None or not _runtime.config.enabled:
        return
    completed_epoch = epoch + 1
    if args.save_logs:
        save_plugin_state(args, completed_epoch)
    config = _runtime.config
    if config.eval_compositional and completed_epoch % config.eval_every == 0 and is_master(args):
        evaluate_compositional_in_loop(model, completed_epoch, args, tb_writer)


# ---------------------------------------------------------------------------- install

_HOOKS = {
    "parse_args": parse_args,
    "create_model_and_transforms": create_model_and_transforms,
    "get_data": get_data,
    "create_loss": create_loss,
    "train_one_epoch": train_one_epoch,
    "pt_load": pt_load,
}


class Plugin:
    """The plugin for OpenCLIP's own hook points (`--plugins open_clip_hn`, see patches/).

    Its hooks call the functions the wrappers above call, so both routes train alike. It needs
    no base class: this module imports whether or not the installed OpenCLIP has the hooks.
    """

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_hn_arguments(parser)

    def expand_argv(self, argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
        return _with_recipe(list(argv), parser)

    def configure(self, args: argparse.Namespace, argv: list[str],
                  parser: argparse.ArgumentParser) -> None:
        _print_config_if_asked(args, parser)
        configure(args, argv, parser)

    def model_created(self, model, preprocess_train, preprocess_val, args) -> None:
        model_created(model, preprocess_val, args.device)

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None, *, get_data):
        return _get_data(args, preprocess_fns, epoch, tokenizer, get=get_data)

    def create_loss(self, args, *, create_loss):
        return _create_loss(args, create=create_loss)

    def checkpoint_loaded(self, path: str, checkpoint, args) -> None:
        checkpoint_loaded(path, checkpoint)

    def epoch_end(self, model, data, loss, epoch, optimizer, args, tb_writer=None) -> None:
        epoch_end(model, epoch, args, tb_writer)


PLUGIN_NAME = "open_clip_hn"


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
    for name, hook in _HOOKS.items():
        _ORIGINALS[name] = getattr(oc_main, name)
        setattr(oc_main, name, hook)
