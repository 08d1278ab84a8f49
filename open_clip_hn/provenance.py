"""Which model a checkpoint was trained as, recorded beside it so that evaluation can check it.

An OpenCLIP checkpoint holds weights but not the `--model` it was trained as, and some models
share every weight shape: a checkpoint fine-tuned from OpenAI's ViT-B/32 loads without error
into `ViT-B-32` (GELU) and into `ViT-B-32-quickgelu` (the activation it was trained with), and
only the latter gives its real numbers (SugarCrepe issue #7). Runs with the plugin enabled
write the record twice: into the plugin state (`epoch_N.pt.hn`, state.py) and into a small
JSON sidecar `<checkpoint>.json` (`epoch_N.pt.json`, `epoch_latest.pt.json`) that plain
OpenCLIP never reads (`--resume latest` looks at `*.pt` only). `python -m open_clip_hn.eval`
compares the record with its own `--model` before loading anything (the sidecar, else the
plugin state's copy: a step checkpoint's inside it, an epoch checkpoint's `.hn` beside it).
Runs without `--hn-*` flags write nothing: they stay exactly OpenCLIP's runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from typing import Any, Sequence

from . import __version__
from .files import atomic_write_json

SIDECAR_SUFFIX = ".json"
RECORD_VERSION = 1


def config_digest(model_config: dict[str, Any] | None) -> str | None:
    """SHA-256 of an OpenCLIP model config (key order ignored); None for an unknown model."""
    if model_config is None:
        return None
    canonical = json.dumps(model_config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def model_record(model: str, pretrained: str | None,
                 model_config: dict[str, Any] | None) -> dict[str, Any]:
    """The record of what a checkpoint was trained as (a pure function of its inputs)."""
    return {"version": RECORD_VERSION, "model": model, "pretrained": pretrained or None,
            "model_config_sha256": config_digest(model_config), "open_clip_hn": __version__}


def record_for_args(args: argparse.Namespace) -> dict[str, Any]:
    """The record of this training run: its `--model`, `--pretrained` and model config."""
    import open_clip

    return model_record(args.model, args.pretrained, open_clip.get_model_config(args.model))


def sidecar_path(checkpoint: str) -> str:
    """`epoch_3.pt` -> `epoch_3.pt.json`: named after the checkpoint, so it travels with it."""
    return checkpoint + SIDECAR_SUFFIX


def write_sidecars(checkpoints: Sequence[str], record: dict[str, Any]) -> None:
    """Write the record beside each checkpoint of this epoch (atomically), and drop sidecars
    whose checkpoint OpenCLIP deleted (`--delete-previous-checkpoint`)."""
    for checkpoint in checkpoints:
        atomic_write_json(sidecar_path(checkpoint), record, indent=2)
    current = {os.path.abspath(sidecar_path(c)) for c in checkpoints}
    for folder in {os.path.dirname(os.path.abspath(c)) for c in checkpoints}:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if re.fullmatch(r"epoch_\d+\.pt" + re.escape(SIDECAR_SUFFIX), name) and \
                    path not in current and not os.path.exists(path[: -len(SIDECAR_SUFFIX)]):
                os.remove(path)


def read_sidecar(checkpoint: str) -> dict[str, Any] | None:
    """The record beside `checkpoint`, or None when it has none (plain OpenCLIP, pretrained tags)."""
    path = sidecar_path(checkpoint)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable model record ({err}); delete it to evaluate "
                         "without the check") from None
    if not isinstance(record, dict) or not isinstance(record.get("model"), str):
        raise ValueError(f"{path}: not a model record (no 'model' name); delete it to evaluate "
                         "without the check")
    return record


def read_record(checkpoint: str) -> dict[str, Any] | None:
    """What `checkpoint` was trained as: its sidecar, else the record the plugin state holds
    (`epoch_N.pt` has `epoch_N.pt.hn` beside it; a step checkpoint carries it inside, also when
    renamed: a copy named `best.pt`); None for a checkpoint of plain OpenCLIP or a damaged state
    (nothing to check)."""
    from .eval import open_checkpoint
    from .preemption import epoch_of_checkpoint_name
    from .state import EMBEDDED_STATE_KEY, find_state

    record = read_sidecar(checkpoint)
    if record is not None:
        return record
    epoch = epoch_of_checkpoint_name(checkpoint)
    try:
        if epoch is not None:
            state = (find_state(checkpoint, epoch) or (None, None))[1]
        else:  # weights only, as OpenCLIP loads it (any file: no code in it is run)
            state = open_checkpoint(checkpoint).get(EMBEDDED_STATE_KEY)
    except (ValueError, AttributeError):  # not ours or damaged: the loader names it when built
        return None
    record = state.get("trained_as") if isinstance(state, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("model"), str) else None


def model_mismatch(record: dict[str, Any], model: str,
                   model_config: dict[str, Any] | None) -> str | None:
    """Why `--model model` is not what the record says the checkpoint was trained as, or None."""
    trained = record["model"]
    if trained != model:
        hint = ""
        if trained.replace("-quickgelu", "") == model.replace("-quickgelu", ""):
            hint = (" (QuickGELU vs GELU: the weights load either way, but only the activation it "
                    "was trained with gives its real numbers)")
        return f"it was trained as --model {trained}, not --model {model}{hint}"
    digest, recorded = config_digest(model_config), record.get("model_config_sha256")
    if digest and recorded and digest != recorded:
        return (f"--model {model} names another architecture than it was trained with: the model "
                f"config's sha256 is {digest[:12]}…, the run's was {recorded[:12]}… (an edited "
                "--model-config?)")
    return None
