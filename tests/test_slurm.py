"""slurm/: the submitit launcher's pieces, its refusals, and whole runs on a real two-node SLURM.

The cluster tests need SLURM's binaries (`.ci/run` installs them); they use the cluster that
`slurm/cluster.sh start` left running, or start one for this module and stop it afterwards.
Every wait is bounded; timing goes to the jobs' logs, never to an assert.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
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


@pytest.mark.parametrize("time, delay, message", [
    ("1", 120, "--signal-delay 120 is not well below --time 1 (60 s): SLURM would send SIGUSR2 as "
               "soon as the job starts and it would requeue itself over and over; pass "
               "--signal-delay 30 (at most half the time limit), or a --time of at least 4 minutes"),
    ("3", 120, "pass --signal-delay 90"),
    ("0:10:00", 301, "--signal-delay 301 is not well below --time 0:10:00 (600 s)"),
    ("4", 120, None), ("10", 170, None), ("72:00:00", 120, None),
])
def test_a_signal_delay_not_well_below_the_time_limit_is_refused(time, delay, message):
    """USR2 `--signal-delay` seconds before the limit: near the limit, every start is signalled
    at once and the job requeues itself again and again without training."""
    if message is None:
        submit.check_signal_delay(delay, time)
    else:
        with pytest.raises(submit.SubmitError, match=re.escape(message)):
            submit.check_signal_delay(delay, time)


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


def test_every_start_resumes_its_own_latest_once_the_experiment_has_a_checkpoint(tmp_path):
    """Each start decides (`start_argv`), not only submitit's requeue: SLURM restarts a job from
    its original submission too (node failure, `scontrol requeue`, PreemptMode=REQUEUE)."""
    argv = ["--logs", str(tmp_path), "--name", "x", "--resume", "pretrained.pt"]
    job = submit.TrainJob(argv, dist_timeout_min=5)
    assert submit.start_argv(argv) == argv
    checkpoints = tmp_path / "x" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / ".tmp-epoch_1.pt").write_bytes(b"")  # a save killed midway: nothing to resume
    assert submit.start_argv(argv) == argv
    torch.save({"epoch": 1}, checkpoints / "epoch_1.pt")
    assert submit.start_argv(argv) == ["--logs", str(tmp_path), "--name", "x", "--resume", "latest"]
    requeued = job.checkpoint().function  # submitit's requeue: the same job, deciding at its start
    assert requeued.train_argv == argv and requeued.dist_timeout_min == 5
    assert submit.start_argv(["--resume", "latest", *argv[:4]]) == ["--resume", "latest", *argv[:4]]


def test_a_start_after_one_that_saved_nothing_sets_its_log_aside(tmp_path):
    """OpenCLIP refuses `--resume PATH` into a folder with a log ("Experiment already exists"):
    the task that makes that check keeps the earlier start's log under another name."""
    argv = ["--logs", str(tmp_path), "--name", "x", "--resume", "pretrained.pt"]
    (tmp_path / "x").mkdir()
    assert submit.set_aside_earlier_log(argv, global_rank=0, local_rank=0) is None
    for start in (1, 2):
        (tmp_path / "x" / "out.log").write_text(f"start {start}")
        assert submit.set_aside_earlier_log(argv, global_rank=1, local_rank=0) is None
        kept = submit.set_aside_earlier_log(argv, global_rank=0, local_rank=0)
        assert kept == tmp_path / "x" / f"out.log.start{start}" and kept.read_text() == f"start {start}"
    (tmp_path / "x" / "out-3").write_text("")  # --log-local: each node's first task checks its own
    assert submit.set_aside_earlier_log([*argv, "--log-local"], global_rank=3, local_rank=1) is None
    assert submit.set_aside_earlier_log([*argv, "--log-local"], global_rank=3, local_rank=0) == (
        tmp_path / "x" / "out-3.start1")


def replay_start(job_dir: Path, job_id: str) -> subprocess.CompletedProcess:
    """One start of a submitted job from its original submitit pickle, as SLURM restarts a job
    (node failure, `scontrol requeue`): submitit's own entry point, as the job's only task."""
    env = {**os.environ, "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": job_id,
           "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
           "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0",
           "OMP_NUM_THREADS": "1",  # the job's setup lines, as the launcher writes them:
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-u", "-m", "submitit.core._submit", str(job_dir)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_restarts_from_the_original_submission_with_resume_path_train_on(tmp_path, scene_shards):
    """`--resume PATH` replayed from the submitted pickle: after a start that left only a log (a
    signal during set-up, a dead node) the job starts again from PATH, and once the experiment has
    a checkpoint it resumes that. OpenCLIP refused both ("Experiment already exists")."""
    import submitit

    from conftest import tiny_model, train_argv
    from open_clip_hn.slurm.submit import TrainJob  # importable: the pickle names it

    pretrained = tmp_path / "pretrained.pt"
    torch.save(tiny_model().state_dict(), pretrained)
    job_dir = tmp_path / "job"
    argv = submit.experiment_argv(train_argv(scene_shards, str(job_dir), submit.EXPERIMENT_NAME,
                                             "--resume", str(pretrained), num_samples=16), job_dir)
    experiment = job_dir / submit.EXPERIMENT_NAME
    experiment.mkdir(parents=True)
    (experiment / "out.log").write_text("an earlier start, stopped before its first checkpoint\n")
    submitit.helpers.DelayedSubmission(TrainJob(argv, 5)).dump(job_dir / "42_submitted.pkl")

    after_setup = replay_start(job_dir, "42")
    output = after_setup.stdout + after_setup.stderr
    assert "Job completed successfully" in output, output[-4000:]
    assert (experiment / "out.log.start1").read_text().startswith("an earlier start")
    assert f"=> loaded checkpoint '{pretrained}'" in (experiment / "out.log").read_text()
    assert (experiment / "checkpoints" / "epoch_1.pt").exists()

    after_checkpoint = replay_start(job_dir, "42")
    output = after_checkpoint.stdout + after_checkpoint.stderr
    assert "Job completed successfully" in output, output[-4000:]
    assert "--resume latest" in after_checkpoint.stdout
    assert "=> resuming checkpoint" in (experiment / "out.log").read_text()
    assert not (experiment / "out.log.start2").exists()


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


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
@pytest.mark.parametrize("refusal, message", [
    ("experiment", "already exists: pass --resume latest"),
    # a job given --resume PATH takes any checkpoint of its experiment for its own
    ("checkpoints", "already exists: pass --resume latest"),
    ("srun", "no srun on this machine: run on a SLURM login node, or pass --local"),
    ("partition", "--partition big: no such partition"),
    ("resources", "needs 100 CPUs per node, but the nodes of partition cpu have at most 64"),
])
def test_a_refused_submission_leaves_no_job_folder(passing_cluster, monkeypatch, tmp_path, capsys,
                                                   refusal, message, dry_run):
    """Every check runs before the job folder is made, so a refusal leaves nothing to clean up;
    a dry run makes the same checks."""
    launch, flags = ["--gpus-per-node", "0", "--cpus-per-task", "1", *dry_run], ["--epochs", "1"]
    if refusal in ("experiment", "checkpoints"):
        (tmp_path / "logs" / "x" / "checkpoints").mkdir(parents=True)
        if refusal == "experiment":
            (tmp_path / "logs" / "x" / "out.log").write_text("")
        else:
            torch.save({"epoch": 1}, tmp_path / "logs" / "x" / "checkpoints" / "epoch_1.pt")
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


def test_a_dry_run_prints_the_request_and_each_tasks_command_and_makes_nothing(
        passing_cluster, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(submit, "make_executor", lambda *a: pytest.fail("a dry run made an executor"))
    job_dir = tmp_path / "jobs" / "job"
    assert submit.main(["--dry-run", "--gpus-per-node", "0", "--tasks-per-node", "2",
                        "--cpus-per-task", "4", "--mem", "4G", "--time", "1:00:00",
                        "--job-dir", str(job_dir), "--", "--epochs", "1", "--resume", "/c/epoch_3.pt"]) == 0
    out = capsys.readouterr().out
    assert "Dry run: every check passed; nothing was submitted and no folder was made." in out
    assert "Resources (submitit SlurmExecutor, partition cpu, requeued at most 3 time(s)" in out
    for line in ("nodes: 1", "ntasks_per_node: 2", "cpus_per_task: 4", "time: 60", "signal_delay_s: 120",
                 "additional_parameters: {'mem': '4G'}", "srun_args: ['--kill-on-bad-exit=1']"):
        assert f"\n  {line}\n" in out
    assert f"Job folder: {job_dir}\nExperiment: {job_dir / 'train'}\n" in out
    assert "Each of the 2 task(s) runs" in out
    assert (f"  python -m open_clip_hn.train --epochs 1 --resume /c/epoch_3.pt --logs {job_dir} "
            "--name train\n  (a start that finds a checkpoint of the experiment runs it with "
            "--resume latest)") in out
    assert not (tmp_path / "jobs").exists()


def test_a_local_dry_run_checks_the_training_flags_and_starts_nothing(tmp_path, scene_shards):
    from conftest import train_argv

    flags = train_argv(scene_shards, str(tmp_path / "logs"), "x")
    launch = ["--dry-run", "--local", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10",
              "--job-dir", str(tmp_path / "job")]
    proc = run_submit(*launch, "--", *flags)
    assert proc.returncode == 0, proc.stderr
    assert "submitit LocalExecutor, this machine" in proc.stdout and "tasks_per_node: 1" in proc.stdout
    assert f"  python -m open_clip_hn.train {shlex.join(flags)} --resume latest\n" in proc.stdout
    refused = run_submit(*launch, "--", *flags, "--no-such-flag")
    assert refused.returncode == 2 and "unrecognized arguments: --no-such-flag" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class FakeJob:
    def __init__(self, job_id: str):
        self.job_id = job_id
        self.paths = types.SimpleNamespace(stdout=f"{job_id}_0_log.out")

    def results(self) -> list[str]:
        return ["done"]


def fake_submissions(monkeypatch, job_ids: list[str]) -> list:
    """make_executor replaced: each submission gets the next job id; returns the submitted jobs."""
    submitted, ids = [], iter(job_ids)

    class Executor:
        def submit(self, job):
            submitted.append(job)
            return FakeJob(next(ids))

    monkeypatch.setattr(submit, "make_executor", lambda args, folder, tasks_per_node: Executor())
    return submitted


def fake_squeue(monkeypatch, tmp_path, script: str) -> None:
    """An `squeue` first on PATH, answering with the sh `script`."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    (folder / "squeue").write_text("#!/bin/sh\n" + script + "\n")
    (folder / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")


# squeue's answers for job 100 (asked with `-t all --jobs=100`), and whether it blocks a submission
SQUEUE_ANSWERS = {
    "RUNNING": ("echo RUNNING", True),
    "PENDING": ("echo PENDING", True),  # queued, or requeued after a preemption
    "COMPLETED": ("echo COMPLETED", False),
    "forgotten": ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", False),
    "unreachable": ("echo 'squeue: error: Unable to contact slurm controller' >&2; exit 1", False),
}


@pytest.mark.parametrize("answer", SQUEUE_ANSWERS)
def test_a_job_dir_an_unfinished_job_writes_is_refused(passing_cluster, monkeypatch, tmp_path,
                                                       capsys, answer):
    """Two jobs in one experiment take each other's step checkpoints (then deleted under them)
    and mix their logs: the launcher notes each job it submits and asks SLURM about it."""
    script, blocks = SQUEUE_ANSWERS[answer]
    fake_squeue(monkeypatch, tmp_path,
                f'case "$*" in *"-t all --jobs=100 "*) {script} ;; *) exit 9 ;; esac')
    submitted = fake_submissions(monkeypatch, ["100", "101"])
    job_dir = tmp_path / "job"
    launch = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--job-dir", str(job_dir), "--",
              "--epochs", "1"]
    assert submit.main(launch) == 0
    assert (job_dir / "train" / submit.JOBS_FILE).read_text() == "slurm 100\n"
    capsys.readouterr()
    assert submit.main(launch) == (2 if blocks else 0)
    err = capsys.readouterr().err
    if blocks:
        assert (f"--job-dir {job_dir} is in use by job 100 ({answer}) of this launcher: pass another "
                "--job-dir, or let the job end or stop it (scancel 100) first; nothing was submitted") in err
        assert len(submitted) == 1
        return
    assert len(submitted) == 2  # the same command continues the experiment once the job has ended
    assert (job_dir / "train" / submit.JOBS_FILE).read_text() == "slurm 100\nslurm 101\n"
    warned = "cannot tell whether job 100, submitted into" in err
    assert warned == (answer == "unreachable")


def test_an_experiment_another_job_dir_shares_is_refused(passing_cluster, monkeypatch, tmp_path,
                                                         capsys):
    fake_squeue(monkeypatch, tmp_path, "echo PENDING")
    fake_submissions(monkeypatch, ["7", "8"])
    launch = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--job-dir"]
    flags = ["--", "--epochs", "1", "--logs", str(tmp_path / "logs"), "--name", "x"]
    assert submit.main([*launch, str(tmp_path / "one"), *flags]) == 0
    capsys.readouterr()
    for dry_run in ([], ["--dry-run"]):
        assert submit.main([*dry_run, *launch, str(tmp_path / "two"), *flags]) == 2
        assert (f"experiment {tmp_path / 'logs' / 'x'} is in use by job 7 (PENDING) of this "
                "launcher: pass another --name (or --logs)") in capsys.readouterr().err
    assert not (tmp_path / "two").exists()


def test_a_local_job_is_unfinished_while_its_process_runs_on_this_machine(passing_cluster,
                                                                         monkeypatch, tmp_path):
    here = socket.gethostname()
    fake_submissions(monkeypatch, [str(os.getpid())])
    job_dir = tmp_path / "job"
    assert submit.main(["--local", "--gpus-per-node", "0", "--job-dir", str(job_dir), "--",
                        "--epochs", "1"]) == 0
    record, = submit.read_job_records(job_dir / "train")
    assert record == submit.JobRecord("local", str(os.getpid()), here)
    assert submit.job_unfinished(record) == "running on this machine"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert submit.job_unfinished(submit.JobRecord("local", ended, here)) == ""
    assert submit.job_unfinished(submit.JobRecord("local", ended, "another-machine")) is None


# ---------------------------------------------------------------------------- the command line


def test_help_lists_the_flags():
    out = run_submit("--help").stdout
    for flag in ("--nodes", "--gpus-per-node", "--partition", "--time", "--account", "--qos",
                 "--constraint", "--mem", "--cpus-per-task", "--job-dir", "--local", "--dry-run",
                 "--signal-delay"):
        assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "--nodes 0: must be at least 1"),
    (["--gpus-per-node", "-1"], "--gpus-per-node -1: must be at least 0"),
    (["--time", "soon"], "--time 'soon': not a SLURM time"),
    (["--time", "1"], "--signal-delay 120 is not well below --time 1 (60 s)"),
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
        "interrupted_flags": long_flags,
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
    # the same submission again, while the job runs: squeue tells the launcher, which refuses it
    again = run_submit(*LAUNCH, "--job-dir", str(job_dir), "--", *jobs["interrupted_flags"], env=env)
    assert again.returncode == 2, again.stdout + again.stderr
    assert f"is in use by job {job_id} (RUNNING) of this launcher" in again.stderr
    assert "Submitted job" not in again.stdout
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
