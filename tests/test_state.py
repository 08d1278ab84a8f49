"""Plugin state files: atomic, keyed by the checkpoint's epoch, pruned like OpenCLIP's files."""

from __future__ import annotations

import os

import torch

from open_clip_hn.state import find_state, prune_states, save_state, state_path


def touch_checkpoint(folder, name: str, epoch: int) -> str:
    path = os.path.join(folder, name)
    torch.save({"epoch": epoch, "state_dict": {}}, path)
    return path


def test_latest_checkpoint_finds_the_state_of_its_own_epoch(tmp_path):
    save_state(str(tmp_path), 1, {"loss": {"step": 4}})
    save_state(str(tmp_path), 2, {"loss": {"step": 8}})
    latest = touch_checkpoint(tmp_path, "epoch_latest.pt", 1)  # killed before epoch 2's save
    path, state = find_state(latest, 1)
    assert path == state_path(str(tmp_path), 1) and state["loss"]["step"] == 4


def test_a_state_of_another_epoch_is_never_used(tmp_path):
    save_state(str(tmp_path), 3, {"loss": {"step": 12}})
    os.replace(state_path(str(tmp_path), 3), tmp_path / "epoch_2.pt.hn")  # mislabelled file
    assert find_state(touch_checkpoint(tmp_path, "epoch_2.pt", 2), 2) is None


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    save_state(str(tmp_path), 1, {"loss": {"step": 1}})
    save_state(str(tmp_path), 1, {"loss": {"step": 2}})
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pt.hn"]
    assert find_state(str(tmp_path / "epoch_1.pt"), 1)[1]["loss"]["step"] == 2


def test_prune_keeps_previous_epoch_and_states_with_checkpoints(tmp_path):
    for epoch in range(1, 6):
        save_state(str(tmp_path), epoch, {"loss": {}})
    touch_checkpoint(tmp_path, "epoch_2.pt", 2)  # kept by OpenCLIP (--save-frequency)
    prune_states(str(tmp_path), 5)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".hn")) == [
        "epoch_2.pt.hn", "epoch_4.pt.hn", "epoch_5.pt.hn"]
