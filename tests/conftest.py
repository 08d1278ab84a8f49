"""Shared fixtures: a tiny model config, procedural webdataset shards, and a training runner."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL_CONFIG = REPO / "open_clip_hn" / "model_configs" / "hn-tiny-vit.json"
TINY_MODEL = "hn-tiny-vit"


@pytest.fixture(autouse=True, scope="session")
def tiny_model_registered():
    """The tiny model in OpenCLIP's registry, as `--model-config` registers it in a run: the
    in-process tests parse `--model hn-tiny-vit` flags without building it (an unknown
    `--model` is refused at parse time)."""
    import open_clip

    open_clip.add_model_config(str(TINY_MODEL_CONFIG))


def scene_words() -> frozenset[str]:
    """Every word the rendered scenes' captions can use (shapes, colours, sizes, relations, "a")."""
    from open_clip_hn import scenes

    return frozenset(" ".join([*scenes.SHAPES, *scenes.COLOURS, *scenes.SIZES, *scenes.RELATIONS,
                               "a"]).split())


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random L2-normalised features (rows along the last dim), a pure function of `seed`."""
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def tiny_model():
    """The tiny ViT, seeded, returning OpenCLIP's output dict."""
    import open_clip

    open_clip.add_model_config(str(TINY_MODEL_CONFIG))
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(TINY_MODEL, output_dict=True)
    return model


def accum_freq_losses(model, images: torch.Tensor, texts: torch.Tensor, loss) -> tuple[dict, dict]:
    """`loss` on two half-batch forwards joined as OpenCLIP's --accum-freq path joins them
    (torch.cat of every output value along the batch), and on one forward of the whole batch."""
    half = images.shape[0] // 2
    outs = [model(images[i:i + half], texts[i:i + half]) for i in (0, half)]
    scale = outs[0].pop("logit_scale")
    outs[1].pop("logit_scale")
    joined = {key: torch.cat([o[key] for o in outs]) for key in outs[0]}
    whole = model(images, texts)
    whole.pop("logit_scale")
    return (loss(**joined, logit_scale=scale, output_dict=True),
            loss(**whole, logit_scale=scale, output_dict=True))


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny model's OpenCLIP tokenizer."""
    import open_clip

    open_clip.add_model_config(str(TINY_MODEL_CONFIG))
    return open_clip.get_tokenizer(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_model_config() -> str:
    return str(TINY_MODEL_CONFIG)


@pytest.fixture(scope="session")
def scene_shards(tmp_path_factory) -> str:
    """64 rendered scenes in 2 webdataset shards; returns the --train-data spec."""
    from open_clip_hn.scenes import shards_spec, write_scene_shards

    out = tmp_path_factory.mktemp("shards")
    return shards_spec(write_scene_shards(str(out), num_samples=64, samples_per_shard=32, seed=0))


@pytest.fixture(scope="session")
def scene_csv(tmp_path_factory) -> str:
    """32 rendered scenes as PNG files and an OpenCLIP CSV (tab-separated filepath/title).

    OpenCLIP's CSV loader is deterministic for a seed (its webdataset sample shuffle is not),
    so exact comparisons of whole runs use it.
    """
    from open_clip_hn.scenes import scene_sample

    out = tmp_path_factory.mktemp("csv")
    rows = ["filepath\ttitle"]
    for index in range(32):
        image, caption = scene_sample(index, seed=0)
        path = out / f"{index:04d}.png"
        image.save(path)
        rows.append(f"{path}\t{caption}")
    csv = out / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return str(csv)


def train_argv(train_data: str, logs: str, name: str, *extra: str, epochs: int = 1,
               batch_size: int = 8, num_samples: int = 32) -> list[str]:
    """A tiny, deterministic CPU training command line (OpenCLIP flags only)."""
    return [
        "--train-data", train_data,
        "--dataset-type", "csv" if train_data.endswith(".csv") else "webdataset",
        "--train-num-samples", str(num_samples), "--batch-size", str(batch_size),
        "--epochs", str(epochs), "--workers", "1", "--precision", "fp32",
        "--model", TINY_MODEL, "--model-config", str(TINY_MODEL_CONFIG),
        "--lr", "1e-3", "--warmup", "1", "--seed", "0", "--log-every-n-steps", "1",
        "--logs", logs, "--name", name, "--report-to", "none", *extra,
    ]


def env_without_nltk_data(root: Path, nltk_data: Path | None = None) -> dict[str, str]:
    """This environment with none of the machine's NLTK data in sight: HOME under `root`,
    NLTK_DATA `nltk_data` (default: an empty folder name under `root`) and a WordNet cache of
    its own under `root`."""
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    env.update(HOME=str(root / "home"), NLTK_DATA=str(nltk_data or root / "none"),
               OPEN_CLIP_HN_CACHE=str(root / "cache"))
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_module(module: str, argv: list[str], timeout: int = 300, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """Run `python -m module argv` in a fresh process; fail the test with its output on error."""
    cmd = [sys.executable, "-m", module, *argv]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


# a small online hard-negative configuration for whole-run tests (choice term and negatives in itc)
HN_ONLINE_CHOICE = ["--hn-negatives", "online", "--hn-num-negatives", "2", "--hn-loss", "itc,choice"]


def load_checkpoint(logs: Path, name: str, file: str) -> dict:
    """A run's checkpoint file (`logs/name/checkpoints/file`) as saved, on CPU."""
    return torch.load(logs / name / "checkpoints" / file, map_location="cpu", weights_only=False)


def same_weights(a: dict, b: dict) -> bool:
    """Two state dicts with the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_steps(logs: Path, name: str) -> int:
    """Optimizer steps logged over all starts of a run (OpenCLIP logs every step here)."""
    return sum(1 for line in (logs / name / "out.log").read_text().splitlines()
               if "Train Epoch" in line)


def start_training(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    """`python -m open_clip_hn.train argv` in the background, to be signalled mid-run (in its
    own process group, which `os.killpg` signals with its loader workers, as `scancel` does)."""
    return subprocess.Popen([sys.executable, "-m", "open_clip_hn.train", *argv], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_steps(log: Path, steps: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until `log` records `steps` training steps; fail with the run's output if it ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and log.read_text().count("Train Epoch") >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read()[-4000:])
        time.sleep(0.05)
    raise AssertionError(f"no {steps} steps logged in {log}")
