"""slurm/: the submitit launcher's pieces, its refusals, and whole runs on a real two-node SLURM.

The cluster tests need SLURM's binaries (`.ci/run` installs them); they use the cluster that
`slurm/cluster.sh start` left running, or start one for this module and stop it afterwards.
Every wait is bounded; timing goes to the jobs' logs, never to an assert.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.py"
CLUSTER = REPO / "slurm" / "cluster.sh"
SBATCH = REPO / "slurm" / "train.sbatch"
MODEL_CONFIG = REPO / "open_clip_hn" / "model_configs" / "hn-tiny-vit.json"
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "sacct", "munged")
JOB_LIMIT_S = 420


def load_submit():
    spec = importlib.util.spec_from_file_location("slurm_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


submit = load_submit()


def run_submit(*argv: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------- pure pieces


def test_the_launcher_uses_the_checkout_only_from_a_checkout(tmp_path):
    """From the repository, submit.py (and its job) import the checkout's open_clip_hn; installed
    as `open_clip_hn.slurm.submit` (no package beside its folder) it adds nothing to the path,
    so the job imports the installed package."""
    import argparse

    import open_clip_hn.slurm.submit as installed

    assert submit.CHECKOUT == REPO and submit.PROG == "python slurm/submit.py"
    assert installed.PROG == "python -m open_clip_hn.slurm.submit"
    (tmp_path / "slurm").mkdir()
    shutil.copy(SUBMIT, tmp_path / "slurm" / "submit.py")
    spec = importlib.util.spec_from_file_location("bare_submit", tmp_path / "slurm" / "submit.py")
    bare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bare)
    assert bare.CHECKOUT is None
    args = argparse.Namespace(cpus_per_task=1, time="10", local=True, gpus_per_node=0, signal_delay=60)
    setups = [module.make_executor(args, tmp_path / name, 1).parameters["setup"]
              for module, name in ((submit, "a"), (bare, "b"))]
    assert f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}" in setups[0]
    assert not any("PYTHONPATH" in line for line in setups[1])


@pytest.mark.parametrize("text, minutes", [
    ("30", 30), ("90:30", 91), ("72:00:00", 4320), ("1-00", 1440), ("1-02:30", 1590),
    ("2-00:00:01", 2881), ("0:01:00", 1),
])
def test_parse_time_reads_slurm_formats(text, minutes):
    assert submit.parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "0", "00:00:00", "-5", "1:2:3:4"])
def test_parse_time_refuses_bad_limits(text):
    with pytest.raises(submit.SubmitError, match="--time"):
        submit.parse_time(text)


@pytest.mark.parametrize("minutes", ["nan", "inf", "0", "-1"])
def test_dist_timeout_must_be_a_finite_positive_number(minutes):
    """Checked at submission: the job itself would only fail once queued (timedelta(nan))."""
    import argparse

    args = argparse.Namespace(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1,
                              signal_delay=None, max_timeouts=None, local=False,
                              dist_timeout=float(minutes))
    with pytest.raises(submit.SubmitError, match=f"--dist-timeout {float(minutes)}: must be a positive, finite"):
        submit.check_counts(args)


def test_flags_are_read_and_replaced_in_both_spellings():
    argv = ["--resume", "a.pt", "--epochs", "3", "--resume=b.pt"]
    assert submit.flag_value(argv, "--resume") == "b.pt"
    assert submit.flag_value(argv, "--name") is None
    assert submit.with_flag(argv, "--resume", "latest") == ["--epochs", "3", "--resume", "latest"]


def test_experiment_lives_in_the_job_dir_and_always_resumes_its_own_latest(tmp_path):
    argv = submit.experiment_argv(["--epochs", "2"], tmp_path)
    assert submit.flag_value(argv, "--logs") == str(tmp_path)
    assert submit.flag_value(argv, "--name") == submit.EXPERIMENT_NAME
    assert submit.flag_value(argv, "--resume") == "latest"
    given = submit.experiment_argv(["--logs", "L", "--name", "N", "--resume", "x.pt"], tmp_path)
    assert given == ["--logs", "L", "--name", "N", "--resume", "x.pt"]


def test_distributed_env_puts_the_rendezvous_on_the_first_node():
    env = submit.distributed_env(["n1", "n2"], "4242", global_rank=3, local_rank=1, num_tasks=4)
    assert env["MASTER_ADDR"] == "n1"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("3", "1", "4")
    again = submit.distributed_env(["n1", "n2"], "4242", global_rank=0, local_rank=0, num_tasks=4)
    assert again["MASTER_PORT"] == env["MASTER_PORT"]  # all tasks and every restart agree
    other = submit.distributed_env(["n1", "n2"], "4243", global_rank=0, local_rank=0, num_tasks=4)
    assert other["MASTER_PORT"] != env["MASTER_PORT"]
    assert submit.distributed_env(["vm"], "7", 0, 0, 1)["MASTER_ADDR"] == "127.0.0.1"


def test_deferred_signal_is_delivered_once_after_the_body():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda num, frame: calls.append(num))
    try:
        with submit.deferred_signal(signal.SIGUSR2):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            assert calls == []
        time.sleep(0.01)
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_broken_latest_checkpoint_is_set_aside(tmp_path):
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(3)}}, tmp_path / "epoch_1.pt")
    torch.save({"epoch": 2, "state_dict": {"w": torch.ones(4096)}}, tmp_path / "epoch_2.pt")
    data = (tmp_path / "epoch_2.pt").read_bytes()
    (tmp_path / "epoch_2.pt").write_bytes(data[: len(data) // 2])  # killed mid-save
    moved = submit.set_aside_broken_checkpoints(tmp_path)
    assert moved == [tmp_path / "epoch_2.pt.broken"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt", "epoch_2.pt.broken"]
    assert submit.set_aside_broken_checkpoints(tmp_path) == []


def test_requeued_job_switches_to_latest_once_a_checkpoint_exists(tmp_path):
    argv = ["--logs", str(tmp_path), "--name", "x", "--resume", "pretrained.pt"]
    job = submit.TrainJob(argv, dist_timeout_min=5)
    assert submit.flag_value(job.checkpoint().function.train_argv, "--resume") == "pretrained.pt"
    (tmp_path / "x" / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 1}, tmp_path / "x" / "checkpoints" / "epoch_1.pt")
    requeued = job.checkpoint().function
    assert submit.flag_value(requeued.train_argv, "--resume") == "latest"
    assert requeued.dist_timeout_min == 5


def test_a_cluster_without_default_partition_needs_one(monkeypatch):
    monkeypatch.setattr(submit.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(submit, "partitions", lambda: (["gpu", "cpu"], None))
    with pytest.raises(submit.SubmitError, match="no default partition: pass --partition"):
        submit.check_partition(None)
    with pytest.raises(submit.SubmitError, match="--partition big: no such partition"):
        submit.check_partition("big")
    submit.check_partition("gpu")


SINFO = """2 1 8000 (null)
1 64+ 512000 gpu:a100:8(S:0-1),mps:400
3 32 256000 gpu:4
"""


def test_sinfo_node_groups_are_parsed():
    assert submit.parse_sinfo_nodes(SINFO) == [
        submit.NodeShape(2, 1, 8000, 0), submit.NodeShape(1, 64, 512000, 8),
        submit.NodeShape(3, 32, 256000, 4)]
    assert submit.gres_gpus("gpu:2,gpu:tesla:1") == 3 and submit.gres_gpus("(null)") == 0
    assert [submit.parse_mem_mb(m) for m in ("8000", "400G", "512M", "1T", "2048K")] == [
        8000, 409600, 512, 1048576, 2]
    with pytest.raises(submit.SubmitError, match="--mem 'lots'"):
        submit.parse_mem_mb("lots")


@pytest.mark.parametrize("request_, message", [
    ((1, 1, 1, 0, None), None),
    ((1, 8, 8, 8, 400_000), None),  # the one big node
    ((5, 4, 8, 4, None), "--nodes 5, but partition p has only 4 node(s) with 32 CPUs, 4 GPU(s) each; pass fewer --nodes"),
    ((1, 1, 10, 0, None), None),  # 10 CPUs fit the GPU nodes
    ((1, 8, 10, 8, None), "needs 80 CPUs per node, but the nodes of partition p have at most 64; "
                          "pass --cpus-per-task 8"),
    ((1, 16, 1, 16, None), "--gpus-per-node 16, but the nodes of partition p have at most 8 GPU(s)"),
    ((1, 1, 1, 0, 600_000), "--mem 600000M, but the nodes of partition p have at most 512000M"),
])
def test_requests_the_partition_cannot_satisfy_name_the_limit(request_, message):
    nodes, tasks, cpus, gpus, mem = request_
    problem = submit.unsatisfiable(submit.parse_sinfo_nodes(SINFO), "p", nodes, tasks, cpus, gpus, mem)
    assert problem is None if message is None else message in problem


def test_default_cpus_never_fitting_a_one_cpu_partition_is_refused(monkeypatch, tmp_path, capsys):
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("sbatch", "srun"):
        (fake / tool).write_text("#!/bin/sh\nexit 1\n")
    (fake / "sinfo").write_text("#!/bin/sh\n"
                                "case \"$*\" in *%P*) echo 'tiny*' ;; *) echo '2 1 8000 (null)' ;; esac\n")
    for tool in ("sbatch", "srun", "sinfo"):
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(submit, "check_train_flags", lambda argv: None)
    code = submit.main(["--gpus-per-node", "0", "--job-dir", str(tmp_path / "job"), "--",
                        "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert ("--cpus-per-task 10 x 1 task(s) per node needs 10 CPUs per node, but the nodes of "
            "partition tiny have at most 1; pass --cpus-per-task 1") in err
    assert "nothing was submitted" in err
    # no sinfo: not checked, with a warning
    monkeypatch.setattr(submit.shutil, "which", lambda name: None if name == "sinfo" else name)
    monkeypatch.setattr(submit, "partitions", lambda: (["tiny"], "tiny"))
    monkeypatch.setattr(submit, "make_executor", lambda *a: (_ for _ in ()).throw(RuntimeError("submit")))
    with pytest.raises(RuntimeError, match="submit"):
        submit.main(["--gpus-per-node", "0", "--job-dir", str(tmp_path / "job2"), "--", "--epochs", "1"])
    assert "no sinfo on this machine; the job's size is not checked" in capsys.readouterr().err


@pytest.fixture
def passing_cluster(monkeypatch):
    """A cluster that accepts a one-node CPU job: each test breaks one thing."""
    monkeypatch.setattr(submit, "check_train_flags", lambda argv: None)
    monkeypatch.setattr(submit.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(submit, "partitions", lambda: (["cpu"], "cpu"))
    monkeypatch.setattr(submit, "partition_nodes", lambda name: [submit.NodeShape(1, 64, 8000, 0)])


@pytest.mark.parametrize("refusal, message", [
    ("experiment", "already exists: pass --resume latest"),
    ("srun", "no srun on this machine: run on a SLURM login node, or pass --local"),
    ("partition", "--partition big: no such partition"),
    ("resources", "needs 100 CPUs per node, but the nodes of partition cpu have at most 64"),
])
def test_a_refused_submission_leaves_no_job_folder(passing_cluster, monkeypatch, tmp_path, capsys,
                                                   refusal, message):
    """Every check runs before the job folder is made, so a refusal leaves nothing to clean up."""
    launch, flags = ["--gpus-per-node", "0", "--cpus-per-task", "1"], ["--epochs", "1"]
    if refusal == "experiment":
        (tmp_path / "logs" / "x").mkdir(parents=True)
        (tmp_path / "logs" / "x" / "out.log").write_text("")
        flags += ["--logs", str(tmp_path / "logs"), "--name", "x", "--resume", "pretrained.pt"]
    elif refusal == "srun":
        monkeypatch.setattr(submit.shutil, "which", lambda name: None if name == "srun" else name)
    elif refusal == "partition":
        launch += ["--partition", "big"]
    else:
        launch += ["--cpus-per-task", "100"]
    job_dir = tmp_path / "jobs" / "job"
    assert submit.main([*launch, "--job-dir", str(job_dir), "--", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "jobs").exists()


def test_the_job_folder_is_made_after_the_checks_and_before_the_executor(passing_cluster,
                                                                          monkeypatch, tmp_path):
    job_dir = tmp_path / "jobs" / "job"
    submit.check_job_dir(job_dir)
    assert not (tmp_path / "jobs").exists()  # checked without being made

    def make_executor(args, folder, tasks_per_node):
        assert folder == job_dir and folder.is_dir()
        raise RuntimeError("submit")

    monkeypatch.setattr(submit, "make_executor", make_executor)
    with pytest.raises(RuntimeError, match="submit"):
        submit.main(["--gpus-per-node", "0", "--cpus-per-task", "1", "--job-dir", str(job_dir),
                     "--", "--epochs", "1"])


# ---------------------------------------------------------------------------- the command line


def test_help_lists_the_flags():
    out = run_submit("--help").stdout
    for flag in ("--nodes", "--gpus-per-node", "--partition", "--time", "--account", "--qos",
                 "--constraint", "--mem", "--cpus-per-task", "--job-dir", "--local"):
        assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "--nodes 0: must be at least 1"),
    (["--gpus-per-node", "-1"], "--gpus-per-node -1: must be at least 0"),
    (["--time", "soon"], "--time 'soon': not a SLURM time"),
    (["--local", "--nodes", "2"], "--local runs on this machine only: use --nodes 1"),
    # CI and this machine have no GPU: the default 8 would start 8 CPU ranks
    (["--local"], "--local --gpus-per-node 8, but this machine has 0 GPU(s); pass --gpus-per-node 0"),
])
def test_bad_launcher_flags_are_refused_before_submission(tmp_path, argv, message):
    proc = run_submit(*argv, "--job-dir", str(tmp_path / "job"), "--", "--epochs", "1")
    assert proc.returncode == 2
    assert message in proc.stderr


def test_unwritable_job_dir_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_submit("--job-dir", str(blocker / "job"), "--", "--epochs", "1")
    assert proc.returncode == 2
    assert f"--job-dir {blocker / 'job'}: not writable" in proc.stderr


def test_unknown_training_flags_are_refused(tmp_path):
    proc = run_submit("--job-dir", str(tmp_path / "job"), "--", "--epochs", "1", "--no-such-flag")
    assert proc.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in proc.stderr
    assert "nothing was submitted" in proc.stderr
    assert not (tmp_path / "job").exists()  # the job folder is made only after every check


def test_training_flags_resuming_no_usable_checkpoint_are_refused(tmp_path, capsys):
    """The trainer checks --resume latest at parse time: resubmitting an experiment none of whose
    checkpoints can be resumed is the launcher's usage error, before anything is queued."""
    checkpoints = tmp_path / "logs" / "x" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "epoch_1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(submit.SubmitError, match="the training flags after '--' were refused"):
        submit.check_train_flags(["--logs", str(tmp_path / "logs"), "--name", "x",
                                  "--resume", "latest", "--epochs", "1"])
    assert "error: --resume latest: no checkpoint in" in capsys.readouterr().err


def test_abbreviated_training_flags_are_read_as_the_trainer_reads_them(tmp_path):
    """`--nam run1` is the trainer's --name: the job must not append a --name of its own (nor a
    --resume latest over `--res ckpt.pt`)."""
    argv = submit.experiment_argv(submit.spelled_out(["--nam", "run1", "--res", "c.pt", "--epochs", "1"]),
                                  tmp_path)
    assert argv == ["--name", "run1", "--resume", "c.pt", "--epochs", "1", "--logs", str(tmp_path)]


def test_missing_training_flags_are_refused(tmp_path):
    proc = run_submit("--job-dir", str(tmp_path / "job"))
    assert proc.returncode == 2
    assert "no training flags" in proc.stderr


# ---------------------------------------------------------------------------- a real SLURM


def slurm_env() -> dict:
    state = Path(os.environ.get("OPEN_CLIP_HN_SLURM_DIR", "/tmp/open_clip_hn_slurm"))
    return {**os.environ, "SLURM_CONF": str(state / "etc" / "slurm.conf")}


def cluster_answers(env: dict) -> bool:
    if not Path(env["SLURM_CONF"]).exists():
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=env, timeout=30)
    return ping.returncode == 0 and "UP" in ping.stdout


@pytest.fixture(scope="module")
def cluster():
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM binaries absent ({', '.join(missing)}): apt-get install slurm-wlm "
                    "slurmdbd munge mariadb-server, or run .ci/run")
    env = slurm_env()
    started = not cluster_answers(env)
    if started:
        subprocess.run(["bash", str(CLUSTER), "start"], check=True, timeout=300)
    yield env
    if started:
        subprocess.run(["bash", str(CLUSTER), "stop"], check=True, timeout=120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from open_clip_hn.scenes import shards_spec, write_scene_shards

    out = tmp_path_factory.mktemp("slurm_shards")
    return shards_spec(write_scene_shards(str(out), num_samples=128, samples_per_shard=64, seed=0))


BATCH, WORLD = 8, 2


def train_flags(shards: str, epochs: int, samples: int, *extra: str) -> list[str]:
    return ["--train-data", shards, "--dataset-type", "webdataset",
            "--train-num-samples", str(samples), "--batch-size", str(BATCH), "--epochs", str(epochs),
            "--workers", "1", "--precision", "fp32", "--model", "hn-tiny-vit",
            "--model-config", str(MODEL_CONFIG), "--lr", "1e-3", "--warmup", "1", "--seed", "0",
            "--report-to", "none", "--log-every-n-steps", "1",
            "--hn-negatives", "online", "--hn-num-negatives", "2", "--hn-loss", "itc", *extra]


LAUNCH = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10",
          "--max-timeouts", "5", "--signal-delay", "170"]


def submit_job(env: dict, job_dir: Path, flags: list[str], *launch: str) -> str:
    proc = run_submit(*LAUNCH, *launch, "--job-dir", str(job_dir), "--", *flags, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Job folder: {job_dir}" in proc.stdout and "tail -f" in proc.stdout
    return re.search(r"Submitted job (\d+)", proc.stdout).group(1)


def sbatch_job(env: dict, job_dir: Path, flags: list[str]) -> str:
    job_dir.mkdir(parents=True)
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
           "--cpus-per-task=1", "--time=10", f"--output={job_dir}/sbatch.out",
           str(SBATCH), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**env, "JOB_DIR": str(job_dir)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_state(env: dict, job_id: str) -> str:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"],
                         capture_output=True, text=True, env=env, timeout=30).stdout.split()
    return out[0] if out else "UNKNOWN"


def wait_until(what: str, predicate, limit_s: float = JOB_LIMIT_S, job: tuple | None = None):
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if job is not None and job_state(*job) in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                   "OUT_OF_MEMORY", "COMPLETED"):
            raise AssertionError(f"job {job[1]} ended {job_state(*job)} while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"gave up after {limit_s}s waiting for {what}")


def wait_finished(env: dict, job_id: str, job_dir: Path) -> str:
    state = wait_until(f"job {job_id} to end",
                       lambda: (s := job_state(env, job_id)) in ("COMPLETED", "FAILED", "CANCELLED",
                                                                 "TIMEOUT", "NODE_FAIL") and s)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted(job_dir.glob("*.out")))
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{logs}"
    return state


def elapsed_s(env: dict, job_id: str) -> int:
    """Seconds the job has run since its latest start (squeue's [D-]H:MM:SS or M:SS)."""
    text = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%M"], capture_output=True,
                          text=True, env=env, timeout=30, check=True).stdout.strip()
    days, _, clock = text.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86400


def optimizer_steps(checkpoint: Path) -> int:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["optimizer"]["state"]
    return int(next(iter(state.values()))["step"])


@pytest.fixture(scope="module")
def jobs(cluster, shards, tmp_path_factory):
    """Submit the three runs at once (they share the nodes); each test waits for its own."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    env = cluster
    interrupted = root / "interrupted"
    plain_flags = train_flags(shards, 2, 128)
    long_flags = train_flags(shards, 48, 128, "--delete-previous-checkpoint")
    return {
        "env": env,
        "interrupted": (submit_job(env, interrupted, long_flags), interrupted, 48, 128),
        "plain": (submit_job(env, root / "plain", plain_flags), root / "plain", 2, 128),
        "sbatch": (sbatch_job(env, root / "sbatch", plain_flags), root / "sbatch", 2, 128),
    }


def newest_checkpoint(checkpoints: Path) -> int:
    epochs = [int(m.group(1)) for p in checkpoints.glob("epoch_*.pt.hn")
              if (m := re.fullmatch(r"epoch_(\d+)\.pt\.hn", p.name))
              and (checkpoints / p.name[:-3]).exists()]
    return max(epochs, default=0)


@pytest.mark.slow
def test_preemption_and_time_limit_requeue_and_resume_with_plugin_state(jobs):
    """SIGUSR2 from a real time limit and then as a preemption (scancel), each mid-run.

    The time limit is lowered with `scontrol update` once a checkpoint exists, so SLURM's own
    limit check sends `--signal=USR2@delay` at a point where there is something to resume from.
    """
    env = jobs["env"]
    job_id, job_dir, epochs, samples = jobs["interrupted"]
    job = (env, job_id)
    checkpoints = job_dir / "train" / "checkpoints"

    log = job_dir / "train" / "out.log"
    first = wait_until("a first checkpoint", lambda: newest_checkpoint(checkpoints), job=job)
    assert first < epochs, "the run ended before its time limit could hit; make it longer"
    # A limit 1-2 minutes ahead: within --signal-delay, so SLURM signals at its next limit check
    # (every 30 s), then the limit goes back up for the restarted run.
    limit = -(-elapsed_s(env, job_id) // 60) + 2
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit}"], check=True,
                   env=env, timeout=30)
    wait_until("the requeue at the time limit",
               lambda: job_state(env, job_id) in ("REQUEUED", "PENDING"), job=job)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True, env=env,
                   timeout=30)
    wait_until("the resume after the time limit",
               lambda: log.read_text().count("=> resuming checkpoint") >= 1, job=job)

    resumed = newest_checkpoint(checkpoints)
    wait_until("a checkpoint after the resume",
               lambda: newest_checkpoint(checkpoints) > resumed, job=job)
    assert newest_checkpoint(checkpoints) < epochs, "the run ended before it could be preempted"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, env=env, timeout=30)
    wait_until("the resume after preemption",
               lambda: log.read_text().count("=> resuming checkpoint") >= 2, job=job)
    wait_finished(env, job_id, job_dir)

    text = log.read_text()
    # each signal saved a step checkpoint (the step in flight finished) and the job resumed there
    resumed_from = re.findall(r"=> resuming checkpoint '.*/(epoch_\d+_step_\d+\.pt)' \(epoch (\d+)\)",
                              text)
    assert len(resumed_from) == 2, text[-3000:]
    assert int(resumed_from[0][1]) >= first and int(resumed_from[1][1]) >= resumed
    assert text.count("is a step checkpoint") == 2 and text.count("Resuming epoch") == 2
    submitit_log = (job_dir / f"{job_id}_0_log.err").read_text()
    assert submitit_log.count("Calling checkpoint method") >= 2  # rank 0 handled both signals
    assert optimizer_steps(checkpoints / f"epoch_{epochs}.pt") == epochs * samples // (BATCH * WORLD)


@pytest.mark.slow
def test_two_node_run_trains_on_both_ranks_and_loads_in_open_clip(jobs):
    import open_clip

    env = jobs["env"]
    job_id, job_dir, epochs, samples = jobs["plain"]
    wait_finished(env, job_id, job_dir)
    text = (job_dir / "train" / "out.log").read_text()
    assert "total 2." in text and "world_size: 2" in text
    for rank in (0, 1):
        task_log = (job_dir / f"{job_id}_{rank}_log.out").read_text()
        assert f"global_rank={rank}(2)" in task_log and "Job completed successfully" in task_log
    final = job_dir / "train" / "checkpoints" / f"epoch_{epochs}.pt"
    assert (final.parent / f"epoch_{epochs}.pt.hn").exists()
    assert optimizer_steps(final) == epochs * samples // (BATCH * WORLD)

    open_clip.add_model_config(str(MODEL_CONFIG))
    model, _, _ = open_clip.create_model_and_transforms("hn-tiny-vit", pretrained=str(final))
    saved = torch.load(final, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["logit_scale"], saved["module.logit_scale"])


@pytest.mark.slow
def test_sbatch_template_runs_the_same_job(jobs):
    env = jobs["env"]
    job_id, job_dir, epochs, samples = jobs["sbatch"]
    wait_finished(env, job_id, job_dir)
    text = (job_dir / "train" / "out.log").read_text()
    assert "total 2." in text
    checkpoints = job_dir / "train" / "checkpoints"
    assert (checkpoints / f"epoch_{epochs}.pt.hn").exists()  # the state of epoch_latest.pt's epoch
    assert optimizer_steps(checkpoints / f"epoch_{epochs}.pt") == epochs * samples // (BATCH * WORLD)
    plain_dir = jobs["plain"][1]
    assert optimizer_steps(checkpoints / "epoch_latest.pt") == optimizer_steps(
        plain_dir / "train" / "checkpoints" / f"epoch_{epochs}.pt")
