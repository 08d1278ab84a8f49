#!/usr/bin/env python
"""Submit `python -m open_clip_hn.train` to SLURM with submitit: N nodes x G GPUs, one task per GPU.

    python -m open_clip_hn.slurm.submit --nodes 4 --gpus-per-node 8 --partition P --time 72:00:00 \\
        -- --train-data ... --model ViT-B-32 --hn-negatives online ...

(`python slurm/submit.py ...` from a checkout: this folder is installed as `open_clip_hn.slurm`.)

Every task sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK from SLURM (through submitit's
`JobEnvironment`) so OpenCLIP's `init_distributed_device` works unchanged. The job is a submitit
checkpointable: on SIGUSR2 (SLURM sends it `--signal-delay` seconds before the time limit, and
`scancel --signal=USR2` sends it on preemption) every task finishes its optimizer step, rank 0
saves a step checkpoint (open_clip_hn/preemption.py) and requeues the job, and the new start runs
with `--resume latest`, continuing at that step with the plugin's state. Logs, submitit's files
and checkpoints live in one job folder.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, NamedTuple

# From a checkout, `python slurm/submit.py` imports the package beside this folder (and the job
# does too); installed, this file is `open_clip_hn/slurm/submit.py` and the package is importable.
CHECKOUT = Path(__file__).resolve().parents[1]
CHECKOUT = CHECKOUT if (CHECKOUT / "open_clip_hn" / "__init__.py").is_file() else None
PROG = ("python -m open_clip_hn.slurm.submit" if __spec__ is not None and __spec__.name.startswith("open_clip_hn")
        else "python slurm/submit.py")
EXPERIMENT_NAME = "train"


class SubmitError(Exception):
    """Bad input found before submission: the message names the input and the fix."""


# ---------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Submit open_clip_hn training to SLURM (submitit): one task per GPU, "
                    "requeued and resumed on preemption or time limit. Training flags follow '--'.",
        usage="%(prog)s [options] -- <flags of python -m open_clip_hn.train>",
    )
    parser.add_argument("--nodes", type=int, default=1, help="Number of nodes (default: 1).")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per node; one task per GPU. 0 for CPU-only runs (then "
                             "--tasks-per-node tasks, gloo backend). Default: 8.")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="Tasks per node (default: --gpus-per-node, or 1 without GPUs).")
    parser.add_argument("--cpus-per-task", type=int, default=10,
                        help="CPUs per task (data loader workers + main thread); also sets "
                             "OMP_NUM_THREADS. Default: 10.")
    parser.add_argument("--mem", default=None,
                        help="Memory per node in SLURM syntax (e.g. 400G); default: the cluster's.")
    parser.add_argument("--partition", default=None,
                        help="SLURM partition (default: the cluster's default partition).")
    parser.add_argument("--time", default="72:00:00",
                        help="Time limit per start of the job: MM, HH:MM:SS or D-HH:MM:SS (default: 72:00:00).")
    parser.add_argument("--account", default=None, help="SLURM account to charge.")
    parser.add_argument("--qos", default=None, help="SLURM quality of service.")
    parser.add_argument("--constraint", default=None, help="SLURM node feature constraint.")
    parser.add_argument("--job-name", default="open_clip_hn", help="SLURM job name (default: open_clip_hn).")
    parser.add_argument("--job-dir", default=None,
                        help="Job folder for submitit's files, logs and (unless --logs/--name are "
                             "given) the experiment; default ./slurm_jobs/<job-name>_<time>.")
    parser.add_argument("--signal-delay", type=int, default=120,
                        help="Seconds before the time limit at which SLURM sends SIGUSR2 so the "
                             "job requeues itself; at most half of --time (default: 120).")
    parser.add_argument("--max-timeouts", type=int, default=3,
                        help="How many times a job that reaches its time limit is requeued (default: 3).")
    parser.add_argument("--dist-timeout", type=float, default=30.0,
                        help="Minutes a collective (NCCL/gloo) may wait before the job fails, "
                             "e.g. when a node dies (default: 30).")
    parser.add_argument("--local", action="store_true",
                        help="Run the same job on this machine with submitit's local executor "
                             "(one node, no SLURM), waiting for it: for debugging.")
    parser.add_argument("--wait", action="store_true",
                        help="Wait for the job to finish (through requeues) and exit non-zero "
                             "if it failed.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Make every check, print the resources the job would request, its "
                             "folder and the training command each task would run, and stop: "
                             "nothing is submitted and no folder is made.")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher flags before '--', training flags after it."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def parse_time(text: str) -> int:
    """A SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise SubmitError(f"--time {text!r}: not a SLURM time; use MM, HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    else:  # MM[:SS]
        seconds = int(first) * 60 + int(second or 0)
    minutes = -(-seconds // 60)
    if minutes < 1:
        raise SubmitError(f"--time {text!r}: the time limit must be at least one minute")
    return minutes


def check_signal_delay(signal_delay: int, time: str) -> None:
    """SLURM sends SIGUSR2 `--signal-delay` seconds before the time limit; a delay that is not well
    below the limit signals each start at once, and the job requeues itself over and over without
    training. At most half the limit leaves the job at least the other half."""
    limit_s = parse_time(time) * 60
    if signal_delay > limit_s // 2:
        raise SubmitError(
            f"--signal-delay {signal_delay} is not well below --time {time} ({limit_s} s): SLURM "
            "would send SIGUSR2 as soon as the job starts and it would requeue itself over and "
            f"over; pass --signal-delay {limit_s // 2} (at most half the time limit), or a --time "
            f"of at least {-(-2 * signal_delay // 60)} minutes")


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in argv (`--flag V` or `--flag=V`; the last one wins), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with every `flag` occurrence removed and `flag value` appended."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return [*out, flag, value]


def experiment_argv(train_argv: list[str], job_dir: Path) -> list[str]:
    """The training flags the job runs: its experiment in the job folder, resuming its own latest.

    `--resume latest` needs a fixed `--logs`/`--name`; with no `--resume` given the job always
    continues its own experiment (the first start finds no checkpoint and starts fresh), so any
    restart, by submitit or by SLURM itself, resumes instead of being refused by OpenCLIP.
    """
    argv = list(train_argv)
    if flag_value(argv, "--logs") is None:
        argv = with_flag(argv, "--logs", str(job_dir))
    if flag_value(argv, "--name") is None:
        argv = with_flag(argv, "--name", EXPERIMENT_NAME)
    if flag_value(argv, "--resume") is None:
        argv = with_flag(argv, "--resume", "latest")
    return argv


def experiment_dir(train_argv: list[str]) -> Path:
    return Path(flag_value(train_argv, "--logs")) / flag_value(train_argv, "--name")


# ---------------------------------------------------------------------------- checks before submission


def use_checkout() -> None:
    """Import open_clip_hn from the checkout this file is in, when it is in one."""
    if CHECKOUT is not None and str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))


def check_train_flags(train_argv: list[str]) -> None:
    """Parse the training flags exactly as `python -m open_clip_hn.train` will (exits on error)."""
    use_checkout()
    from open_clip_hn import hooks, install

    install()
    try:
        hooks.parse_args(train_argv)
    except SystemExit as err:
        if err.code:
            raise SubmitError("the training flags after '--' were refused (see the message "
                              "above); nothing was submitted") from None
        raise


def spelled_out(train_argv: list[str]) -> list[str]:
    """The training flags with each abbreviation written out as the trainer reads it (`--nam x`
    is `--name x`), so that the `--logs`/`--name`/`--resume` read and set here are the trainer's."""
    use_checkout()
    from open_clip_hn import hooks
    from open_clip_hn.recipes import spell_out_flags

    return spell_out_flags(train_argv, hooks.build_parser())


def job_dir_error(job_dir: Path, reason: str) -> SubmitError:
    return SubmitError(f"--job-dir {job_dir}: not writable ({reason}); pass --job-dir with a "
                       "folder you can write on a shared file system")


def check_job_dir(job_dir: Path) -> None:
    """Refuse a job folder that cannot be made, without making it: a refused run leaves nothing."""
    existing = next(path for path in (job_dir, *job_dir.parents) if path.exists())
    if not existing.is_dir():
        raise job_dir_error(job_dir, f"{existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise job_dir_error(job_dir, f"no write permission on {existing}")


def make_job_dir(job_dir: Path) -> None:
    """Create the job folder once every check has passed (submitit writes its files there), and
    write into it once: permission bits can say writable where writes fail (root-squashed NFS,
    ACLs), which submitit would otherwise report as a traceback."""
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        probe = job_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise job_dir_error(job_dir, err.strerror) from None


def check_experiment(train_argv: list[str]) -> None:
    """OpenCLIP refuses an existing experiment unless resuming it, and a job given `--resume PATH`
    takes any checkpoint in its experiment for its own (`start_argv`): refuse both before queueing."""
    folder = experiment_dir(train_argv)
    if flag_value(train_argv, "--resume") != "latest" and (
            (folder / "out.log").exists() or has_checkpoint(folder / "checkpoints")):
        raise SubmitError(f"experiment {folder} already exists: pass --resume latest after "
                          "'--' to continue it, or another --job-dir / --name")


def check_counts(args: argparse.Namespace) -> None:
    for flag, value, least in (("--nodes", args.nodes, 1), ("--gpus-per-node", args.gpus_per_node, 0),
                               ("--tasks-per-node", args.tasks_per_node, 1),
                               ("--cpus-per-task", args.cpus_per_task, 1),
                               ("--signal-delay", args.signal_delay, 1),
                               ("--max-timeouts", args.max_timeouts, 0)):
        if value is not None and value < least:
            raise SubmitError(f"{flag} {value}: must be at least {least}")
    if not math.isfinite(args.dist_timeout) or args.dist_timeout <= 0:
        raise SubmitError(f"--dist-timeout {args.dist_timeout}: must be a positive, finite number of minutes")
    if args.local and args.nodes != 1:
        raise SubmitError(f"--local runs on this machine only: use --nodes 1 (got {args.nodes})")
    if args.local and args.gpus_per_node:
        import torch

        here = torch.cuda.device_count()
        if args.gpus_per_node > here:
            raise SubmitError(f"--local --gpus-per-node {args.gpus_per_node}, but this machine has "
                              f"{here} GPU(s); pass --gpus-per-node {here}"
                              + (" (CPU processes: set --tasks-per-node for several)" if not here else ""))


def partitions() -> tuple[list[str], str | None]:
    """The cluster's partitions and its default one (None when it has none)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except subprocess.CalledProcessError as err:
        raise SubmitError(f"cannot reach SLURM (sinfo: {err.stderr.strip()}); run on a login "
                          "node, check SLURM_CONF, or use --local") from None
    except (OSError, subprocess.SubprocessError) as err:
        raise SubmitError(f"cannot reach SLURM (sinfo: {err}); run on a login node or use "
                          "--local") from None
    names = [name.strip() for name in out.split()]
    default = next((name[:-1] for name in names if name.endswith("*")), None)
    return [name.rstrip("*") for name in names], default


def check_partition(partition: str | None) -> str:
    """The partition the job will go to (given or the cluster's default), checked to exist."""
    for tool in ("sbatch", "srun"):  # submitit's SlurmExecutor needs srun too
        if shutil.which(tool) is None:
            raise SubmitError(f"no {tool} on this machine: run on a SLURM login node, or pass "
                              "--local")
    names, default = partitions()
    if partition is None and default is None:
        raise SubmitError(f"this cluster has no default partition: pass --partition "
                          f"(one of {', '.join(names) or 'none found'})")
    if partition is not None and partition not in names:
        raise SubmitError(f"--partition {partition}: no such partition (have: {', '.join(names)})")
    return partition or default


class NodeShape(NamedTuple):
    """`count` nodes of a partition with these resources (one line of `sinfo -o '%D %c %m %G'`)."""

    count: int
    cpus: int
    memory_mb: int
    gpus: int


SINFO_FORMAT = "%D %c %m %G"


def _leading_int(text: str) -> int:
    """sinfo's numbers, which may carry a '+' ('32+': nodes of the group have at least 32)."""
    match = re.match(r"\d+", text)
    if not match:
        raise ValueError(f"not a number: {text!r}")
    return int(match.group())


def gres_gpus(gres: str) -> int:
    """GPUs per node in a GRES string: 'gpu:8', 'gpu:a100:4(S:0-1),mps:100', '(null)' -> 0."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres):
        fields = re.sub(r"\(.*?\)", "", item).split(":")
        if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def parse_sinfo_nodes(text: str) -> list[NodeShape]:
    """The node groups of `sinfo -h -p PART -o '%D %c %m %G'` output."""
    shapes = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3:
            raise ValueError(f"unexpected sinfo line {line!r}")
        shapes.append(NodeShape(_leading_int(fields[0]), _leading_int(fields[1]),
                                _leading_int(fields[2]),
                                gres_gpus(fields[3]) if len(fields) > 3 else 0))
    return shapes


def parse_mem_mb(text: str) -> int:
    """A SLURM --mem value in megabytes: '400G', '8000' (MB), '512M', '1T', '2048K'."""
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not match:
        raise SubmitError(f"--mem {text!r}: not a SLURM memory size; use e.g. 400G or 8000M")
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[match.group(2)]
    return int(int(match.group(1)) * scale)


def unsatisfiable(nodes: list[NodeShape], partition: str, num_nodes: int, tasks_per_node: int,
                  cpus_per_task: int, gpus_per_node: int, mem_mb: int | None) -> str | None:
    """Why `partition` (its node groups) can never run the request, or None if it can.

    SLURM accepts such a job and leaves it pending forever (reason: Resources or
    PartitionConfig); saying so before submission names the limit instead.
    """
    cpus = tasks_per_node * cpus_per_task
    fits = [n for n in nodes if n.cpus >= cpus and n.gpus >= gpus_per_node
            and (mem_mb is None or n.memory_mb >= mem_mb)]
    if sum(n.count for n in fits) >= num_nodes:
        return None
    if not nodes:
        return f"partition {partition} has no nodes"
    most_cpus = max(n.cpus for n in nodes)
    if cpus > most_cpus:
        return (f"--cpus-per-task {cpus_per_task} x {tasks_per_node} task(s) per node needs "
                f"{cpus} CPUs per node, but the nodes of partition {partition} have at most "
                f"{most_cpus}; pass --cpus-per-task {max(1, most_cpus // tasks_per_node)} (or "
                "fewer --tasks-per-node)")
    most_gpus = max(n.gpus for n in nodes)
    if gpus_per_node > most_gpus:
        return (f"--gpus-per-node {gpus_per_node}, but the nodes of partition {partition} have "
                f"at most {most_gpus} GPU(s); pass --gpus-per-node {most_gpus} or another "
                "--partition")
    most_mem = max(n.memory_mb for n in nodes)
    if mem_mb is not None and mem_mb > most_mem:
        return (f"--mem {mem_mb}M, but the nodes of partition {partition} have at most "
                f"{most_mem}M; pass a smaller --mem")
    return (f"--nodes {num_nodes}, but partition {partition} has only "
            f"{sum(n.count for n in fits)} node(s) with {cpus} CPUs, {gpus_per_node} GPU(s)"
            f"{f' and {mem_mb}M' if mem_mb is not None else ''} each; pass fewer --nodes")


def partition_nodes(partition: str) -> list[NodeShape] | None:
    """The node groups of `partition` from sinfo; None (after a warning) when it cannot be read."""
    if shutil.which("sinfo") is None:
        print("submit.py: warning: no sinfo on this machine; the job's size is not checked "
              "against the partition", file=sys.stderr)
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-p", partition, "-o", SINFO_FORMAT],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return parse_sinfo_nodes(out)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        print(f"submit.py: warning: sinfo could not describe partition {partition} ({err}); "
              "the job's size is not checked against it", file=sys.stderr)
        return None


def check_resources(args: argparse.Namespace, partition: str, tasks_per_node: int) -> None:
    """Refuse a request no node group of `partition` can ever satisfy (see `unsatisfiable`)."""
    mem_mb = parse_mem_mb(args.mem) if args.mem else None
    nodes = partition_nodes(partition)
    if nodes is None:
        return
    problem = unsatisfiable(nodes, partition, args.nodes, tasks_per_node, args.cpus_per_task,
                            args.gpus_per_node, mem_mb)
    if problem:
        raise SubmitError(f"{problem}; nothing was submitted")


JOBS_FILE = "submitted_jobs.txt"
# squeue's states of a job that has ended for good; any other state (PENDING, RUNNING,
# REQUEUED, SUSPENDED, COMPLETING, ...) means it may still write its experiment.
ENDED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                          "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "TIMEOUT"})


class JobRecord(NamedTuple):
    """A job this launcher submitted into an experiment: a line `slurm JOBID` or
    `local PID HOST` of the experiment's JOBS_FILE."""

    kind: str
    job_id: str
    host: str = ""


def read_job_records(experiment: Path) -> list[JobRecord]:
    path = experiment / JOBS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    return [JobRecord(*line.split()[:3]) for line in lines if len(line.split()) >= 2]


def record_job(experiment: Path, record: JobRecord) -> None:
    """Note the submitted job in its experiment, for the next submission's `check_experiment_free`."""
    try:
        experiment.mkdir(parents=True, exist_ok=True)
        with open(experiment / JOBS_FILE, "a") as file:
            file.write(" ".join(record).strip() + "\n")
    except OSError as err:
        print(f"submit.py: warning: cannot note job {record.job_id} in {experiment} "
              f"({err.strerror}); a second submission into it will not be refused", file=sys.stderr)


def slurm_job_states(job_id: str) -> list[str] | None:
    """The job's states in squeue (none once SLURM has forgotten it: it ended long ago); None
    when SLURM cannot be asked."""
    if shutil.which("squeue") is None:
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-t", "all", f"--jobs={job_id}", "-o", "%T"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode == 0:
        return proc.stdout.split()
    return [] if "invalid job id" in proc.stderr.lower() else None


def local_job_alive(pid: str, host: str) -> bool | None:
    """Whether the `--local` job's controller process still runs; None when it ran on another
    machine (its process cannot be seen from here)."""
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, PermissionError):  # gone, or the pid is another user's now
        return False
    return True


def job_unfinished(record: JobRecord) -> str | None:
    """Why `record`'s job may still write its experiment (its SLURM state, or 'running on this
    machine'), '' when it has ended, None when that cannot be told."""
    if record.kind == "local":
        alive = local_job_alive(record.job_id, record.host)
        return None if alive is None else "running on this machine" if alive else ""
    states = slurm_job_states(record.job_id)
    if states is None:
        return None
    return next((state for state in states if state not in ENDED_STATES), "")


def check_experiment_free(train_argv: list[str], job_dir: Path) -> None:
    """Refuse an experiment that an unfinished job of this launcher still writes: two jobs in one
    folder take each other's step checkpoints (which the other then deletes) and mix their logs.

    The jobs are the ones `record_job` noted there; SLURM (squeue) says whether each still
    runs. When that cannot be told the submission goes on, with a warning.
    """
    folder = experiment_dir(train_argv)
    in_job_dir = folder == job_dir / EXPERIMENT_NAME
    for record in read_job_records(folder):
        why = job_unfinished(record)
        if why is None:
            how = "squeue gave no answer" if record.kind == "slurm" else f"it runs on {record.host}"
            print(f"submit.py: warning: cannot tell whether job {record.job_id}, submitted into "
                  f"{folder}, has ended ({how}); make sure it has before this one starts",
                  file=sys.stderr)
        elif why:
            stop = f"scancel {record.job_id}" if record.kind == "slurm" else f"kill {record.job_id}"
            raise SubmitError(
                f"{f'--job-dir {job_dir}' if in_job_dir else f'experiment {folder}'} is in use by "
                f"job {record.job_id} ({why}) of this launcher: pass another "
                f"{'--job-dir' if in_job_dir else '--name (or --logs)'}, or let the job end or "
                f"stop it ({stop}) first; nothing was submitted")


# ---------------------------------------------------------------------------- the job


def distributed_env(hostnames: list[str], job_id: str, global_rank: int, local_rank: int,
                    num_tasks: int) -> dict[str, str]:
    """torch.distributed's env:// variables for one task; the first node hosts the rendezvous.

    The port is derived from the job id, so all tasks agree and a requeued job reuses it.
    """
    digits = re.sub(r"\D", "", job_id) or "0"
    return {
        "MASTER_ADDR": "127.0.0.1" if len(hostnames) == 1 else hostnames[0],
        "MASTER_PORT": str(20000 + int(digits) % 40000),
        "RANK": str(global_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(num_tasks),
    }


def has_checkpoint(checkpoint_dir: Path) -> bool:
    """Whether `--resume latest` has a file to consider: a `*.pt`, not a save's leftover temp
    file (one implementation with the trainer's pick: `open_clip_hn.state`)."""
    use_checkout()
    from open_clip_hn.state import checkpoints_newest_first

    return bool(checkpoints_newest_first(checkpoint_dir))


def start_argv(train_argv: list[str]) -> list[str]:
    """The training flags of one start: a given `--resume PATH` until the experiment holds a
    checkpoint, then `--resume latest`.

    Decided at every start, on every task alike: SLURM restarts a job from its original
    submission (node failure, `scontrol requeue`, PreemptMode=REQUEUE), not only through
    submitit's requeue. The submission refused `--resume PATH` into an experiment that held a
    checkpoint, so one found here is the experiment's own.
    """
    if flag_value(train_argv, "--resume") != "latest" and has_checkpoint(
            experiment_dir(train_argv) / "checkpoints"):
        return with_flag(train_argv, "--resume", "latest")
    return list(train_argv)


def set_aside_earlier_log(train_argv: list[str], global_rank: int, local_rank: int) -> Path | None:
    """Rename the log an earlier start left (`out.log` -> `out.log.startN`, kept) when this start
    resumes `--resume PATH` again (that start stopped before its first checkpoint): OpenCLIP
    refuses a folder with a log unless resuming latest ("Experiment already exists").

    Done by the task that runs OpenCLIP's check: rank 0, or with `--log-local` each node's first
    task for its own `out-RANK`. Returns the new name, or None when there was nothing to move.
    """
    log_local = "--log-local" in train_argv
    if (local_rank if log_local else global_rank) != 0:
        return None
    log = experiment_dir(train_argv) / (f"out-{global_rank}" if log_local else "out.log")
    if not log.exists():
        return None
    number = 1
    while log.with_name(f"{log.name}.start{number}").exists():
        number += 1
    kept = log.with_name(f"{log.name}.start{number}")
    os.replace(log, kept)
    return kept


def set_aside_broken_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Rename unreadable checkpoints that `--resume latest` would pick, so it picks the one before.

    A node that dies while a checkpoint is written leaves a truncated file that would otherwise
    be the newest checkpoint and fail every later start. One implementation with the training
    route's `--resume latest`: `open_clip_hn.state`.
    """
    use_checkout()
    from open_clip_hn.state import set_aside_broken_checkpoints as set_aside

    return set_aside(checkpoint_dir)


@contextlib.contextmanager
def deferred_signal(signum: int) -> Iterator[None]:
    """Hold `signum` back while the body runs, then deliver it (main thread only).

    submitit's SIGUSR2 handler requeues and exits at once; inside `torch.save` that would leave
    a checkpoint with missing tensors. Deferred, the save completes first.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signum, lambda num, frame: caught.append(num))
    try:
        yield
    finally:
        signal.signal(signum, previous)
        if caught:
            signal.raise_signal(signum)


def defer_signal_during_saves(signum: int) -> None:
    """Make every `torch.save` of this process (checkpoints, plugin state) finish before `signum`."""
    import torch

    original = torch.save

    @functools.wraps(original)
    def save(*args: Any, **kwargs: Any) -> Any:
        with deferred_signal(signum):
            return original(*args, **kwargs)

    torch.save = save


def ignore_signal_in_forked_children(signum: int) -> None:
    """Data loader workers fork with submitit's handler; only the task itself may requeue."""
    os.register_at_fork(after_in_child=lambda: signal.signal(signum, signal.SIG_IGN))


def set_dist_timeout(minutes: float) -> None:
    """Make torch.distributed's process group use `minutes` as its collective timeout.

    OpenCLIP calls `init_process_group` without one; an explicit timeout (with NCCL's async
    error handling) makes a dead node fail the job instead of leaving the others waiting.
    """
    import torch.distributed as dist

    original = dist.init_process_group

    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", datetime.timedelta(minutes=minutes))
        return original(*args, **kwargs)

    dist.init_process_group = init_process_group


class TrainJob:
    """One task of the training job; submitit pickles it and calls it on every task, at every start.

    `train_argv` is the submission's; each start picks its own `--resume` (`start_argv`).
    `checkpoint()` is submitit's preemption/time-limit hook (rank 0, on SIGUSR2): it requeues the
    job unchanged.
    """

    def __init__(self, train_argv: list[str], dist_timeout_min: float):
        self.train_argv = list(train_argv)
        self.dist_timeout_min = dist_timeout_min

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        os.environ.update(distributed_env(list(env.hostnames), env.job_id, env.global_rank,
                                          env.local_rank, env.num_tasks))
        argv = start_argv(self.train_argv)
        print(f"open_clip_hn job {env}: {' '.join(argv)}", flush=True)
        resume = flag_value(argv, "--resume")
        kept = None if resume == "latest" else set_aside_earlier_log(argv, env.global_rank,
                                                                      env.local_rank)
        if kept is not None:
            print(f"No checkpoint yet: starting again from --resume {resume}; the earlier "
                  f"start's log is kept as {kept}", flush=True)
        if env.global_rank == 0:
            for path in set_aside_broken_checkpoints(experiment_dir(argv) / "checkpoints"):
                print(f"Set aside an incomplete checkpoint: {path}", flush=True)
        set_dist_timeout(self.dist_timeout_min)
        requeue_signal = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
        defer_signal_during_saves(requeue_signal)
        ignore_signal_in_forked_children(requeue_signal)
        from open_clip_hn.train import main

        if main(argv) == -1:
            raise RuntimeError("open_clip_hn.train refused to start; see the log above")
        # Done: a time-limit signal now would only kill the exiting interpreter (Python restores
        # default handlers while it shuts down) and mark a finished run FAILED.
        signal.signal(requeue_signal, signal.SIG_IGN)
        return str(experiment_dir(argv))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


# ---------------------------------------------------------------------------- submission


def executor_parameters(args: argparse.Namespace, tasks_per_node: int) -> dict[str, Any]:
    """What the job requests: the parameters of the submitit executor (`--local` or SLURM)."""
    setup = [f"export OMP_NUM_THREADS={args.cpus_per_task}",
             "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1"]
    if CHECKOUT is not None:
        setup.append(f"export PYTHONPATH={CHECKOUT}${{PYTHONPATH:+:$PYTHONPATH}}")
    timeout_min = parse_time(args.time)
    if args.local:
        return dict(timeout_min=timeout_min, tasks_per_node=tasks_per_node,
                    gpus_per_node=args.gpus_per_node, signal_delay_s=args.signal_delay, setup=setup)
    return dict(
        job_name=args.job_name, nodes=args.nodes, ntasks_per_node=tasks_per_node,
        cpus_per_task=args.cpus_per_task, gpus_per_node=args.gpus_per_node or None,
        time=timeout_min, partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, signal_delay_s=args.signal_delay, setup=setup,
        srun_args=["--kill-on-bad-exit=1"], additional_parameters={"mem": args.mem} if args.mem else {},
    )


def make_executor(args: argparse.Namespace, job_dir: Path, tasks_per_node: int) -> Any:
    import submitit

    if args.local:
        executor = submitit.LocalExecutor(folder=str(job_dir))
    else:
        executor = submitit.SlurmExecutor(folder=str(job_dir), max_num_timeout=args.max_timeouts)
    executor.update_parameters(**executor_parameters(args, tasks_per_node))
    return executor


def print_dry_run(args: argparse.Namespace, job_dir: Path, train_argv: list[str],
                  tasks_per_node: int, partition: str | None) -> None:
    """What a submission would do, made of the same pieces as the submission itself."""
    where = ("submitit LocalExecutor, this machine" if args.local else
             f"submitit SlurmExecutor, partition {partition}, requeued at most {args.max_timeouts} "
             "time(s) at the time limit")
    print("Dry run: every check passed; nothing was submitted and no folder was made.")
    print(f"Resources ({where}):")
    for key, value in executor_parameters(args, tasks_per_node).items():
        if value not in (None, [], {}):
            print(f"  {key}: {value}")
    print(f"Job folder: {job_dir}")
    print(f"Experiment: {experiment_dir(train_argv)}")
    tasks = args.nodes * tasks_per_node
    print(f"Each of the {tasks} task(s) runs, with RANK, LOCAL_RANK, WORLD_SIZE={tasks}, "
          "MASTER_ADDR and MASTER_PORT set from the job:")
    print(f"  python -m open_clip_hn.train {shlex.join(train_argv)}")
    if flag_value(train_argv, "--resume") != "latest":
        print("  (a start that finds a checkpoint of the experiment runs it with --resume latest)")


def main(argv: list[str] | None = None) -> int:
    launcher_argv, train_argv = split_argv(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(launcher_argv)
    try:
        if not train_argv:
            raise SubmitError("no training flags: put the flags of python -m open_clip_hn.train "
                              "after '--'")
        check_counts(args)
        check_signal_delay(args.signal_delay, args.time)
        if args.mem:
            parse_mem_mb(args.mem)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        job_dir = Path(args.job_dir or Path("slurm_jobs") / f"{args.job_name}_{stamp}").absolute()
        check_job_dir(job_dir)
        train_argv = experiment_argv(spelled_out(train_argv), job_dir)
        check_train_flags(train_argv)
        check_experiment(train_argv)
        check_experiment_free(train_argv, job_dir)
        tasks_per_node = args.tasks_per_node or max(args.gpus_per_node, 1)
        partition = None
        if not args.local:
            partition = check_partition(args.partition)
            check_resources(args, partition, tasks_per_node)
        if not args.dry_run:
            make_job_dir(job_dir)  # last: every refusal above leaves nothing on disk
        elif job_dir.is_dir():
            make_job_dir(job_dir)  # only its write test: the folder is there already
    except SubmitError as err:
        print(f"submit.py: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_dry_run(args, job_dir, train_argv, tasks_per_node, partition)
        return 0

    executor = make_executor(args, job_dir, tasks_per_node)
    job = executor.submit(TrainJob(train_argv, args.dist_timeout))
    record_job(experiment_dir(train_argv), JobRecord("local", job.job_id, socket.gethostname())
               if args.local else JobRecord("slurm", job.job_id))
    where = "locally" if args.local else f"on {args.nodes} node(s)"
    print(f"Submitted job {job.job_id} {where}, {tasks_per_node} task(s) per node")
    print(f"Job folder: {job_dir}")
    print(f"Experiment: {experiment_dir(train_argv)}")
    print(f"Follow the log: tail -f {job.paths.stdout}", flush=True)
    if not (args.wait or args.local):
        return 0
    try:
        print(f"Finished: {job.results()[0]}")
    except Exception as err:  # submitit raises the task's error or a failed-job error
        print(f"Job {job.job_id} failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
