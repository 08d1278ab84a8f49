"""Plugin state beside OpenCLIP's checkpoints.

`epoch_N.pt` stays exactly OpenCLIP's format; the plugin's own state (memory bank, rank
thresholds, curriculum step) goes to `epoch_N.pt.hn`. The suffix is not `.pt` on purpose:
OpenCLIP's `--resume latest` picks the newest `*.pt` file, which must stay a model checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

STATE_SUFFIX = ".hn"
STATE_VERSION = 1


def state_path(checkpoint_path: str) -> str:
    """Where the plugin state of a checkpoint lives."""
    return checkpoint_path + STATE_SUFFIX


def save_state(checkpoint_path: str, state: dict[str, Any]) -> str:
    """Write the plugin state for `checkpoint_path` atomically (temp file + rename)."""
    path = state_path(checkpoint_path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=STATE_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": STATE_VERSION, **state}, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_state(checkpoint_path: str) -> dict[str, Any] | None:
    """The plugin state saved beside `checkpoint_path`, or None when there is none."""
    path = state_path(checkpoint_path)
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: plugin state version {state.get('version')!r} is not "
                         f"{STATE_VERSION}; it was written by another open_clip_hn version")
    return state


def remove_state(checkpoint_path: str) -> None:
    path = state_path(checkpoint_path)
    if os.path.exists(path):
        os.remove(path)
