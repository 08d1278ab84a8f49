"""An epoch's sample order that repeats: the seeded sample shuffle of webdataset train data.

OpenCLIP shuffles its webdataset shards with a generator seeded from `--seed` and the epoch
(`detshuffle2`), but the samples after them in a 5,000-sample buffer whose generator webdataset
seeds from the process id and the clock. So no epoch's sample order ever repeats: a run stopped
inside an epoch and resumed (`preemption.py`) skips as many batches as it had trained, but not
the same samples (some are trained twice in that epoch, others not at all), and two runs of one
command train on different orders. `--hn-sample-shuffle seeded`, the plugin's default, gives the
buffer a generator seeded from (`--seed`, epoch, rank, loader worker): every read of an epoch
yields the same samples in the same order, while epochs, ranks and workers still differ. The
loader workers' own generators (random crops) are seeded the same way at each epoch's start,
since OpenCLIP keeps its webdataset workers across epochs and a resumed run starts fresh ones.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds

SAMPLE_SHUFFLE_MODES = ("seeded", "process")


def find_stages(loader, matches: Callable[[Any], bool]) -> list[tuple[list, int]]:
    """Every (pipeline list, position) of a webdataset pipeline whose stage `matches`.

    `loader` may be the DataPipeline or the WebLoader that OpenCLIP's `get_wds_dataset` returns
    (`data["train"].dataloader`); the stages are found before the loader is first iterated.
    """
    found, todo = [], [loader]
    while todo:
        current = todo.pop()
        for position, step in enumerate(getattr(current, "pipeline", [])):
            if matches(step):
                found.append((current.pipeline, position))
            if hasattr(step, "dataset"):  # a DataLoader inside a WebLoader
                todo.append(step.dataset)
    return found


def is_filter(step: Any, name: str) -> bool:
    """True for webdataset's curried filter `name` (`wds.shuffle(...)` is `_shuffle`)."""
    return getattr(getattr(step, "f", None), "__name__", "") == name


def _seed_worker(key: str) -> None:
    """Seed a loader worker's torch, random and numpy generators from `key`.

    OpenCLIP's webdataset loader keeps its workers across epochs, so their generators (the image
    augmentation's random crops) carry on from every earlier epoch, which a resumed run, with
    fresh workers, cannot reproduce. Seeded at each epoch's start, they depend on the epoch only.
    """
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    torch.manual_seed(digest)
    random.seed(digest)
    np.random.seed(digest % 2**32)


class SeededSampleShuffle:
    """webdataset's sample shuffle (same buffer and start) with a generator seeded from
    (seed, epoch, rank, loader worker, stage, pass) each time the pipeline is read.

    A worker whose shards run out before its share of the epoch reads its pipeline again
    (OpenCLIP's `with_epoch`); the pass number gives that read another order, where one key would
    repeat the first batches sample for sample. At the epoch's first pass a loader worker's own
    generators are seeded from the same key (`_seed_worker`).
    """

    def __init__(self, bufsize: int, initial: int, seed: int, epoch, rank: int, stage: int = 0):
        self.bufsize, self.initial = bufsize, initial
        self.seed, self.epoch, self.rank, self.stage = seed, epoch, rank, stage
        self._passes: tuple[int | None, int] = (None, 0)  # (epoch, passes begun in it) here

    def _next_pass(self, epoch: int) -> int:
        last_epoch, begun = self._passes
        index = begun if epoch == last_epoch else 0
        self._passes = (epoch, index + 1)
        return index

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        epoch = self.epoch.get_value()
        index = self._next_pass(epoch)
        key = (f"open_clip_hn sample shuffle seed={self.seed} epoch={epoch} rank={self.rank} "
               f"worker={0 if worker is None else worker.id} stage={self.stage} pass={index}")
        if worker is not None and index == 0:  # without workers the loader runs in the trainer,
            _seed_worker(key)                  # whose RNG the step checkpoints save and restore
        generator = random.Random(key)  # a str seed is hashed with SHA-512: stable across processes
        return wds.shuffle(bufsize=self.bufsize, initial=self.initial, rng=generator)(samples)


def seed_sample_shuffle(train, seed: int, rank: int) -> int:
    """Replace, in place, the sample shuffle of OpenCLIP's webdataset train data (`train` is
    `data["train"]`, a DataInfo) with `SeededSampleShuffle`; returns how many were replaced.

    CSV data (no shared epoch) is left alone: its order is already reproducible. A webdataset
    pipeline without webdataset's sample shuffle is refused, naming the flag that keeps it as is.
    """
    if getattr(train, "shared_epoch", None) is None:
        return 0
    stages = find_stages(train.dataloader, lambda step: is_filter(step, "_shuffle"))
    if not stages:
        raise ValueError("--hn-sample-shuffle seeded: no webdataset sample shuffle found in the "
                         "train pipeline (OpenCLIP's get_wds_dataset has one); pass "
                         "--hn-sample-shuffle process to keep the pipeline as it is")
    for index, (pipeline, position) in enumerate(stages):
        step = pipeline[position]
        options = {**dict(zip(("bufsize", "initial"), step.args)), **step.kw}
        pipeline[position] = SeededSampleShuffle(options.get("bufsize", 1000), options.get("initial", 100),
                                                 seed, train.shared_epoch, rank, stage=index)
    return len(stages)
