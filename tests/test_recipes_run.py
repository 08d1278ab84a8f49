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
    argv = train_argv(scene_shards, str(tmp_path), recipe.stem, *extra, batch_size=8, num_samples=8)
    run_module("open_clip_hn.train", argv)
    log = (tmp_path / recipe.stem / "out.log").read_text()
    assert "Train Epoch: 0 [8/8 (100%)]" in log.replace("[ 8/8", "[8/8")
    assert f"Hard-negative recipe: {recipe}" in log
    assert (tmp_path / recipe.stem / "checkpoints" / "epoch_1.pt").exists()
    if "--hn-image-neighbors" in extra:
        assert "Hard image negatives: each sample is followed by" in log


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
