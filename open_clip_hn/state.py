"""Plugin state beside OpenCLIP's checkpoints.

`epoch_N.pt` stays exactly OpenCLIP's format; the plugin's own state (memory bank, rank
thresholds, curriculum step) goes to `epoch_N.pt.hn`. The suffix is not `.pt` on purpose:
OpenCLIP's `--resume latest` picks the newest `*.pt` file, which must stay a model checkpoint.

Every file here is written atomically (`atomic_torch_save`) and checked when read: a damaged,
foreign or non-finite state is refused (`StateError`), and `latest_good_checkpoint` walks back
from the newest checkpoint to the newest pair that loads.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .files import atomic_open

STATE_SUFFIX = ".hn"
STATE_VERSION = 1
WEIGHTS_DIGEST_KEY = "weights_digest"  # `weights_digest` of the weights a state was saved beside
BROKEN_SUFFIX = ".broken"
EMBEDDED_STATE_KEY = "hn_state"  # a checkpoint that carries the plugin state inside (step checkpoints)
_FIX = ("resume from the previous checkpoint (--resume PATH/epoch_<N-1>.pt under a new --name), or add "
        "--hn-drop-state to resume this one without its plugin state (bank, thresholds and "
        "teacher start fresh; the file is kept)")


class StateError(ValueError):
    """A plugin state file that cannot be used: the message names the file and what to do."""


class MissingState(StateError):
    """The checkpoint's record says it was saved with a plugin state that is not beside it."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint or state file could not be written (a full disk, a quota, an I/O error):
    the message names it, the free space and the newest complete checkpoint."""


def atomic_torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    """`torch.save` that never leaves a partial file under the final name (temp, fsync, rename).

    Same signature as `torch.save`, so it can stand in for it where OpenCLIP writes
    `epoch_N.pt`; a file-like `f` is written directly (there is no name to rename to). A failed
    write of a path is a `CheckpointWriteError` (torch's zip writer reports a full disk as a
    RuntimeError about a position, which said nothing of the cause).
    """
    if not isinstance(f, (str, os.PathLike)):
        torch.save(obj, f, *args, **kwargs)
        return
    try:
        with atomic_open(f, "wb") as handle:
            torch.save(obj, handle, *args, **kwargs)
    except OSError as err:
        raise CheckpointWriteError(write_failure(os.fspath(f), err)) from err
    except RuntimeError as err:  # torch's zip writer wraps the OSError of a failed write
        if not isinstance(err.__context__, OSError):
            raise
        raise CheckpointWriteError(write_failure(os.fspath(f), err)) from err


def write_failure(path: str, err: BaseException) -> str:
    """The message of a file that could not be written: its cause, the free space there and
    the newest complete checkpoint beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    while not isinstance(err, OSError) and isinstance(err.__context__, OSError):
        err = err.__context__  # torch's zip writer hides the OSError of the failed write
    try:
        free = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    newest = next((p for p in checkpoints_newest_first(folder) if p != os.path.abspath(path)), None)
    kept = f"the newest complete checkpoint is {newest}" if newest else "no checkpoint was written before"
    return (f"could not write {path} ({type(err).__name__}: {str(err)[:200]}; {free}); no part of it "
            f"was left, and {kept}: free space (or pass another --logs) and resume with --resume latest")


def state_path(checkpoint_dir: str, epoch: int) -> str:
    """Where the plugin state after `epoch` lives: `epoch_N.pt.hn`, whatever the checkpoint's name.

    Keyed by epoch, not by file: `epoch_latest.pt` (--save-most-recent) finds its state through
    the epoch stored inside it, so a state file never claims a checkpoint it was not saved with.
    """
    return os.path.join(checkpoint_dir, f"epoch_{epoch}.pt{STATE_SUFFIX}")


def save_state(checkpoint_dir: str, epoch: int, state: dict[str, Any]) -> str:
    """Write the plugin state after `epoch` atomically (temp file + rename)."""
    path = state_path(checkpoint_dir, epoch)
    atomic_torch_save({"version": STATE_VERSION, "epoch": epoch, **state}, path)
    return path


def add_epoch_start_rng(checkpoint_dir: str, epoch: int, rng_states: list) -> str | None:
    """Record in `epoch_N.pt.hn` the RNG states (per rank) that fixed epoch N's sample order,
    taken when its loader started; a resume from `epoch_N.pt` then replays the epoch exactly.
    None when there is no such state file (the epoch was not checkpointed)."""
    path = state_path(checkpoint_dir, epoch)
    if not os.path.exists(path):
        return None
    try:
        state = read_state(path)
    except StateError as err:  # resumed with --hn-drop-state past it: nothing to add to
        logging.warning("Not recording epoch %d's sample order: %s", epoch, err)
        return None
    state["rng_epoch_start"] = rng_states
    atomic_torch_save(state, path)
    return path


def non_finite(value: Any, where: str = "") -> str | None:
    """Where the first NaN/inf of a nested state (dicts, lists, tensors, floats) is, or None."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            bad = ~torch.isfinite(value)
            if bad.any():
                return f"{where or 'value'} ({int(bad.sum())} of {value.numel()} values)"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where or 'value'} (= {value})"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def is_url(path: str) -> bool:
    """A remote path (`s3://...`, `file://...`): what OpenCLIP resumes from with --remote-sync,
    read through fsspec as OpenCLIP reads it."""
    return "://" in path


def _exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    return fs.exists(inner)


def read_state(path: str) -> dict[str, Any]:
    """Load and validate a `.hn` file (local, or a URL); `StateError` names the file, the
    problem and the fix.

    A local file is memory-mapped (copy-on-write): every rank of a node checks the same file at
    start, and its bank and teacher weights then sit once in the page cache, not once per rank."""
    try:
        if is_url(path):
            import io

            import fsspec

            with fsspec.open(path, "rb") as handle:
                state = torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=False)
        else:
            state = torch.load(path, map_location="cpu", weights_only=False,
                               mmap=zipfile.is_zipfile(path))
    except Exception as err:  # truncated zip, garbage, unpickling errors: all mean damaged
        raise StateError(f"plugin state {path} cannot be read ({type(err).__name__}: "
                         f"{str(err)[:200]}); it is damaged (e.g. cut short by a kill or a "
                         f"full disk): {_FIX}") from None
    if not isinstance(state, dict) or "version" not in state or "epoch" not in state:
        raise StateError(f"{path} is not an open_clip_hn plugin state (a {type(state).__name__} "
                         f"without version/epoch); move it away: {_FIX}")
    if state["version"] != STATE_VERSION:
        raise StateError(f"{path}: plugin state version {state['version']!r} is not "
                         f"{STATE_VERSION}; it was written by another open_clip_hn version: "
                         f"{_FIX}, or use that version")
    bad = non_finite(state)
    if bad:
        raise StateError(f"plugin state {path} holds non-finite values in {bad}: the run "
                         f"diverged before it was saved; {_FIX}")
    return state


def state_files_beside(checkpoint_path: str, epoch: int) -> list[str]:
    """The existing state files a resume from this checkpoint would look at (not read).

    Non-empty means the run had the plugin on: resuming it as plain OpenCLIP would silently
    drop the bank, thresholds and curriculum, which the caller should refuse unless asked.
    """
    path = checkpoint_path if is_url(checkpoint_path) else os.path.abspath(checkpoint_path)
    candidates = dict.fromkeys((path + STATE_SUFFIX, state_path(os.path.dirname(path), epoch)))
    return [p for p in candidates if _exists(p)]


def find_state(checkpoint_path: str, epoch: int, weights: Mapping[str, Any] | None = None
               ) -> tuple[str, dict[str, Any]] | None:
    """The plugin state saved after `epoch` (the checkpoint's own epoch), or None when the
    checkpoint never had one.

    Looked for beside the checkpoint under its own name first (`X.pt.hn`, for checkpoints that
    were copied with their state), then as `epoch_N.pt.hn` in its folder. A file whose epoch
    differs from the checkpoint's is never used. `StateError` where the state is damaged, where
    it was saved beside other weights than `weights` (the checkpoint's `state_dict`: another
    run's file, or another save's), or where the checkpoint's record (`X.pt.json`, written with
    the state) says it had a state that is not there: resuming would silently train on without
    the bank, thresholds, teacher and sample order.
    """
    others = []
    for path in state_files_beside(checkpoint_path, epoch):
        state = read_state(path)
        if state.get("epoch") != epoch:
            others.append(f"{path} is epoch {state.get('epoch')}'s")
            continue
        saved = state.get(WEIGHTS_DIGEST_KEY)
        if weights is not None and saved is not None and saved != weights_digest(weights):
            raise StateError(f"plugin state {path} was saved beside other weights than those of "
                             f"{checkpoint_path} (another run's state, or another save's): {_FIX}")
        return path, state
    if _has_record(checkpoint_path):
        found = f" ({'; '.join(others)})" if others else ""
        raise MissingState(f"the plugin state saved with {checkpoint_path} is missing: no epoch-{epoch} "
                           f"state beside it{found}, though its record {checkpoint_path}.json says "
                           f"the run had one (a checkpoint copied without its .hn file?); {_FIX}")
    return None


def _has_record(checkpoint_path: str) -> bool:
    from .provenance import sidecar_path

    return _exists(sidecar_path(checkpoint_path))


def weights_digest(weights: Mapping[str, Any]) -> str:
    """What ties a plugin state to the weights it was saved beside: a SHA-256 of the names and
    of the first and last 64 values of every floating tensor (DDP's `module.` and torch.compile's
    `_orig_mod.` dropped from the names; in float32, read without touching the rest: cheap on a
    memory-mapped checkpoint)."""
    items = sorted(((name.replace("_orig_mod.", "").removeprefix("module."), tensor)
                    for name, tensor in weights.items()
                    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()),
                   key=lambda item: item[0])
    digest = hashlib.sha256("\0".join(name for name, _ in items).encode())
    if items:
        flat = [tensor.detach().reshape(-1) for _, tensor in items]
        picked = torch.cat([torch.cat([f[:64], f[-64:]]).float().cpu() for f in flat])
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:32]


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


def drop_state_and_record(checkpoint_dir: str, epoch: int) -> None:
    """Remove `epoch_N.pt.hn` and `epoch_N.pt.json` for an epoch whose checkpoint is being
    deleted (`--delete-previous-checkpoint`), once the next epoch's pair is on disk."""
    from .provenance import sidecar_path

    checkpoint = os.path.join(checkpoint_dir, f"epoch_{epoch}.pt")
    for path in (state_path(checkpoint_dir, epoch), sidecar_path(checkpoint)):
        if os.path.exists(path):
            os.remove(path)


# ---------------------------------------------------------------------------- picking a checkpoint


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def checkpoint_names_newest_first(names: Iterable[str]) -> list[str]:
    """The checkpoint names (`*.pt`; not the plugin's `.pt.hn`/`.pt.json` beside them, nor dot
    files: a write's temp file is one) among `names`, in the order OpenCLIP's `--resume latest`
    prefers them, newest first (natural sort: `epoch_latest.pt`, then `epoch_10.pt` before
    `epoch_9.pt`)."""
    return sorted((n for n in names if n.endswith(".pt") and not n.startswith(".")), key=_natural_key,
                  reverse=True)


def checkpoints_newest_first(checkpoint_dir: str | os.PathLike) -> list[str]:
    """The folder's checkpoint files, newest first (`checkpoint_names_newest_first`)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    names = checkpoint_names_newest_first(p.name for p in folder.iterdir() if p.is_file())
    return [str(folder / name) for name in names]


def load_checkpoint_file(path: str) -> Any:
    """A checkpoint file read back fully enough to trust it, whatever it holds; ValueError
    names the file.

    Memory-mapped (a legacy-format file is read whole), so tensors are not read, but a truncated
    zip (a kill during the write) or missing records fail here. Weights-only where the file
    allows; a checkpoint of this run that holds more than tensors and containers (e.g. RNG
    states) is loaded fully.
    """
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path}: file not found")
    mmap = zipfile.is_zipfile(path)  # torch's legacy format (before 1.6) cannot be mapped
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except pickle.UnpicklingError:  # the weights-only refusal of a non-tensor object
            checkpoint = torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
    except Exception as err:  # truncated zip, missing records, garbage: all mean unreadable
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: "
                         f"{str(err)[:200]})") from None
    return checkpoint


def read_checkpoint(path: str) -> dict[str, Any]:
    """An OpenCLIP training checkpoint (`load_checkpoint_file`, with its epoch); ValueError
    names the file."""
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("epoch"), int):
        raise ValueError(f"checkpoint {path} has no 'epoch': not an OpenCLIP training checkpoint")
    return checkpoint


def latest_good_checkpoint(checkpoint_dir: str | os.PathLike, with_state: bool, *, warn: bool = True
                           ) -> tuple[str, str | None] | None:
    """The newest checkpoint that loads, with its plugin state when `with_state`: what
    `--resume latest` should resume from. None when no checkpoint is usable. The state path is
    the checkpoint's own when the state is embedded (`EMBEDDED_STATE_KEY`), and None when the
    checkpoint has no state at all (e.g. saved by plain OpenCLIP; the caller decides, as for
    `--resume PATH`).

    A newer checkpoint that cannot be read, or (with the plugin on) whose state is damaged,
    foreign or non-finite, is skipped with a warning naming it and why; the previous good pair
    is used instead, so a kill during a save costs at most that epoch. Where checkpoints exist
    and none is usable, `StateError`: OpenCLIP would otherwise start the run over and write its
    new epochs over them. `warn=False` for a check that needs only the verdict: the `StateError`
    names every skipped file anyway, and the pick that follows warns once.
    """
    skipped: list[str] = []
    weights_load = False  # some skipped checkpoint reads back, only its plugin state does not
    for path in checkpoints_newest_first(checkpoint_dir):
        try:
            checkpoint = read_checkpoint(path)
            weights_load = True
            if not with_state:
                return path, None
            if EMBEDDED_STATE_KEY in checkpoint:  # the state travels inside the checkpoint
                bad = non_finite(checkpoint[EMBEDDED_STATE_KEY], EMBEDDED_STATE_KEY)
                if bad:
                    raise StateError(f"its plugin state holds non-finite values in {bad}")
                return path, path
            found = find_state(path, checkpoint["epoch"], checkpoint.get("state_dict"))
            return path, None if found is None else found[0]
        except ValueError as err:
            if warn:
                logging.warning("--resume latest: skipping %s: %s; falling back to the previous "
                                "checkpoint", path, err)
            skipped.append(f"{os.path.basename(path)}: {err}")
    if skipped:
        drop = (" To continue from the newest whose weights load, add --hn-drop-state (its "
                "plugin state starts fresh).") if weights_load else ""
        raise StateError(
            f"--resume latest: no checkpoint in {checkpoint_dir} can be resumed, so nothing was "
            f"trained ({'; '.join(skipped)}).{drop} To start the run over, move them out of "
            f"{checkpoint_dir}")
    return None


def set_aside_broken_checkpoints(checkpoint_dir: str | os.PathLike, with_state: bool = False
                                 ) -> list[Path]:
    """Rename the checkpoints newer than the one `--resume latest` should resume (to
    `*.pt.broken`: unreadable, or with `with_state` a damaged plugin state), so OpenCLIP's own
    pick, the newest file, becomes that one; returns the moved files.

    For launchers and routes that cannot change OpenCLIP's pick (a requeued SLURM job restarts
    with `--resume latest`; a patched OpenCLIP picks before the plugin sees the file); the files
    are kept, only renamed, so nothing is deleted. Only when a checkpoint remains to resume: with
    none, nothing moves and `--resume latest` refuses the run, naming each file, on every rank
    (renaming them all would start it over silently).
    """
    try:
        found = latest_good_checkpoint(checkpoint_dir, with_state)  # warns naming each skipped
    except StateError:
        return []
    if found is None:
        return []
    moved = []
    for path in checkpoints_newest_first(checkpoint_dir):
        if path == found[0]:
            break
        target = path + BROKEN_SUFFIX
        os.replace(path, target)
        logging.warning("set aside a checkpoint --resume latest cannot resume: %s -> %s", path, target)
        moved.append(Path(target))
    return moved
