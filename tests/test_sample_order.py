"""The seeded sample shuffle (`--hn-sample-shuffle seeded`): an epoch of webdataset data is read in
the same order every time, so a run stopped inside an epoch resumes on exactly its samples."""

from __future__ import annotations

import argparse
import signal

import pytest
import torch

from conftest import (HN_ONLINE_CHOICE, load_checkpoint, run_module, same_weights, start_training,
                      train_argv, train_steps, wait_for_steps)
from open_clip_hn.neighbors import insert_before_decode
from open_clip_hn.sample_order import SeededSampleShuffle, find_stages, is_filter, seed_sample_shuffle


def _name_samples(samples):
    """Replace each caption by the sample's shard and key, so an epoch reads as a list of names."""
    for sample in samples:
        sample["txt"] = f"{sample['__url__'].rsplit('/', 1)[-1]}:{sample['__key__']}".encode()
        yield sample


def _name_samples_and_draws(samples):
    """Names as `_name_samples`, each with a draw of the loader's torch generator (as the
    image augmentation's random crop would make)."""
    for sample in _name_samples(samples):
        sample["txt"] += f" draw={torch.randint(10**9, (1,)).item()}".encode()
        yield sample


def _train_data(shards: str, workers: int = 0, num_samples: int = 64, draws: bool = False):
    """OpenCLIP's own webdataset train data (DataInfo), captions replaced by sample names."""
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(train_data=shards, train_num_samples=num_samples, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=8,
                              workers=workers, world_size=1)
    train = get_wds_dataset(args, lambda image: torch.zeros(1), is_train=True,
                            tokenizer=lambda text: [text])
    insert_before_decode(train.dataloader, _name_samples_and_draws if draws else _name_samples)
    return train


def _epoch(train, epoch: int = 0) -> list[str]:
    train.set_epoch(epoch)
    return [name for _, names in train.dataloader for name in names]


def _read(shards: str, shuffle: str, epoch: int = 0, rank: int = 0, workers: int = 0,
          draws: bool = False, num_samples: int = 64) -> list[str]:
    train = _train_data(shards, workers, num_samples, draws=draws)
    if shuffle == "seeded":
        assert seed_sample_shuffle(train, seed=0, rank=rank) == 1
    return _epoch(train, epoch)


def test_seeded_epoch_repeats_and_differs_across_epochs_and_ranks(scene_shards):
    first = _read(scene_shards, "seeded")
    assert len(first) == 64 and len(set(first)) == 64  # every sample once
    assert _read(scene_shards, "seeded") == first  # a second read of the epoch: same order
    assert _read(scene_shards, "process") != _read(scene_shards, "process")  # OpenCLIP's: never
    assert sorted(_read(scene_shards, "process")) == sorted(first)  # same samples, other order
    assert _read(scene_shards, "seeded", epoch=1) != first
    assert _read(scene_shards, "seeded", epoch=1) == _read(scene_shards, "seeded", epoch=1)
    assert _read(scene_shards, "seeded", rank=1) != first


def test_seeded_epoch_repeats_with_loader_workers(scene_shards):
    """Two worker processes (one shard each): each worker's shuffle is its own, and fixed; so are
    the workers' own generators at the epoch's start (OpenCLIP keeps webdataset workers across
    epochs, so otherwise they would depend on every earlier epoch)."""
    first = _read(scene_shards, "seeded", workers=2)
    assert sorted(first) == sorted(_read(scene_shards, "process", workers=2))
    assert _read(scene_shards, "seeded", workers=2) == first
    drawn = _read(scene_shards, "seeded", workers=2, draws=True)
    assert _read(scene_shards, "seeded", workers=2, draws=True) == drawn
    assert _read(scene_shards, "seeded", epoch=1, workers=2, draws=True) != drawn
    process = [_read(scene_shards, "process", workers=2, draws=True) for _ in range(2)]
    assert process[0] != process[1]


def test_a_kept_worker_reads_a_later_epoch_as_a_fresh_one(scene_shards):
    """OpenCLIP keeps webdataset workers from epoch to epoch; a resumed run starts fresh ones.
    Epoch 1 read by workers that read epoch 0 equals epoch 1 read first, crops' draws included."""
    kept = _train_data(scene_shards, workers=2, draws=True)
    seed_sample_shuffle(kept, seed=0, rank=0)
    first = _epoch(kept, 0)
    assert _epoch(kept, 1) == _read(scene_shards, "seeded", epoch=1, workers=2, draws=True) != first


@pytest.mark.parametrize("workers", [0, 2])
def test_a_worker_that_runs_out_reads_its_shards_again_in_another_order(scene_shards, workers):
    """96 samples asked of 64: each reader passes over its shards again (OpenCLIP's `with_epoch`).
    That pass has its own order and draws, not a copy of the first batches, and repeats too."""
    names = _read(scene_shards, "seeded", workers=workers, draws=True, num_samples=96)
    assert len(names) == 96
    keys = [name.split(" draw=")[0] for name in names]
    assert len(set(keys)) == 64  # every sample at least once
    batches = [tuple(keys[i:i + 8]) for i in range(0, 96, 8)]
    assert len(set(batches)) == len(batches)  # no batch of the same samples twice
    again = _read(scene_shards, "seeded", workers=workers, draws=True, num_samples=96)
    assert [name.split(" draw=")[0] for name in again] == keys  # the same order again
    if workers:  # without workers the draws are the trainer's, which the test does not seed
        assert again == names


def test_the_replaced_stage_keeps_the_buffer_of_openclip(scene_shards):
    train = _train_data(scene_shards)
    [(pipeline, position)] = find_stages(train.dataloader, lambda step: is_filter(step, "_shuffle"))
    options = pipeline[position].kw
    seed_sample_shuffle(train, seed=3, rank=0)
    stage = pipeline[position]
    assert isinstance(stage, SeededSampleShuffle)
    assert (stage.bufsize, stage.initial, stage.seed) == (options["bufsize"], options["initial"], 3)
    assert not find_stages(train.dataloader, lambda step: is_filter(step, "_shuffle"))


def test_csv_data_is_left_alone_and_a_pipeline_without_a_shuffle_is_refused(scene_shards):
    from open_clip_train.data import DataInfo

    assert seed_sample_shuffle(DataInfo(dataloader=object()), seed=0, rank=0) == 0  # CSV: no epoch
    train = _train_data(scene_shards)
    [(pipeline, position)] = find_stages(train.dataloader, lambda step: is_filter(step, "_shuffle"))
    del pipeline[position]
    with pytest.raises(ValueError, match="--hn-sample-shuffle process"):
        seed_sample_shuffle(train, seed=0, rank=0)


# ---------------------------------------------------------------------------- whole runs


@pytest.mark.slow
@pytest.mark.parametrize("shuffle, stop_after", [("seeded", 2), ("seeded", 10), ("process", 2)])
def test_webdataset_run_stopped_mid_epoch_resumes_exactly_only_when_seeded(tmp_path, scene_shards,
                                                                           shuffle, stop_after):
    """SIGTERM inside an epoch of webdataset data (after step 2: the first of two epochs of 8
    steps; after step 10: the second, whose workers the stopped run had kept from the first),
    then --resume latest: with the seeded shuffle the resumed run ends with the uninterrupted
    run's weights; with OpenCLIP's own (`process`) it trains on other samples, so the weights
    differ. Two ranks: test_preemption."""
    extra = [*HN_ONLINE_CHOICE, "--hn-sample-shuffle", shuffle]
    whole = train_argv(scene_shards, str(tmp_path), "whole", *extra, epochs=2, num_samples=64)
    run_module("open_clip_hn.train", whole)
    cut = train_argv(scene_shards, str(tmp_path), "cut", *extra, epochs=2, num_samples=64)
    proc = start_training(cut)
    wait_for_steps(tmp_path / "cut" / "out.log", stop_after, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == -signal.SIGTERM, output[-3000:]
    run_module("open_clip_hn.train", [*cut, "--resume", "latest"])
    assert train_steps(tmp_path, "cut") == train_steps(tmp_path, "whole") == 16
    same = same_weights(load_checkpoint(tmp_path, "whole", "epoch_2.pt")["state_dict"],
                        load_checkpoint(tmp_path, "cut", "epoch_2.pt")["state_dict"])
    assert same == (shuffle == "seeded")
