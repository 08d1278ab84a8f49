"""Faults end in a clear error before work, a counted warning, or correct training: never silent,
never a lost epoch (issue 18, the adapter's side)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, free_port, run_module, train_argv
from open_clip_hn.negatives.cli import main as negatives_main
from open_clip_hn.neighbors import build
from test_patch import apply_patch, copy_openclip_train

HN = ["--hn-negatives", "online", "--hn-num-negatives", "2", "--hn-loss", "itc"]

pytestmark = pytest.mark.slow


def train(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def logged(log_text: str, name: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{name}: ([-0-9.]+)", log_text)]


@pytest.fixture(scope="module")
def two_epochs(scene_csv, tmp_path_factory):
    logs = tmp_path_factory.mktemp("faults")
    run_module("open_clip_hn.train", train_argv(scene_csv, str(logs), "run", *HN, epochs=2))
    return logs


def test_truncated_newest_checkpoint_falls_back_to_the_previous_pair(two_epochs, scene_csv, tmp_path):
    """A kill while epoch_2.pt was written: --resume latest warns and resumes from epoch 1."""
    import shutil

    shutil.copytree(two_epochs / "run", tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "epoch_2.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    run_module("open_clip_hn.train", train_argv(scene_csv, str(tmp_path), "run", *HN,
                                                "--resume", "latest", epochs=3))
    log = (tmp_path / "run" / "out.log").read_text()
    assert f"skipping {newest}" in log
    assert re.search(r"=> resuming checkpoint '.*epoch_1\.pt' \(epoch 1\)", log)
    assert (tmp_path / "run" / "checkpoints" / "epoch_3.pt").exists()


def test_resume_latest_with_no_usable_checkpoint_stops_instead_of_starting_over(two_epochs, scene_csv,
                                                                                 tmp_path):
    """Every plugin state damaged: OpenCLIP, told there is no checkpoint, would train from scratch
    and write its epoch 1 over the run's; the run stops with exit 2 and the files stay as they were."""
    import shutil

    shutil.copytree(two_epochs / "run", tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    for state_file in checkpoints.glob("*.pt.hn"):
        state_file.write_bytes(state_file.read_bytes()[:500])
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    resumed = train(train_argv(scene_csv, str(tmp_path), "run", *HN, "--resume", "latest", epochs=3))
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert "no checkpoint in" in resumed.stderr and "add --hn-drop-state" in resumed.stderr
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before
    # the way on it names: the same command with --hn-drop-state continues from the newest
    # checkpoint (its weights load; its state is what is dropped), in the same experiment
    dropped = train(train_argv(scene_csv, str(tmp_path), "run", *HN, "--resume", "latest",
                               "--hn-drop-state", epochs=3))
    assert dropped.returncode == 0, dropped.stderr[-3000:]
    log = (tmp_path / "run" / "out.log").read_text()
    assert re.search(r"=> resuming checkpoint '.*epoch_2\.pt' \(epoch 2\)", log)
    assert (checkpoints / "epoch_3.pt").exists() and (checkpoints / "epoch_3.pt.hn").exists()


@pytest.fixture(scope="module")
def patched_site(tmp_path_factory):
    """A copy of the installed `open_clip_train` with patches/ applied (the patched route)."""
    site = copy_openclip_train(tmp_path_factory.mktemp("site"))
    proc = apply_patch(site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return site


PROMPT_S = 120  # well under a distributed timeout (minutes; OpenCLIP leaves torch's default)


def wait_promptly(procs: list[subprocess.Popen], deadline: float) -> list[str]:
    """Each process's output once all have ended; any still running at `deadline` (monotonic
    clock) is killed and the test fails, showing every output."""
    try:
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        raise AssertionError("ranks still running at the deadline:\n" + "\n".join(
            f"rank {r} ({proc.wait()}): {proc.stdout.read()[-2000:]}" for r, proc in enumerate(procs)))
    return [proc.stdout.read() for proc in procs]


@pytest.mark.parametrize("route", ["monkeypatch", "patch"])
def test_resume_latest_with_no_usable_checkpoint_stops_every_rank(route, scene_csv, tmp_path, request):
    """2 gloo ranks: OpenCLIP's master alone picks what --resume latest resumes, and its refusal
    left rank 1 in the broadcast of the pick: here gloo saw the connection close (exit 1, a gloo
    error and no word of the cause); across nodes, or with NCCL, it waited for the launcher or the
    distributed timeout. Every rank checks for itself now: both stop at once, exit 2, with the message."""
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "epoch_1.pt").write_bytes(b"cut short by a kill")
    argv = train_argv(scene_csv, str(tmp_path), "run", *HN, "--dist-backend", "gloo", "--resume",
                      "latest", epochs=2, batch_size=4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.pop("OPEN_CLIP_TRAIN_PLUGINS", None)
    if route == "patch":  # open_clip_hn.train finds the hook points and enables itself through them
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(request.getfixturevalue("patched_site")),
                                                          env.get("PYTHONPATH")]))
    started = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "-m", "open_clip_hn.train", *argv], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outputs = wait_promptly(ranks, started + PROMPT_S)
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 2, output[-3000:]
        assert f"error: --resume latest: no checkpoint in {checkpoints} can be resumed" in output
    assert os.listdir(checkpoints) == ["epoch_1.pt"]


def test_damaged_state_and_a_resume_without_flags_are_refused(two_epochs, scene_csv, tmp_path):
    import shutil

    shutil.copytree(two_epochs / "run", tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_2.pt"
    state_file = tmp_path / "run" / "checkpoints" / "epoch_2.pt.hn"

    plain = train(train_argv(scene_csv, str(tmp_path), "plain", "--resume", str(checkpoint), epochs=3))
    assert plain.returncode == 2, plain.stderr[-2000:]
    assert f"plugin state in {state_file}" in plain.stderr and "--hn-drop-state" in plain.stderr

    state = torch.load(state_file, weights_only=False)
    state["loss"]["thresholds"] = {k: (v * float("nan") if isinstance(v, torch.Tensor) and
                                       v.is_floating_point() else v)
                                   for k, v in state["loss"]["thresholds"].items()}
    torch.save(state, state_file)
    nan = train(train_argv(scene_csv, str(tmp_path), "nan", *HN, "--resume", str(checkpoint),
                           epochs=3))
    assert nan.returncode == 2 and f"error: plugin state {state_file}" in nan.stderr, nan.stderr[-2000:]
    assert "non-finite" in nan.stderr
    assert not (tmp_path / "nan" / "checkpoints" / "epoch_3.pt").exists()

    dropped = train(train_argv(scene_csv, str(tmp_path), "dropped", "--hn-drop-state", "--resume",
                               str(checkpoint), epochs=3))
    assert dropped.returncode == 0, dropped.stderr[-3000:]
    assert "--hn-drop-state: resuming" in (tmp_path / "dropped" / "out.log").read_text()


def test_a_missing_or_foreign_state_is_refused_or_walked_back_never_trained_past(two_epochs, scene_csv,
                                                                                 tmp_path):
    """epoch_2.pt's .hn deleted (a checkpoint copied without it), replaced by epoch 1's, or
    saved beside other weights (another run's): its record says the run had a state, so
    resuming on without it (the run used to, with one warning) is refused for --resume PATH,
    and --resume latest walks back to epoch 1's pair."""
    import shutil

    cases = {"deleted": lambda hn: hn.unlink(),
             "another epoch's": lambda hn: shutil.copy(hn.with_name("epoch_1.pt.hn"), hn),
             "other weights": lambda hn: torch.save({**torch.load(hn, weights_only=False),
                                                     "weights_digest": "0" * 32}, hn)}
    for case, damage in cases.items():
        run = tmp_path / case.replace(" ", "_").replace("'", "")
        shutil.copytree(two_epochs / "run", run / "run")
        checkpoints = run / "run" / "checkpoints"
        damage(checkpoints / "epoch_2.pt.hn")
        explicit = train(train_argv(scene_csv, str(run), "other", *HN, "--resume",
                                    str(checkpoints / "epoch_2.pt"), epochs=3))
        assert explicit.returncode == 2, (case, explicit.stderr[-3000:])
        want = "saved beside other weights" if case == "other weights" else "is missing"
        assert want in explicit.stderr and "--hn-drop-state" in explicit.stderr, (case, explicit.stderr[-3000:])
        latest = train(train_argv(scene_csv, str(run), "run", *HN, "--resume", "latest", epochs=3))
        assert latest.returncode == 0, (case, latest.stderr[-3000:])
        log = (run / "run" / "out.log").read_text()
        assert f"skipping {checkpoints / 'epoch_2.pt'}" in log and want in log, case
        assert re.search(r"=> resuming checkpoint '.*epoch_1\.pt' \(epoch 1\)", log), case


def test_a_full_disk_is_an_error_naming_the_file_not_a_traceback(scene_csv, tmp_path):
    """A file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes every write past 20 MB fail, as
    a full disk does: periodic step saves warn and training goes on, the epoch's checkpoint ends
    the run with exit 2 and `error: could not write ...` in out.log too; no temp is left."""
    import resource
    import signal

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))

    argv = train_argv(scene_csv, str(tmp_path), "full", *HN, "--hn-save-every-steps", "2")
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True,
                          text=True, timeout=300, cwd=REPO, preexec_fn=limited)
    checkpoints = tmp_path / "full" / "checkpoints"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: could not write {checkpoints / 'epoch_1.pt'}" in proc.stderr, proc.stderr[-3000:]
    assert "no checkpoint was written before" in proc.stderr
    assert "(OSError: [Errno 27] File too large;" in proc.stderr  # the cause, not torch's "unexpected pos"
    log = (tmp_path / "full" / "out.log").read_text()
    assert "Step checkpoint not saved; training goes on: could not write" in log
    assert f"error: could not write {checkpoints / 'epoch_1.pt'}" in log
    assert not [p.name for p in checkpoints.iterdir() if p.suffix == ".pt" or p.name.startswith(".tmp")]


def test_a_failed_state_write_on_rank_0_stops_every_rank(scene_csv, tmp_path):
    """Rank 0 alone writes the plugin state; when that write fails (a 4 MB file size limit on
    rank 0 against the frozen teacher's ~14 MB state), rank 1 used to train on into the next
    epoch and fail at its first collective for a rank that had gone (gloo: a "Connection closed
    by peer" traceback; NCCL waits for its timeout). Both stop at the epoch's end, exit 2, each
    with its error; no checkpoint of the epoch is written."""
    import resource
    import signal

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    argv = train_argv(scene_csv, str(tmp_path), "full", *HN, "--hn-distill", "frozen",
                      "--dist-backend", "gloo", batch_size=4, epochs=2)
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": "2", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-m", "open_clip_hn.train", *argv], cwd=REPO,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              preexec_fn=limited if r == 0 else None,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in ranks]
    checkpoints = tmp_path / "full" / "checkpoints"
    assert [p.returncode for p in ranks] == [2, 2], errors[0][-3000:] + errors[1][-3000:]
    assert f"error: could not write {checkpoints / 'epoch_1.pt.hn'}" in errors[0], errors[0][-3000:]
    assert "error: rank 0 could not write the plugin state of epoch 1" in errors[1], errors[1][-3000:]
    assert not [p.name for p in checkpoints.iterdir() if p.name.endswith((".pt", ".hn"))]


def test_a_diverged_run_stops_before_writing_a_checkpoint_of_nan_weights(two_epochs, scene_csv, tmp_path):
    """lr 1e8 turns the weights into NaN at the first step. The run used to save NaN checkpoints
    (over the last good one with --save-most-recent) and exit 0; it stops with exit 2 at the
    first save, epoch or step, naming the newest good checkpoint."""
    import shutil

    shutil.copytree(two_epochs / "run", tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    before = sorted(p.name for p in checkpoints.iterdir())
    for extra in ([], ["--hn-save-every-steps", "1"]):
        argv = train_argv(scene_csv, str(tmp_path), "run", *HN, "--resume", "latest", *extra, epochs=3)
        argv[argv.index("--lr") + 1] = "1e8"
        diverged = train(argv)
        assert diverged.returncode == 2, diverged.stderr[-3000:]
        when = r"epoch 3, step \d+" if extra else "epoch 3"  # at a step save, else at the epoch's end
        message = re.search(rf"error: the run diverged: after {when}, \d+ weight tensor\(s\) hold NaN",
                            diverged.stderr)
        assert message, diverged.stderr[-3000:]
        assert message.group(0) in (tmp_path / "run" / "out.log").read_text()
        assert not (checkpoints / "epoch_3.pt").exists()
        newest = re.search(r"the newest checkpoint is (\S+), from before", diverged.stderr).group(1)
        for path in checkpoints.glob("*.pt"):  # what a resume may pick holds no NaN
            weights = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
            assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()), path
        if not extra:
            assert sorted(p.name for p in checkpoints.iterdir()) == before
            assert newest == str(checkpoints / "epoch_2.pt")
        else:  # the steps before the weights turned were saved
            assert newest == str(sorted(checkpoints.glob("epoch_2_step_*.pt"))[-1])


def test_a_broken_evaluation_set_fails_before_the_first_step(scene_csv, tmp_path):
    missing = train(train_argv(scene_csv, str(tmp_path), "missing", *HN,
                               "--hn-eval-compositional", str(tmp_path / "nowhere")))
    assert missing.returncode == 2 and "--hn-eval-compositional" in missing.stderr
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "swap_att.json").write_text('{"0": {"filename": "a.png"}}')  # no captions
    broken = train(train_argv(scene_csv, str(tmp_path), "broken", *HN,
                              "--hn-eval-compositional", str(sets)))
    assert broken.returncode != 0
    assert "swap_att.json" in broken.stderr + broken.stdout
    assert "Train Epoch" not in (tmp_path / "broken" / "out.log").read_text()


def test_precomputed_negatives_reach_the_image_neighbours_too(scene_shards, tiny_model_config, tmp_path):
    """Neighbour samples are read past the stage that folds neg.json: they get their negatives
    as well (half of every batch had none)."""
    out = tmp_path / "pre"
    assert negatives_main(["precompute", "--shards", scene_shards, "--output-dir", str(out),
                           "--num", "2", "--types", "replace_relation,swap_attributes"]) == 0
    shards = "::".join(str(out / path.rsplit("/", 1)[1]) for path in scene_shards.split("::"))
    index = str(tmp_path / "index")
    build(shards, "hn-tiny-vit", index, model_config=tiny_model_config, k=4)
    argv = train_argv(shards, str(tmp_path), "nb", "--hn-negatives", "precomputed",
                      "--hn-num-negatives", "2", "--hn-loss", "itc", "--hn-image-neighbors", index,
                      "--hn-types", "replace_relation,swap_attributes", num_samples=64)
    run_module("open_clip_hn.train", argv)
    log = (tmp_path / "nb" / "out.log").read_text()
    assert "Hard image negatives: each sample is followed by" in log
    masked = logged(log, "Hn_masked")
    # a few captions have fewer than 2 negatives of these types; a neighbour without its negatives
    # would mask half of every batch (0.5 at every step before the fix)
    assert masked and max(masked) <= 0.125 and sum(masked) / len(masked) < 0.1, masked
