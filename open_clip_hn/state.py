"""Plugin state beside OpenCLIP's checkpoints.

`epoch_N.pt` stays exactly OpenCLIP's format; the plugin's own state (memory bank, rank
thresholds, curriculum step) goes to `epoch_N.pt.hn`. The suffix is not `.pt` on purpose:
OpenCLIP's `--resume latest` picks the newest `*.pt` file, which must stay a model checkpoint.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from .files import atomic_open

STATE_SUFFIX = ".hn"
STATE_VERSION = 1


def state_path(checkpoint_dir: str, epoch: int) -> str:
    """Where the plugin state after `epoch` lives: `epoch_N.pt.hn`, whatever the checkpoint's name.

    Keyed by epoch, not by file: `epoch_latest.pt` (--save-most-recent) finds its state through
    the epoch stored inside it, so a state file never claims a checkpoint it was not saved with.
    """
    return os.path.join(checkpoint_dir, f"epoch_{epoch}.pt{STATE_SUFFIX}")


def save_state(checkpoint_dir: str, epoch: int, state: dict[str, Any]) -> str:
    """Write the plugin state after `epoch` atomically (temp file + rename)."""
    path = state_path(checkpoint_dir, epoch)
    with atomic_open(path, "wb") as f:
        torch.save({"version": STATE_VERSION, "epoch": epoch, **state}, f)
    return path


def add_epoch_start_rng(checkpoint_dir: str, epoch: int, rng_states: list) -> str | None:
    """Record in `epoch_N.pt.hn` the RNG states (per rank) that fixed epoch N's sample order,
    taken when its loader started; a resume from `epoch_N.pt` then replays the epoch exactly.
    None when there is no such state file (the epoch was not checkpointed)."""
    path = state_path(checkpoint_dir, epoch)
    if not os.path.exists(path):
        return None
    state = _read(path)
    state["rng_epoch_start"] = rng_states
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return path


def _read(path: str) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: plugin state version {state.get('version')!r} is not "
                         f"{STATE_VERSION}; it was written by another open_clip_hn version")
    return state


def find_state(checkpoint_path: str, epoch: int) -> tuple[str, dict[str, Any]] | None:
    """The plugin state saved after `epoch` (the checkpoint's own epoch), or None.

    Looked for beside the checkpoint under its own name first (`X.pt.hn`, for checkpoints that
    were copied with their state), then as `epoch_N.pt.hn` in its folder. A file whose epoch
    differs from the checkpoint's is never used.
    """
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    for path in (checkpoint_path + STATE_SUFFIX, state_path(folder, epoch)):
        if os.path.exists(path):
            state = _read(path)
            if state.get("epoch") == epoch:
                return path, state
    return None


def prune_states(checkpoint_dir: str, epoch: int) -> None:
    """Drop states older than the previous epoch whose checkpoint OpenCLIP no longer keeps.

    The previous epoch's state stays: OpenCLIP writes the checkpoint of `epoch` only after the
    plugin has saved its state, so until then the previous pair is the one to resume from.
    """
    for name in os.listdir(checkpoint_dir):
        match = re.fullmatch(r"epoch_(\d+)\.pt" + re.escape(STATE_SUFFIX), name)
        if match and int(match.group(1)) < epoch - 1 and \
                not os.path.exists(os.path.join(checkpoint_dir, name[: -len(STATE_SUFFIX)])):
            os.remove(os.path.join(checkpoint_dir, name))
