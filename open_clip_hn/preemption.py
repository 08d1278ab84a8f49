"""Checkpoints inside an epoch: every N optimizer steps and at the preemption signal; resume at the step.

OpenCLIP saves at epoch ends only, and its checkpoint holds no position inside an epoch, so a
preempted job trains the whole epoch again. Here the train loader is wrapped (`SteppedLoader`):
between two optimizer steps — after OpenCLIP's `optimizer.step()` and logit-scale clamp, before
the next batch — it saves a checkpoint every `--hn-save-every-steps` steps, and when SIGUSR2
(SLURM's `--signal`, `scancel --signal=USR2`) or SIGTERM arrived during the step in flight. Every
rank finishes that step; one all-reduce makes the ranks agree; rank 0 writes the checkpoint
atomically; then the process stops the way the signal would have stopped it (submitit's handler
requeues the job).

A step checkpoint is OpenCLIP's checkpoint (plain OpenCLIP loads its weights and resumes from it)
with two more keys: `hn_position` (epoch, steps done, samples seen, the RNG states that fix the
epoch's sample order and the next step's randomness) and `hn_state` (the plugin's state). Named
`epoch_E_step_S.pt`, it sorts between `epoch_E.pt` and `epoch_{E+1}.pt` in OpenCLIP's natural order,
so `--resume latest` (`state.latest_good_checkpoint`) picks the newest checkpoint, step or epoch. On resume the loader skips the
batches already trained (resampled webdataset: it just draws the remaining ones), the LR schedule
and the plugin's step clock continue at the step, and the rest of the run is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import random
import re
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .state import CheckpointWriteError, StateError, atomic_torch_save

POSITION_KEY = "hn_position"
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
_STEP_NAME = re.compile(r"epoch_(\d+)_step_(\d+)\.pt")
_EPOCH_NAME = re.compile(r"epoch_(\d+)\.pt")


# ---------------------------------------------------------------------------- position


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (torch CPU and CUDA, numpy, random)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),  # plain types only: OpenCLIP loads weights_only
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_states(state: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Every rank's `state`, in rank order (each rank draws its own random numbers)."""
    if world_size == 1:
        return [state]
    states: list = [None] * world_size
    torch.distributed.all_gather_object(states, state)
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class EpochPosition:
    """Where inside an epoch a step checkpoint was taken."""

    epoch: int                   # 0-based epoch in progress (= epochs completed)
    step: int                    # optimizer steps done in this epoch
    steps_per_epoch: int         # 0 where unknown (an epoch checkpoint's position)
    samples_seen: int            # over the whole run, all ranks
    rng_epoch_start: list[dict]  # per rank: RNG when the epoch's loader iterator was created
    rng_now: list[dict] | None   # per rank: RNG right after the step (None at an epoch start)
    workers: int | None = None   # loader workers per rank (webdataset splits shards by worker)
    seed: int | None = None      # --seed (it orders shards and samples); None before session 32

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, path: str) -> "EpochPosition | None":
        saved = checkpoint.get(POSITION_KEY)
        if saved is None:
            return None
        try:
            position = cls(**saved)
            if not (position.rng_epoch_start and 0 <= position.step <= position.steps_per_epoch):
                raise TypeError(f"step {position.step} of {position.steps_per_epoch}, "
                                f"{len(position.rng_epoch_start)} rank states")
            return position
        except TypeError as err:  # missing or unknown fields, or not a mapping
            raise StateError(f"{path}: its {POSITION_KEY} entry is not this version's ({err}); "
                             "resume from an epoch checkpoint (--resume PATH/epoch_N.pt)") from None


def step_checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch_{epoch}_step_{step}.pt"


def is_step_checkpoint_name(path: str) -> bool:
    return _STEP_NAME.fullmatch(os.path.basename(path)) is not None


def epoch_of_checkpoint_name(path: str) -> int | None:
    """N for OpenCLIP's epoch-end `epoch_N.pt`; None for any other name."""
    epoch = _EPOCH_NAME.fullmatch(os.path.basename(path))
    return int(epoch.group(1)) if epoch else None


def progress_of(path: str) -> tuple[int, int] | None:
    """(epochs done, steps into the next) from a checkpoint's file name; None for other names."""
    step = _STEP_NAME.fullmatch(os.path.basename(path))
    if step:
        return int(step.group(1)), int(step.group(2))
    epoch = epoch_of_checkpoint_name(path)
    return None if epoch is None else (epoch, 0)


# ---------------------------------------------------------------------------- files


def prune_step_checkpoints(folder: str, keep: str | None = None, before_epoch: int | None = None) -> None:
    """Remove step checkpoints other than `keep` (or, with `before_epoch`, those of earlier
    epochs only). Called once the newer checkpoint is safely on disk."""
    for path in glob.glob(os.path.join(folder, "epoch_*_step_*.pt")):
        progress = progress_of(path)
        if progress is None or (keep is not None and os.path.abspath(path) == os.path.abspath(keep)):
            continue
        if before_epoch is None or progress[0] < before_epoch:
            os.remove(path)


# ---------------------------------------------------------------------------- the signal


class StopRequest:
    """Records SIGUSR2/SIGTERM instead of dying at once, so the step in flight can finish and be
    saved; `stop()` then ends the process as the signal would have (calling the handler that was
    there before, e.g. submitit's requeue)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in self.signals:
            self.previous[signum] = signal.signal(signum, self._record)
        # loader workers fork with these handlers; only the training process may stop the run
        os.register_at_fork(after_in_child=self._ignore_in_child)

    def _ignore_in_child(self) -> None:
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            logging.warning("Received %s: finishing the current step, then saving a checkpoint",
                            signal.Signals(signum).name)
        self.received = signal.Signals(signum)

    def stop(self, signum: signal.Signals | None = None) -> None:
        """End the process as `signum` would have, now that its work is saved."""
        signum = signum or self.received or signal.SIGTERM
        previous = self.previous.get(signum, signal.SIG_DFL)
        for restored, handler in self.previous.items():
            signal.signal(restored, handler)
        if callable(previous):
            previous(signum, None)  # e.g. submitit: requeue (rank 0) and exit
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        raise SystemExit(128 + signum)  # if the default action was to ignore it


class IgnoreStopSignals:
    """A loader's `worker_init_fn` that keeps the worker alive through the stop signals sent to
    the whole process group, then calls the loader's own. `scancel`, a preempting SLURM and
    torchrun signal the group; torch's worker loop installs its own SIGTERM handler after the
    fork (over the at-fork `SIG_IGN` of `StopRequest`), which ended the worker, and the training
    process then failed at its next fetch instead of saving the step checkpoint. SIGUSR2 is
    ignored; SIGTERM is taken by a thread that ends the worker only when the training process
    sends it (torch's shutdown and multiprocessing's exit clean-up terminate their workers so:
    ignored, an exception in training left the process waiting for its worker forever). A
    class, not a closure: workers started by spawn or forkserver unpickle it."""

    def __init__(self, init_fn: Callable[[int], None] | None, signals=STOP_SIGNALS):
        self.init_fn = init_fn
        self.signals = tuple(signals)
        self.trainer = os.getpid()  # the training process: the loader is built there

    def __call__(self, worker_id: int) -> None:
        for signum in self.signals:
            if signum != signal.SIGTERM:
                signal.signal(signum, signal.SIG_IGN)
        if signal.SIGTERM in self.signals and hasattr(signal, "sigwaitinfo"):  # not on macOS:
            # there torch's handler stays, and a group SIGTERM ends the workers as before
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the thread below takes it
            threading.Thread(target=self._end_on_trainer_sigterm, daemon=True,
                             name="open_clip_hn-sigterm").start()
        if self.init_fn is not None:
            self.init_fn(worker_id)

    def _end_on_trainer_sigterm(self) -> None:
        senders = {self.trainer, os.getppid()}
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid in senders:
                os._exit(0)  # as torch's own worker handler does for its parent's SIGTERM


def ignore_stop_signals_in_workers(loader) -> int:
    """Give the workers of `loader` (a DataLoader, or webdataset's WebLoader around one: OpenCLIP's
    two train loaders) `IgnoreStopSignals`, before its first iteration starts them; returns how
    many loaders with workers were changed."""
    loaders = [loader, *(step for step in getattr(loader, "pipeline", []) if hasattr(step, "worker_init_fn"))]
    changed = 0
    for inner in loaders:
        if getattr(inner, "num_workers", 0) and not isinstance(inner.worker_init_fn, IgnoreStopSignals):
            inner.worker_init_fn = IgnoreStopSignals(inner.worker_init_fn)
            changed += 1
    return changed


def agree(signum: int, device, world_size: int) -> int:
    """The stop signal any rank received (0: none), the same on every rank: one all-reduce
    (none for one process), so no rank saves or stops after a different step."""
    if world_size == 1:
        return signum
    value = torch.tensor([signum], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value.item())


# ---------------------------------------------------------------------------- the loader


class SteppedLoader:
    """OpenCLIP's train loader with a callback between optimizer steps and a resume position.

    `between_steps(step, rng_epoch_start)` runs before the batches of step `step` (0-based,
    inside the epoch) are fetched, i.e. after step `step - 1` finished, including before the
    first step and, once more, after the last (so a stop signal received during the epoch's last
    step is acted on before OpenCLIP's evaluation and epoch checkpoint). With `resume`, the RNG
    that fixed the epoch's sample order is put back before the iterator is made, the first
    `resume.step` steps' batches are skipped (or, with `skip_by_drawing=False` for resampled
    data, simply not drawn), the RNG of the next step is put back, and the loop continues at
    that step; a position saved after the epoch's last step reads no batch at all.
    """

    def __init__(self, loader, accum_freq: int, between_steps: Callable[[int, dict], None],
                 resume: EpochPosition | None = None, skip_by_drawing: bool = True, rank: int = 0):
        self.loader = loader
        self.accum_freq = accum_freq
        self.between_steps = between_steps
        self.resume = resume
        self.skip_by_drawing = skip_by_drawing
        self.rank = rank
        self.num_batches = loader.num_batches
        self.num_samples = loader.num_samples

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def first_batch(self) -> int:
        """Index in the epoch of the first batch this loader yields (a resumed epoch's step)."""
        return self.resume.step * self.accum_freq if self.resume is not None else 0

    def _own(self, states: list[dict]) -> dict:
        if len(states) <= self.rank:
            raise ValueError(f"the checkpoint holds RNG states of {len(states)} rank(s), this is "
                             f"rank {self.rank}: resume with the world size it was saved with")
        return states[self.rank]

    def __iter__(self) -> Iterator:
        resume, first = self.resume, 0
        if resume is not None and resume.step * self.accum_freq >= self.num_batches:
            if resume.rng_now is not None:
                set_rng_state(self._own(resume.rng_now))
            logging.info("Resuming epoch %d after its last step: no batch left to train",
                         resume.epoch)
            return
        if resume is not None:
            set_rng_state(self._own(resume.rng_epoch_start))
        rng_epoch_start = rng_state()
        batches = iter(self.loader)
        if resume is not None:
            first = resume.step * self.accum_freq
            if self.skip_by_drawing:
                for _ in range(first):
                    next(batches)
            if resume.rng_now is not None:
                set_rng_state(self._own(resume.rng_now))
            logging.info("Resuming epoch %d at step %d (%d batches %s)", resume.epoch, resume.step,
                         first, "skipped" if self.skip_by_drawing else "not drawn: resampled data")
        index, called = first, None
        while index < self.num_batches:  # resampled data: the epoch's remaining batches are done
            # before the step's first fetch: with --workers 0 the fetch draws the augmentations
            # from this process's RNG, so the RNG a step checkpoint saves is the one before it
            if index % self.accum_freq == 0 and (index > first or resume is None):
                self.between_steps(index // self.accum_freq, rng_epoch_start)
                called = index
            try:
                batch = next(batches)
            except StopIteration:
                break
            yield batch
            index += 1
        if index > first and called != index:  # after the last step (the next epoch's first
            self.between_steps(index // self.accum_freq, rng_epoch_start)  # call comes too late)


_UNSET = object()


def _enumerate_batches(iterable, start: int = 0):
    """`enumerate` as OpenCLIP's `train_one_epoch` sees it (`counting_from_position`): over a
    `SteppedLoader`, counting starts at the loader's first batch in the epoch."""
    return enumerate(iterable, start + getattr(iterable, "first_batch", 0))


@contextlib.contextmanager
def counting_from_position(train_one_epoch: Callable) -> Iterator[None]:
    """While it runs, `train_one_epoch` numbers a resumed epoch's batches from where the step
    checkpoint left off, not from 0: its step (the learning rate, the tensorboard and wandb
    points), sample count and end-of-epoch log line are then the uninterrupted run's. Its module
    is OpenCLIP's training module (or a copy of it), whose loop is `for i, batch in
    enumerate(dataloader)`."""
    namespace = train_one_epoch.__globals__
    saved = namespace.get("enumerate", _UNSET)
    namespace["enumerate"] = _enumerate_batches
    try:
        yield
    finally:
        if saved is _UNSET:
            del namespace["enumerate"]
        else:
            namespace["enumerate"] = saved



class StepCheckpointer:
    """What happens between two optimizer steps: a periodic save, or the save at a stop signal.

    `build(position)` returns the checkpoint dict to write (OpenCLIP's keys, from the adapter);
    only `is_master` writes; all ranks then meet at a barrier, so none stops before the file is
    complete.
    """

    def __init__(self, folder: str, every: int, stop: StopRequest, *, build: Callable[[EpochPosition], dict],
                 steps_per_epoch: int, samples_per_step: int, world_size: int, device,
                 is_master: bool, latest_name: str | None = None,
                 on_epoch_start: Callable[[int, list[dict]], None] | None = None, workers: int | None = None,
                 seed: int | None = None, before_stop: Callable[[], None] | None = None,
                 check: Callable[[EpochPosition], None] | None = None):
        self.folder, self.every, self.stop = folder, every, stop
        self.build = build
        self.check = check  # on every rank before a save: TrainingDiverged stops them all
        self.steps_per_epoch, self.samples_per_step = steps_per_epoch, samples_per_step
        self.world_size, self.device, self.is_master = world_size, device, is_master
        self.latest_name = latest_name  # --save-most-recent: step checkpoints go there too
        self.on_epoch_start = on_epoch_start  # every rank's RNG that fixes this epoch's order
        self.workers, self.seed = workers, seed
        self.before_stop = before_stop  # after the stop's save, before the process ends (remote sync)

    def for_epoch(self, epoch: int) -> Callable[[int, dict], None]:
        def between_steps(step: int, rng_epoch_start: dict) -> None:
            global_step = epoch * self.steps_per_epoch + step
            stopping = agree(int(self.stop.received or 0), self.device, self.world_size)
            # none after the last step: OpenCLIP's epoch checkpoint follows
            periodic = self.every > 0 and 0 < step < self.steps_per_epoch and global_step % self.every == 0
            if step == 0 and self.on_epoch_start is not None:
                self.on_epoch_start(epoch, gather_states(rng_epoch_start, self.world_size))
            if stopping or periodic:
                rng_starts = gather_states(rng_epoch_start, self.world_size)
                self.save(EpochPosition(epoch, step, self.steps_per_epoch,
                                        global_step * self.samples_per_step, rng_starts,
                                        gather_states(rng_state(), self.world_size), self.workers,
                                        self.seed), at_stop=bool(stopping))
            if stopping:
                if self.before_stop is not None:  # the master's; the others wait for it
                    self.before_stop()
                if self.world_size > 1:
                    torch.distributed.barrier()
                self.stop.stop(signal.Signals(stopping))

        return between_steps

    def save(self, position: EpochPosition, at_stop: bool = False) -> None:
        if self.check is not None:
            self.check(position)
        if self.is_master:
            name = self.latest_name or step_checkpoint_name(position.epoch, position.step)
            path = os.path.join(self.folder, name)
            try:
                atomic_torch_save(self.build(position), path)
            except CheckpointWriteError as err:  # the other ranks wait at the barrier below
                self._save_failed(err, at_stop)
            else:
                if self.latest_name is None:
                    prune_step_checkpoints(self.folder, keep=path)
                logging.info("Saved step checkpoint %s (epoch %d, step %d of %d)", path, position.epoch,
                             position.step, position.steps_per_epoch)
        if self.world_size > 1:
            torch.distributed.barrier()

    @staticmethod
    def _save_failed(err: CheckpointWriteError, at_stop: bool) -> None:
        """A periodic step save is insurance: training goes on without it. At a stop it was the
        point of stopping: the error is logged, and the stop ends the run (non-zero) as before."""
        if at_stop:
            logging.error("The stop's step checkpoint was not saved: %s", err)
        else:
            logging.warning("Step checkpoint not saved; training goes on: %s", err)
