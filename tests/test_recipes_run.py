"""Every recipe trains a step through `python -m open_clip_hn.train`; print-config via the CLI."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_module, train_argv

from open_clip_hn.neighbors import build
from open_clip_hn.scenes import sample_scene

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def neighbor_index(scene_shards, tiny_model_config, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("recipe-neighbors"))
    build(scene_shards, "hn-tiny-vit", out, model_config=tiny_model_config, k=4)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_one_step(recipe: Path, scene_shards, neighbor_index, tmp_path):
    extra = ["--hn-config", str(recipe)]
    settings = yaml.safe_load(recipe.read_text())
    if "hn-image-neighbors-per-sample" in settings:
        extra += ["--hn-image-neighbors", neighbor_index]
    if settings.get("hn-plausibility") == "train-data":  # 64 captions in the test shards: too few
        captions = tmp_path / "captions.txt"
        captions.write_text("\n".join(sample_scene(random.Random(i)).caption for i in range(400)))
        extra += ["--hn-plausibility", str(captions)]
    if isinstance(settings.get("hn-curriculum-warmup"), int):  # a warmup in steps outlasts 1 step
        extra += ["--hn-curriculum-warmup", "0"]
    argv = train_argv(scene_shards, str(tmp_path), recipe.stem, *extra, batch_size=8, num_samples=8)
    run_module("open_clip_hn.train", argv)
    log = (tmp_path / recipe.stem / "out.log").read_text()
    assert "Train Epoch: 0 [8/8 (100%)]" in log.replace("[ 8/8", "[8/8")
    assert f"Hard-negative recipe: {recipe}" in log
    assert (tmp_path / recipe.stem / "checkpoints" / "epoch_1.pt").exists()
    if "--hn-image-neighbors" in extra:
        assert "Hard image negatives: each sample is followed by" in log


def test_a_warmup_longer_than_the_run_is_refused_before_the_runs_folder(scene_shards, tmp_path):
    """The recommended recipe's 117-step warmup over a 4-step run trained vanilla OpenCLIP and
    exited 0 after a warning. With --train-num-samples the command line decides the steps: the
    run and --hn-print-config refuse it before OpenCLIP makes the run's folder (which would
    block a rerun under the same --name)."""
    import subprocess
    import sys

    argv = train_argv(scene_shards, str(tmp_path), "short", "--hn-config", "recommended",
                      "--hn-plausibility", "none", batch_size=8, num_samples=32)
    for extra in ([], ["--hn-print-config"]):
        proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv, *extra],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "the curriculum leaves no step with hard negatives (--hn-curriculum-warmup 117: 117 of " \
               "the run's 4 steps" in proc.stderr
        assert not (tmp_path / "short").exists()


def test_a_warmup_longer_than_a_csv_run_is_refused_in_the_log_too(scene_csv, tmp_path):
    """A CSV's size is known once OpenCLIP reads it: the refusal comes then, in out.log too (it
    went to stderr only), naming the experiment folder OpenCLIP made, which blocks the --name."""
    import subprocess
    import sys

    argv = train_argv(scene_csv, str(tmp_path), "short", "--hn-config", "recommended",
                      "--hn-plausibility", "none", batch_size=8)
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the curriculum leaves no step with hard negatives (--hn-curriculum-warmup 117: 117 of " \
           "the run's 4 steps" in proc.stderr
    assert f"OpenCLIP made the run's folder {tmp_path / 'short'} before this check" in proc.stderr
    assert "leaves no step with hard negatives" in (tmp_path / "short" / "out.log").read_text()
    assert not (tmp_path / "short" / "checkpoints" / "epoch_1.pt").exists()


def test_print_config_shows_the_recipe_plus_overrides(scene_shards, tmp_path):
    recipe = REPO / "configs" / "cm-hnco.yaml"
    proc = run_module("open_clip_hn.train", [
        "--hn-config", str(recipe), "--hn-memory-bank-size", "128", "--batch-size", "4",
        "--train-data", scene_shards, "--hn-print-config"])
    printed = yaml.safe_load(proc.stdout)
    expected = yaml.safe_load(recipe.read_text())
    expected.update({"hn-memory-bank-size": 128, "batch-size": 4, "train-data": scene_shards})
    expected["hn-loss"] = ",".join(expected["hn-loss"])
    assert {key: printed[key] for key in expected} == expected
    assert not (tmp_path / "logs").exists()
