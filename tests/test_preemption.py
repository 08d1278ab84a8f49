"""Checkpoints inside an epoch: at the signal and every N steps; a resumed run equals an
uninterrupted one (CSV data is deterministic, and webdataset data with the seeded sample shuffle,
so weights are compared exactly)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (HN_ONLINE_CHOICE, REPO, free_port, load_checkpoint, run_module, same_weights,
                      start_training, train_argv, train_steps, wait_for_steps)
from open_clip_hn.preemption import EpochPosition, SteppedLoader, progress_of, rng_state, step_checkpoint_name
from open_clip_hn.state import atomic_torch_save, latest_good_checkpoint


def latest_checkpoint(folder: str) -> str | None:
    found = latest_good_checkpoint(folder, with_state=False)
    return None if found is None else found[0]


# ---------------------------------------------------------------------------- units


def test_step_checkpoints_sort_inside_their_epoch(tmp_path):
    names = ["epoch_1.pt", step_checkpoint_name(1, 7), step_checkpoint_name(1, 12), "epoch_2.pt",
             step_checkpoint_name(0, 3)]
    assert sorted(names, key=progress_of) == ["epoch_0_step_3.pt", "epoch_1.pt", "epoch_1_step_7.pt",
                                              "epoch_1_step_12.pt", "epoch_2.pt"]
    for name in names:
        atomic_torch_save({"epoch": 0, "state_dict": {}}, str(tmp_path / name))
    (tmp_path / "epoch_2.pt").write_bytes((tmp_path / "epoch_2.pt").read_bytes()[:50])  # killed mid-write
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "epoch_1_step_12.pt")


class _Loader(list):
    num_batches = 6
    num_samples = 12


class _Unread(_Loader):
    def __iter__(self):
        raise AssertionError("read")


def test_stepped_loader_calls_between_steps_and_resumes():
    calls = []
    loader = SteppedLoader(_Loader(range(6)), 2, lambda step, rng: calls.append(step))
    assert list(loader) == [0, 1, 2, 3, 4, 5] and calls == [0, 1, 2, 3]  # 3: after the last step
    position = EpochPosition(0, 2, 3, 8, [rng_state()], [rng_state()])
    calls.clear()
    resumed = SteppedLoader(_Loader(range(6)), 2, lambda step, rng: calls.append(step), position)
    assert list(resumed) == [4, 5] and calls == [3]  # skipped what step 0-1 consumed
    calls.clear()
    ended = EpochPosition(0, 3, 3, 12, [rng_state()], [rng_state()])
    # a position after the last step reads no batch, not even to skip it
    assert list(SteppedLoader(_Unread(range(6)), 2, lambda step, rng: calls.append(step), ended)) == []
    assert calls == []
    drawn = SteppedLoader(_Loader(range(100, 110)), 2, lambda step, rng: None, position,
                          skip_by_drawing=False)
    assert list(drawn) == [100, 101]  # resampled: the epoch's remaining 2 batches, newly drawn


def test_a_step_checkpoint_of_another_batch_layout_is_refused_as_state():
    """Resuming mid-epoch with another steps-per-epoch would skip the wrong samples: a StateError
    (the trainer prints `error: ...` and exits 2), naming what changed."""
    from open_clip_hn.config import HNConfig
    from open_clip_hn.run import HardNegativeRun
    from open_clip_hn.state import StateError

    run = HardNegativeRun(HNConfig(save_every_steps=5))
    run.resume_position = EpochPosition(0, 16, 50, 800, [rng_state()] * 2, [rng_state()] * 2, workers=2,
                                        seed=0)
    with pytest.raises(StateError, match=r"saved with 50 steps per epoch, this run has 25 \(batch size, "
                                         r"--accum-freq, world size, --workers or --train-num-samples"):
        run.data_ready(lambda texts: texts, 0, 25, 1, world_size=2)
    # the seed orders shards and samples (the seeded shuffle buffer too)
    with pytest.raises(StateError, match=r"saved with --seed 0, this run has --seed 7.*or start the "
                                         r"run over in a new experiment folder \(--name NEW_NAME\): it "
                                         r"stopped in its first epoch, before any epoch checkpoint"):
        run.data_ready(lambda texts: texts, 0, 50, 1, world_size=2, workers=2, seed=7)
    later = HardNegativeRun(HNConfig(save_every_steps=5))  # a later epoch names its checkpoint
    later.resume_position = EpochPosition(3, 16, 50, 800, [rng_state()] * 2, [rng_state()] * 2, workers=2,
                                          seed=0)
    with pytest.raises(StateError, match=r"saved with --seed 0, this run has --seed 7.*--resume "
                                         r"LOGS/NAME/checkpoints/epoch_N.pt --name NEW_NAME \(N at most 3"):
        later.data_ready(lambda texts: texts, 3, 50, 4, world_size=2, workers=2, seed=7)
    # the same global batch on another number of ranks, or other loader workers (webdataset)
    with pytest.raises(StateError, match=r"saved by 2 rank\(s\), this run has 1"):
        run.data_ready(lambda texts: texts, 0, 50, 1, world_size=1, workers=2)
    with pytest.raises(StateError, match="saved with --workers 2, this run has --workers 4"):
        run.data_ready(lambda texts: texts, 0, 50, 1, world_size=2, workers=4)
    run.data_ready(lambda texts: texts, 0, 50, 1, world_size=2, workers=None)  # CSV: any workers
    assert run.start_step == 16
    run.data_ready(lambda texts: texts, 0, 50, 1, world_size=2, workers=2)
    assert run.start_step == 16


def test_drop_state_keeps_a_step_checkpoints_place_and_a_foreign_position_is_state_error():
    """--hn-drop-state drops the plugin's state, not OpenCLIP's place in the epoch: the epoch
    still continues at the saved step (its first steps were trained twice). A position of
    another format ends as a StateError (exit 2), not a traceback."""
    from open_clip_hn.config import HNConfig
    from open_clip_hn.preemption import POSITION_KEY
    from open_clip_hn.run import HardNegativeRun
    from open_clip_hn.state import EMBEDDED_STATE_KEY, StateError

    position = EpochPosition(1, 9, 16, 400, [rng_state()], [rng_state()], workers=1)
    checkpoint = {"epoch": 1, POSITION_KEY: position.to_dict(), EMBEDDED_STATE_KEY: {"config": {}}}
    for drop in (False, True):
        run = HardNegativeRun(HNConfig(save_every_steps=5, drop_state=drop))
        run.checkpoint_loaded("epoch_1_step_9.pt", checkpoint)
        assert (run.resume_position.epoch, run.resume_position.step, run.resume_position.workers) == (1, 9, 1)
        assert (run.pending_state is None) == drop
    for bad in ({**position.to_dict(), "rng_now": None, "extra": 1}, {"epoch": 1},
                {**position.to_dict(), "step": 17}, "not a dict"):
        with pytest.raises(StateError, match="its hn_position entry is not this version's"):
            HardNegativeRun(HNConfig(save_every_steps=5)).checkpoint_loaded(
                "epoch_1_step_9.pt", {"epoch": 1, POSITION_KEY: bad})


def test_loader_workers_of_both_openclip_loaders_get_the_stop_signal_handling():
    """The train loader's workers (a DataLoader, or the one inside webdataset's WebLoader) get
    `IgnoreStopSignals` ahead of their own init function, which still runs; it pickles (spawned
    workers). A loader without workers is left alone."""
    import pickle

    import webdataset as wds

    from open_clip_hn.preemption import IgnoreStopSignals, ignore_stop_signals_in_workers

    seen = []
    plain = torch.utils.data.DataLoader(list(range(4)), num_workers=1, worker_init_fn=seen.append)
    web = wds.WebLoader(list(range(4)), num_workers=2)
    inline = torch.utils.data.DataLoader(list(range(4)), num_workers=0)
    assert [ignore_stop_signals_in_workers(x) for x in (plain, web, inline, plain)] == [1, 1, 0, 0]
    assert isinstance(web.pipeline[0].worker_init_fn, IgnoreStopSignals) and inline.worker_init_fn is None
    assert pickle.loads(pickle.dumps(IgnoreStopSignals(None))).trainer == os.getpid()
    plain.worker_init_fn.init_fn(3)
    assert seen == [3]


def test_without_sigwaitinfo_the_worker_keeps_torchs_sigterm_handling(monkeypatch):
    """macOS has no sigwaitinfo: the worker then ignores SIGUSR2 only and leaves SIGTERM as torch
    sets it (blocking it there would leave no one to take it)."""
    from open_clip_hn.preemption import IgnoreStopSignals

    monkeypatch.delattr(signal, "sigwaitinfo")
    before = signal.getsignal(signal.SIGUSR2)
    try:
        IgnoreStopSignals(None)(0)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGUSR2, before)


WORKER = """
import os, signal, sys, time
from open_clip_hn.preemption import IgnoreStopSignals
init = IgnoreStopSignals(None)           # made in the training process, as the loader is
child = os.fork()
if child == 0:                           # a loader worker
    init(0)
    time.sleep(60)
    os._exit(3)
time.sleep(0.5)
os.system(f"kill -TERM {child}")        # another process (scancel, torchrun): survived
time.sleep(0.5)
alive = os.waitpid(child, os.WNOHANG) == (0, 0)
os.kill(child, signal.SIGUSR2)           # ignored too
time.sleep(0.3)
alive = alive and os.waitpid(child, os.WNOHANG) == (0, 0)
os.kill(child, signal.SIGTERM)           # the training process's own (torch's or multiprocessing's shutdown): ends it
_, status = os.waitpid(child, 0)
print(alive, os.waitstatus_to_exitcode(status))
"""


def test_a_worker_survives_the_group_sigterm_and_ends_on_the_trainers():
    """In a worker, SIGTERM from another process (the process group's) is ignored so the step
    in flight can finish, while the training process's own SIGTERM ends it: multiprocessing's
    exit clean-up terminates workers so, and ignoring it left a failed run waiting forever."""
    out = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "0"], out.stdout + out.stderr


# ---------------------------------------------------------------------------- whole runs


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--accum-freq", "2"], ["--workers", "0"]],
                         ids=["plain", "accum2", "workers0"])
def test_signal_mid_epoch_then_resume_equals_uninterrupted(tmp_path, scene_csv, extra):
    """SIGTERM in the middle of an epoch: the step in flight finishes, a step checkpoint is saved
    (and loads in plain OpenCLIP), and `--resume latest` ends with the uninterrupted run's weights.
    The signal goes to the whole process group, loader worker included, as `scancel`, a
    preempting SLURM and torchrun send it (torch's worker handler used to kill the worker, and
    the run then failed in its next fetch without saving). With `--workers 0` the augmentations
    are drawn from the training process's RNG at each fetch: the saved RNG is the one before the
    step's fetch (it was the one after, and the resumed run cropped its first batch otherwise).
    The resumed run logs the uninterrupted run's steps and sample counts, to the console and to
    tensorboard (OpenCLIP's loop counted from 0 again, so the resumed half of the epoch was
    logged over steps already logged, and its last log line never came)."""
    batch = 4 if "--accum-freq" in extra else 8
    extra = [*extra, "--report-to", "tensorboard"]
    whole = train_argv(scene_csv, str(tmp_path), "whole", *HN_ONLINE_CHOICE, *extra, epochs=2, batch_size=batch)
    run_module("open_clip_hn.train", whole)

    cut = train_argv(scene_csv, str(tmp_path), "cut", *HN_ONLINE_CHOICE, *extra, epochs=2, batch_size=batch)
    proc = start_training(cut)
    wait_for_steps(tmp_path / "cut" / "out.log", 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == -signal.SIGTERM, output[-3000:]  # stopped as the signal would
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("epoch_*_step_*.pt"))
    assert len(saved) == 1, saved
    position = load_checkpoint(tmp_path, "cut", saved[0])["hn_position"]
    assert 0 < position["step"] + 4 * position["epoch"]  # inside the run, not at its start
    stopped_at = train_steps(tmp_path, "cut")
    assert position["epoch"] * 4 + position["step"] == stopped_at  # no step in flight lost

    import open_clip

    open_clip.add_model_config(str(REPO / "open_clip_hn" / "model_configs" / "hn-tiny-vit.json"))
    open_clip.create_model_and_transforms(
        "hn-tiny-vit", pretrained=str(tmp_path / "cut" / "checkpoints" / saved[0]))

    run_module("open_clip_hn.train", [*cut, "--resume", "latest"])
    assert "is a step checkpoint" in (tmp_path / "cut" / "out.log").read_text()
    assert train_steps(tmp_path, "cut") == train_steps(tmp_path, "whole") == 8
    a = load_checkpoint(tmp_path, "whole", "epoch_2.pt")
    b = load_checkpoint(tmp_path, "cut", "epoch_2.pt")
    assert same_weights(a["state_dict"], b["state_dict"])
    hn_a = torch.load(tmp_path / "whole" / "checkpoints" / "epoch_2.pt.hn", weights_only=False)
    hn_b = torch.load(tmp_path / "cut" / "checkpoints" / "epoch_2.pt.hn", weights_only=False)
    assert hn_a["loss"]["step"] == hn_b["loss"]["step"] == 8
    assert not list((tmp_path / "cut" / "checkpoints").glob("epoch_*_step_*.pt"))  # pruned
    assert logged_progress(tmp_path, "cut") == logged_progress(tmp_path, "whole")


def logged_progress(logs: Path, name: str) -> tuple[list, list]:
    """(epoch, samples) of every console progress line, and every tensorboard step of the
    learning rate, over all starts of a run, sorted."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    console = re.findall(r"Train Epoch: (\d+) \[\s*(\d+)/", (logs / name / "out.log").read_text())
    steps = []
    for events in (logs / name / "tensorboard").glob("events.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        steps += [event.step for event in accumulator.Scalars("train/lr")]
    return sorted(console), sorted(steps)


FAILING_RUN = """
import sys
import open_clip_hn.objective as objective
forward, calls = objective.HardNegativeLoss.forward, []
def failing(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("simulated failure at step 3")
    return forward(self, *args, **kwargs)
objective.HardNegativeLoss.forward = failing
from open_clip_hn.hooks import run_openclip_main
run_openclip_main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("data", ["scene_csv", "scene_shards"])
def test_a_run_that_fails_exits_with_loader_workers(tmp_path, data, request):
    """An exception in training ends the process (exit 1) with its loader worker: the worker's
    stop-signal handling must let the training process's own SIGTERM through (multiprocessing's
    exit clean-up sends it, then waits for the worker)."""
    argv = train_argv(request.getfixturevalue(data), str(tmp_path), "fails", *HN_ONLINE_CHOICE)
    out = subprocess.run([sys.executable, "-c", FAILING_RUN, *argv], capture_output=True, text=True,
                         timeout=180, cwd=REPO)
    assert out.returncode == 1 and "simulated failure at step 3" in out.stderr, out.stderr[-3000:]


SIGNAL_IN_LAST_STEP = """
import os, signal, sys
import open_clip_hn.objective as objective
forward, calls = objective.HardNegativeLoss.forward, []
def signalled(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == int(os.environ["SIGNAL_AT_CALL"]):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the run's last step is in flight
    return forward(self, *args, **kwargs)
objective.HardNegativeLoss.forward = signalled
from open_clip_hn.hooks import run_openclip_main
run_openclip_main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_signal_in_the_last_step_saves_before_the_final_evaluation(tmp_path, scene_csv):
    """A stop signal during an epoch's last step used to wait for the next epoch's first step:
    after the run's last epoch that never came, so a time limit during OpenCLIP's final
    evaluation and save lost the epoch. It is now acted on right after the step."""
    whole = train_argv(scene_csv, str(tmp_path), "whole", *HN_ONLINE_CHOICE, epochs=2)
    run_module("open_clip_hn.train", whole)
    cut = train_argv(scene_csv, str(tmp_path), "cut", *HN_ONLINE_CHOICE, epochs=2)
    out = subprocess.run([sys.executable, "-c", SIGNAL_IN_LAST_STEP, *cut], capture_output=True,
                         text=True, timeout=180, cwd=REPO, env={**os.environ, "SIGNAL_AT_CALL": "8"})
    assert out.returncode == -signal.SIGTERM, out.stderr[-3000:]
    checkpoints = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["epoch_1.pt", "epoch_1_step_4.pt"]
    assert train_steps(tmp_path, "cut") == 8
    run_module("open_clip_hn.train", [*cut, "--resume", "latest"])
    assert "Resuming epoch 1 after its last step" in (tmp_path / "cut" / "out.log").read_text()
    assert train_steps(tmp_path, "cut") == 8  # nothing trained twice
    assert same_weights(load_checkpoint(tmp_path, "whole", "epoch_2.pt")["state_dict"],
                        load_checkpoint(tmp_path, "cut", "epoch_2.pt")["state_dict"])
    saved = torch.load(checkpoints / "epoch_2.pt.hn", weights_only=False)
    assert saved["loss"]["step"] == 8
    assert not list(checkpoints.glob("epoch_*_step_*.pt"))


@pytest.mark.slow
def test_kill_9_loses_at_most_n_steps(tmp_path, scene_csv):
    """No signal handler runs for SIGKILL: the periodic step checkpoint is what is left; the
    resumed run repeats at most N steps and still equals the uninterrupted run."""
    n = 3
    whole = train_argv(scene_csv, str(tmp_path), "whole", "--hn-save-every-steps", str(n), epochs=2)
    run_module("open_clip_hn.train", whole)
    # it saved at steps 3 and 6 (inside the last epoch): epoch_2.pt supersedes both
    assert not list((tmp_path / "whole" / "checkpoints").glob("epoch_*_step_*.pt"))
    cut = train_argv(scene_csv, str(tmp_path), "cut", "--hn-save-every-steps", str(n), epochs=2)
    proc = start_training(cut)
    wait_for_steps(tmp_path / "cut" / "out.log", 6, proc)
    proc.kill()
    proc.communicate(timeout=60)
    killed_after = train_steps(tmp_path, "cut")
    latest = latest_checkpoint(str(tmp_path / "cut" / "checkpoints"))
    epoch, step = progress_of(latest)
    assert killed_after - (epoch * 4 + step) <= n
    run_module("open_clip_hn.train", [*cut, "--resume", "latest"])
    assert same_weights(load_checkpoint(tmp_path, "whole", "epoch_2.pt")["state_dict"],
                        load_checkpoint(tmp_path, "cut", "epoch_2.pt")["state_dict"])


@pytest.mark.slow
@pytest.mark.parametrize("data", ["scene_csv", "scene_shards"])
def test_two_ranks_agree_on_the_step_and_resume_exactly(tmp_path, data, request):
    """2 gloo processes; the signal reaches rank 1 only: one all-reduce makes both stop after
    the same step, rank 0 saves, and the resumed pair ends with the uninterrupted pair's weights.
    On webdataset shards (one per rank) that holds through the seeded sample shuffle."""
    train_data = request.getfixturevalue(data)

    def ranks(name: str, *extra: str) -> list[subprocess.Popen]:
        argv = train_argv(train_data, str(tmp_path), name, *HN_ONLINE_CHOICE, "--dist-backend", "gloo", *extra,
                          epochs=2, batch_size=4)
        base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                "OMP_NUM_THREADS": "1"}
        return [start_training(argv, {**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]

    for proc in ranks("whole"):
        assert proc.wait(timeout=300) == 0
    procs = ranks("cut")
    wait_for_steps(tmp_path / "cut" / "out.log", 2, procs[0])
    procs[1].send_signal(signal.SIGUSR2)
    codes = [p.wait(timeout=240) for p in procs]
    assert codes == [-signal.SIGUSR2, -signal.SIGUSR2], [p.stdout.read()[-2000:] for p in procs]
    assert len(list((tmp_path / "cut" / "checkpoints").glob("epoch_*_step_*.pt"))) == 1
    for proc in ranks("cut", "--resume", "latest"):
        assert proc.wait(timeout=300) == 0, proc.stdout.read()[-3000:]
    assert same_weights(load_checkpoint(tmp_path, "whole", "epoch_2.pt")["state_dict"],
                        load_checkpoint(tmp_path, "cut", "epoch_2.pt")["state_dict"])


# `aws s3 ls` and `aws s3 sync` (as OpenCLIP calls them) on local folders standing for S3
FAKE_AWS = '''#!/usr/bin/env python3
import fnmatch, os, shutil, sys

args = sys.argv[1:]
if args[:2] == ["s3", "ls"]:
    folder = args[2].rstrip("/")
    if not os.path.isdir(folder):
        sys.exit(1)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            print(f"                           PRE {name}/")
        else:
            print(f"2026-12-07 18:00:00 {os.path.getsize(path):>10} {name}")
elif args[:2] == ["s3", "sync"]:
    source, target = args[2], args[3]
    excluded = args[args.index("--exclude") + 1] if "--exclude" in args else None
    for root, _, files in os.walk(source):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), source)
            if excluded is None or not fnmatch.fnmatch(relative, excluded):
                os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
                shutil.copy2(os.path.join(root, name), os.path.join(target, relative))
else:
    sys.exit(f"fake aws: {args}")
'''


def fake_aws(folder: Path) -> dict:
    """An env whose PATH finds FAKE_AWS first."""
    folder.mkdir()
    (folder / "aws").write_text(FAKE_AWS)
    (folder / "aws").chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_remote_latest_picks_a_checkpoint_not_the_plugins_files_beside_it(tmp_path, monkeypatch):
    """OpenCLIP's remote pick took the last name `aws s3 ls` listed: epoch_1.pt.json."""
    from open_clip_hn.hooks import latest_remote_checkpoint
    from open_clip_hn.state import StateError

    monkeypatch.setenv("PATH", fake_aws(tmp_path / "bin")["PATH"])
    remote = tmp_path / "remote"
    assert latest_remote_checkpoint(str(remote)) is None  # a first start: nothing there yet
    remote.mkdir()
    (remote / "sub").mkdir()
    for name in ("epoch_1.pt", "epoch_1.pt.hn", "epoch_1.pt.json", "epoch_2.pt.hn", "epoch_9.pt",
                 "epoch_9_step_3.pt", ".tmp-x-epoch_10.pt", "tmp.pt"):
        (remote / name).write_bytes(b"x")
    assert latest_remote_checkpoint(str(remote)) == str(remote / "epoch_9_step_3.pt")
    (remote / "epoch_10.pt").write_bytes(b"x")
    assert latest_remote_checkpoint(str(remote)) == str(remote / "epoch_10.pt")
    (tmp_path / "bin" / "aws").write_text("#!/bin/sh\necho 'Unable to locate credentials' >&2\nexit 253\n")
    with pytest.raises(StateError, match=r"`aws s3 ls .*` failed \(exit 253: Unable to locate credentials\)"):
        latest_remote_checkpoint(str(remote))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(StateError, match=r"lists the remote folder with the AWS CLI .* not on PATH"):
        latest_remote_checkpoint(str(remote))


def test_a_resume_from_a_url_reads_the_plugin_state_beside_it(tmp_path):
    """`--resume file://.../epoch_1.pt` (or s3://, what the remote pick gives): the plugin state
    beside it is read through fsspec, as OpenCLIP reads the checkpoint (it was looked for on the
    local disk only, so the run went on without it, a warning aside)."""
    from open_clip_hn.state import STATE_VERSION, find_state, save_state, state_files_beside

    save_state(str(tmp_path), 1, {"version": STATE_VERSION, "epoch": 1, "loss": {"x": 1}})
    url = f"file://{tmp_path}/epoch_1.pt"
    assert state_files_beside(url, 1) == [f"{url}.hn"]
    path, state = find_state(url, 1)
    assert path == f"{url}.hn" and state["loss"] == {"x": 1}
    assert find_state(f"file://{tmp_path}/epoch_2.pt", 2) is None


@pytest.mark.slow
def test_a_stop_with_remote_sync_is_synced_and_resumed_from_the_remote_alone(tmp_path, scene_csv):
    """--remote-sync (S3) with a node's scratch disk lost: the stop's step checkpoint reaches the
    remote folder before the process ends (OpenCLIP synced at a normal end only), and
    `--resume latest` picks it there (OpenCLIP picked epoch_N.pt.json), with its plugin state,
    ending with the uninterrupted run's weights."""
    import shutil

    env = fake_aws(tmp_path / "bin")
    whole = train_argv(scene_csv, str(tmp_path), "whole", *HN_ONLINE_CHOICE, epochs=2)
    run_module("open_clip_hn.train", whole)
    remote = tmp_path / "remote"
    cut = train_argv(scene_csv, str(tmp_path / "scratch"), "cut", *HN_ONLINE_CHOICE, "--remote-sync",
                     str(remote), epochs=2)
    proc = start_training(cut, env=env)
    wait_for_steps(tmp_path / "scratch" / "cut" / "out.log", 6, proc)  # inside the second epoch
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == -signal.SIGTERM, output[-3000:]
    synced = {p.name for p in (remote / "cut" / "checkpoints").iterdir()}
    steps = [name for name in synced if re.fullmatch(r"epoch_1_step_\d+\.pt", name)]
    assert {"epoch_1.pt", "epoch_1.pt.hn", "epoch_1.pt.json"} <= synced and len(steps) == 1, synced
    shutil.rmtree(tmp_path / "scratch")  # the node's disk is gone: only the remote copy is left
    run_module("open_clip_hn.train", [*cut, "--resume", "latest"], env=env)
    log = (tmp_path / "scratch" / "cut" / "out.log").read_text()
    assert f"{remote / 'cut' / 'checkpoints' / steps[0]} is a step checkpoint" in log
    a = load_checkpoint(tmp_path, "whole", "epoch_2.pt")
    b = load_checkpoint(tmp_path / "scratch", "cut", "epoch_2.pt")
    assert same_weights(a["state_dict"], b["state_dict"])
