"""The benchmark scripts run at their smallest settings and print what README says they print
(timings themselves are never asserted: they live in the printed tables)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO


def run_benchmark(script: str, *argv: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *argv], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_objectives_benchmark_times_every_term_local_included():
    """The `local` row crashed: its hooked model saw no packed-forward mark, so no tokens."""
    out = run_benchmark("objectives.py", "--batch-size", "8", "--rounds", "1", "--loss-reps", "1",
                        "--threads", "1", "--bank-size", "64")
    for row in ("itc", "choice", "mined", "distill (ema)", "local", "mirror + converse"):
        assert re.search(rf"^{re.escape(row)}\s+\d", out, re.M), row
    assert "vanilla (same texts)" in out


@pytest.mark.slow
def test_negatives_benchmark_shares_are_of_the_captions_scored():
    """Below 2,000 captions each type's share was divided by 2,000 (10% where it was 100%)."""
    out = run_benchmark("negatives.py", "--captions", "300", "--k", "2")
    shares = {name: int(share) for name, share in
              re.findall(r"only (\w+)\s+[\d,]+ captions/s\s+applies to (\d+)%", out)}
    assert len(shares) == 9 and all(0 <= share <= 100 for share in shares.values())
    assert shares["replace_object"] >= 50  # nearly every composed caption has an object


@pytest.mark.slow
def test_step_save_benchmark_takes_a_model_config_and_names_a_missing_folder(tmp_path):
    config = REPO / "open_clip_hn" / "model_configs" / "hn-tiny-vit.json"
    out = run_benchmark("step_save.py", "--model", "hn-tiny-vit", "--model-config", str(config),
                        "--repeats", "1", "--dir", str(tmp_path))
    assert re.search(r"^ratio step/plain: \d+\.\d+", out, re.M)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_save.py"), "--dir",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"--dir {tmp_path / 'missing'}: no such folder" in proc.stderr


def _plan_ablation(monkeypatch, tmp_path, *argv: str) -> tuple[list[list[str]], str]:
    """benchmarks/ablate_demo.py's runs (training command lines, in order) and its printout, with
    rendering, training and scoring replaced by records."""
    import types

    from conftest import load_benchmark

    module = load_benchmark("ablate_demo")
    runs: list[list[str]] = []
    data = types.SimpleNamespace(train="TRAIN", val="VAL", test="TEST")
    monkeypatch.setattr(module.demo, "prepare_data", lambda *a, **k: data)
    monkeypatch.setattr(module.demo, "train_argv",
                        lambda data, logs, name, epochs, pretrained=None, extra=(), **k:
                        [name, f"pretrained={pretrained}", *extra])
    monkeypatch.setattr(module.demo, "run_stamp", lambda argv: {"argv": argv})
    monkeypatch.setattr(module.demo, "run_training",
                        lambda argv, logs, name, epochs, quiet=False: runs.append(argv) or f"{name}.pt")
    scores = {bench: {**{name: {"acc": 0.5} for name, _ in module.KEYS if name not in (
        "relation_pairs", "retrieval")}, "relation_pairs": {"group": 0.0},
        "retrieval": {"image_to_text_R@1": 0.5}} for bench in ("val", "test")}
    monkeypatch.setattr(module.demo, "evaluate_checkpoints",
                        lambda checkpoints, *a, **k: {name: scores for name in checkpoints})
    output = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: output.append(" ".join(map(str, a))))
    monkeypatch.setattr(sys, "argv", ["ablate_demo.py", "--output-dir", str(tmp_path), *argv])
    module.main()
    return runs, "\n".join(output)


def test_ablate_demo_continues_the_pretrained_model(monkeypatch, tmp_path):
    """Every row continues the vanilla-pretrained model: session 31 left the pretraining under the
    branch for a missing vanilla row, so the default rows trained from random weights."""
    runs, _ = _plan_ablation(monkeypatch, tmp_path, "--only", "vanilla;recommended.yaml")
    assert [run[0] for run in runs] == ["pretrain", "vanilla", "recommended-yaml"]
    assert runs[0][1] == "pretrained=None"
    assert all(run[1] == "pretrained=pretrain.pt" for run in runs[1:]), runs


def test_ablate_demo_compares_the_shipped_recipes(monkeypatch, tmp_path):
    """--recipes: vanilla and one row per shipped recipe by name; on the demo's ResNet the recipe
    with the `local` term (fsc-clip) is skipped with the reason, on a ViT it runs."""
    from open_clip_hn.recipes import recipe_names

    runs, printed = _plan_ablation(monkeypatch, tmp_path, "--recipes")
    trained = {run[0]: run for run in runs}
    expected = [name for name in recipe_names() if name != "fsc-clip"]
    assert "recipe-fsc-clip" not in trained and "recipe fsc-clip: skipped" in printed
    assert "ResNet" in printed
    for name in expected:
        row = trained["recipe-" + name]
        assert row[-2:] == ["--hn-config", name] and row[1] == "pretrained=pretrain.pt"
    assert "vanilla" in trained
    vit = str(REPO / "open_clip_hn" / "model_configs" / "hn-tiny-vit.json")
    runs, printed = _plan_ablation(monkeypatch, tmp_path / "vit", "--recipes", "--model-config", vit)
    assert "recipe-fsc-clip" in {run[0] for run in runs} and "skipped" not in printed
