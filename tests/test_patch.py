"""patches/: OpenCLIP's plugin hook points, applied to a copy of the installed `open_clip_train`.

The patched route (`python -m open_clip_train.main --plugins open_clip_hn`) must train exactly like
the monkeypatch route (`python -m open_clip_hn.train`), and the patched trainer without plugins
exactly like OpenCLIP itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip_train
import pytest
import torch

from conftest import REPO, TINY_MODEL_CONFIG, same_weights, train_argv, wait_for_steps

PATCH = REPO / "patches" / "open_clip_train-plugins.patch"
INSTALLED = Path(open_clip_train.__file__).parent
HN_ONLINE = ["--hn-negatives", "online", "--hn-num-negatives", "2", "--hn-loss", "itc"]
VANILLA = ("import open_clip, sys; open_clip.add_model_config(sys.argv.pop(1)); "
           "import open_clip_train.main as m; m.main(sys.argv[1:])")


def copy_openclip_train(site: Path) -> Path:
    """A copy of the installed `open_clip_train` package under `site` (never the original)."""
    shutil.copytree(INSTALLED, site / "open_clip_train", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def apply_patch(site: Path, *flags: str) -> subprocess.CompletedProcess:
    """The command patches/README.md gives for an installed package: `patch -p1 -N` in site-packages."""
    with open(PATCH) as patch_file:
        return subprocess.run(["patch", "-p1", "-N", *flags], stdin=patch_file, cwd=site,
                              capture_output=True, text=True, timeout=60)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def patched_site(tmp_path_factory) -> Path:
    assert shutil.which("patch"), "the tests apply the patch with GNU patch: apt-get install patch"
    site = copy_openclip_train(tmp_path_factory.mktemp("site"))
    for flags in (["--dry-run"], []):
        proc = apply_patch(site, *flags)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return site


def run(argv: list[str], site: Path | None = None, module: str | None = None) -> subprocess.CompletedProcess:
    """`python -m module argv` (or vanilla OpenCLIP with the tiny model registered), with
    `open_clip_train` resolved from `site` when given, and no plugin enabled by the environment."""
    env = {k: v for k, v in os.environ.items() if k != "OPEN_CLIP_TRAIN_PLUGINS"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    if module is None:
        i = argv.index("--model-config")
        cmd = ["-c", VANILLA, str(TINY_MODEL_CONFIG), *argv[:i], *argv[i + 2:]]
    else:
        cmd = ["-m", module, *argv]
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def logged_losses(logs: Path, name: str) -> list[str]:
    lines = (logs / name / "out.log").read_text().splitlines()
    return [line.split("Contrastive_loss:")[1].split()[0] for line in lines if "Train Epoch" in line]


def final_weights(logs: Path, name: str, epoch: int = 1) -> dict[str, torch.Tensor]:
    return torch.load(logs / name / "checkpoints" / f"epoch_{epoch}.pt", weights_only=False)["state_dict"]


def assert_same_run(logs: Path, first: str, second: str) -> None:
    losses = logged_losses(logs, first)
    assert len(losses) == 4 and losses == logged_losses(logs, second)
    a, b = final_weights(logs, first), final_weights(logs, second)
    assert same_weights(a, b)


def test_patch_fits_the_installed_openclip(patched_site):
    from importlib.metadata import version

    assert version("open_clip_torch") == "3.3.0"
    installed, patched = tree_bytes(INSTALLED), tree_bytes(patched_site / "open_clip_train")
    changed = {name for name in patched if installed.get(name) != patched[name]}
    assert changed == {"main.py", "params.py", "plugins.py"} and "plugins.py" not in installed


def test_patch_refuses_a_tree_it_does_not_fit(patched_site, tmp_path):
    again = apply_patch(patched_site, "--dry-run")
    assert again.returncode != 0 and "previously applied" in again.stdout

    other = copy_openclip_train(tmp_path)  # stands in for an OpenCLIP whose main() moved on
    main_py = other / "open_clip_train" / "main.py"
    main_py.write_text(main_py.read_text().replace("    loss = create_loss(args)\n",
                                                   "    loss = create_loss(args, model)\n"))
    before = tree_bytes(other)
    refused = subprocess.run(f"patch -p1 -N --dry-run < {PATCH} && patch -p1 -N < {PATCH}",
                             shell=True, cwd=other, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "FAILED" in refused.stdout
    assert tree_bytes(other) == before  # the dry run stopped it: nothing half-applied


def test_install_prefers_the_official_hooks(patched_site):
    check = ("import os, open_clip_hn, open_clip_train.main as m, open_clip_train.data as d; "
             "open_clip_hn.install(); open_clip_hn.install(); "
             "assert m.get_data is d.get_data, 'monkeypatched'; "
             "print(os.environ['OPEN_CLIP_TRAIN_PLUGINS'])")
    env = {**os.environ, "PYTHONPATH": str(patched_site), "OPEN_CLIP_TRAIN_PLUGINS": "other"}
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["other,open_clip_hn"]


@pytest.mark.slow
def test_patched_route_trains_like_the_monkeypatch_route(patched_site, scene_csv, tmp_path):
    twice = [*HN_ONLINE, "--hn-num-negatives", "2"]  # a warning while the command line is read
    procs = [run(train_argv(scene_csv, str(tmp_path), "patched", "--plugins", "open_clip_hn", *twice),
                 site=patched_site, module="open_clip_train.main"),
             run(train_argv(scene_csv, str(tmp_path), "monkeypatched", *twice), module="open_clip_hn.train")]
    assert_same_run(tmp_path, "patched", "monkeypatched")
    warning = "--hn-num-negatives is given 2 times on the command line"
    for name, proc in zip(("patched", "monkeypatched"), procs):
        assert (tmp_path / name / "checkpoints" / "epoch_1.pt.hn").is_file()
        # printed once and kept in out.log; the run's own lines are not printed twice after it
        assert proc.stderr.count(warning) == 1 and "INFO:root:" not in proc.stderr, proc.stderr[-3000:]
        assert (tmp_path / name / "out.log").read_text().count(warning) == 1
    assert "plugins: ['open_clip_hn']" in (tmp_path / "patched" / "params.txt").read_text()

    run(train_argv(scene_csv, str(tmp_path), "patched", "--plugins", "open_clip_hn", *HN_ONLINE,
                   "--resume", "latest", epochs=2), site=patched_site, module="open_clip_train.main")
    log = (tmp_path / "patched" / "out.log").read_text()
    assert "=> found hard-negative state" in log and "=> restored hard-negative state" in log
    assert (tmp_path / "patched" / "checkpoints" / "epoch_2.pt.hn").is_file()
    # the newest checkpoint's plugin state is damaged: the plugin's pick falls back to epoch 1's
    # pair, as on the monkeypatch route (a patched OpenCLIP's own pick stopped on epoch 2's state)
    (tmp_path / "patched" / "checkpoints" / "epoch_2.pt.hn").write_bytes(b"cut")
    run(train_argv(scene_csv, str(tmp_path), "patched", "--plugins", "open_clip_hn", *HN_ONLINE,
                   "--resume", "latest", epochs=2), site=patched_site, module="open_clip_train.main")
    checkpoints = tmp_path / "patched" / "checkpoints"
    assert f"=> resuming checkpoint '{checkpoints / 'epoch_1.pt'}'" in (tmp_path / "patched" / "out.log").read_text()
    assert (checkpoints / "epoch_2.pt.broken").is_file() and (checkpoints / "epoch_2.pt.hn").is_file()


@pytest.mark.slow
def test_patched_route_deletes_the_previous_state_and_record(patched_site, scene_csv, tmp_path):
    run(train_argv(scene_csv, str(tmp_path), "patched", "--plugins", "open_clip_hn", *HN_ONLINE,
                   "--delete-previous-checkpoint", epochs=2),
        site=patched_site, module="open_clip_train.main")
    left = sorted(os.listdir(tmp_path / "patched" / "checkpoints"))
    assert left == ["epoch_2.pt", "epoch_2.pt.hn", "epoch_2.pt.json"]


@pytest.mark.slow
def test_patched_trainer_without_plugins_is_openclip(patched_site, scene_csv, tmp_path):
    run(train_argv(scene_csv, str(tmp_path), "patched"), site=patched_site)
    run(train_argv(scene_csv, str(tmp_path), "vanilla"))
    assert_same_run(tmp_path, "patched", "vanilla")
    assert "plugins: []" in (tmp_path / "patched" / "params.txt").read_text()


def test_unknown_plugin_fails_naming_it(patched_site, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(patched_site)}
    proc = subprocess.run([sys.executable, "-m", "open_clip_train.main", "--plugins", "open_clip_nope"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "--plugins open_clip_nope: no plugin of that name is installed" in proc.stderr
    assert "installed: open_clip_hn" in proc.stderr


def test_a_misspelled_hook_is_an_error(patched_site):
    """A plugin method that is not a hook (`epoch_ends`) would silently never be called: refused,
    naming the hook it resembles. The plugin's own object passes the same check."""
    check = ("from open_clip_train.plugins import Plugins; from open_clip_hn.hooks import Plugin\n"
             "Plugins({'open_clip_hn': Plugin()})\n"
             "class Typo:\n    def epoch_ends(self, *a): pass\n    def _helper(self): pass\n"
             "Plugins({'typo': Typo()})\n")
    env = {**os.environ, "PYTHONPATH": str(patched_site)}
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode != 0
    assert "plugin 'typo': method 'epoch_ends' is not a hook" in proc.stderr
    assert "did you mean 'epoch_end'?" in proc.stderr and "_helper" not in proc.stderr


@pytest.mark.slow
def test_patched_route_saves_and_resumes_inside_an_epoch(patched_site, scene_csv, tmp_path):
    """The patch's train_one_epoch hook carries the step checkpoints: SIGTERM mid-epoch on the
    patched trainer, resume there, and the weights equal an uninterrupted monkeypatched run's."""
    import signal

    argv = lambda name: train_argv(scene_csv, str(tmp_path), name, *HN_ONLINE, epochs=2)  # noqa: E731
    run(argv("whole"), module="open_clip_hn.train")
    env = {k: v for k, v in os.environ.items() if k != "OPEN_CLIP_TRAIN_PLUGINS"}
    env["PYTHONPATH"] = str(patched_site)
    cut = [*argv("cut"), "--plugins", "open_clip_hn"]
    proc = subprocess.Popen([sys.executable, "-m", "open_clip_train.main", *cut], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(tmp_path / "cut" / "out.log", 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) == -signal.SIGTERM
    assert list((tmp_path / "cut" / "checkpoints").glob("epoch_*_step_*.pt"))
    run([*cut, "--resume", "latest"], site=patched_site, module="open_clip_train.main")
    assert "is a step checkpoint" in (tmp_path / "cut" / "out.log").read_text()
    # the patch's checkpoint_saved hook: epoch_2.pt supersedes the step checkpoint
    assert not list((tmp_path / "cut" / "checkpoints").glob("epoch_*_step_*.pt"))
    a, b = final_weights(tmp_path, "whole", 2), final_weights(tmp_path, "cut", 2)
    assert same_weights(a, b)
