"""Plugin state files: atomic, keyed by the checkpoint's epoch, pruned like OpenCLIP's files."""

from __future__ import annotations

import os

import pytest
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


# ---------------------------------------------------------------------------- validation on load


def test_damaged_foreign_and_non_finite_states_are_refused_naming_the_file(tmp_path):
    import pytest

    from open_clip_hn.state import StateError, read_state

    path = save_state(str(tmp_path), 1, {"loss": {"bank": torch.randn(4, 3), "step": 4}})
    assert read_state(path)["loss"]["step"] == 4
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])  # killed mid-write (an older, non-atomic writer)
    with pytest.raises(StateError, match=f"plugin state {path} cannot be read.*previous checkpoint.*--hn-drop-state"):
        read_state(path)
    torch.save({"state_dict": {}}, path)  # a model checkpoint renamed to .hn
    with pytest.raises(StateError, match="not an open_clip_hn plugin state"):
        read_state(path)
    torch.save({"version": 99, "epoch": 1}, path)
    with pytest.raises(StateError, match="version 99 is not 1"):
        read_state(path)
    bank = torch.randn(4, 3)
    bank[2, 1] = float("nan")
    save_state(str(tmp_path), 1, {"loss": {"bank": bank, "thresholds": [0.1, float("inf")]}})
    with pytest.raises(StateError, match=r"non-finite values in loss\.bank \(1 of 12 values\)"):
        read_state(path)
    save_state(str(tmp_path), 1, {"loss": {"thresholds": [0.1, float("inf")]}})
    with pytest.raises(StateError, match=r"loss\.thresholds\.1 \(= inf\)"):
        find_state(str(tmp_path / "epoch_1.pt"), 1)
    assert isinstance(StateError("x"), ValueError)


# ---------------------------------------------------------------------------- --resume latest


def _truncate(path) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def test_latest_good_pair_skips_a_truncated_checkpoint_and_a_bad_state(tmp_path, caplog):
    from open_clip_hn.state import latest_good_checkpoint

    folder = str(tmp_path)
    assert latest_good_checkpoint(folder, with_state=True) is None
    for epoch in (1, 2, 3, 10):
        torch.save({"epoch": epoch, "state_dict": {"w": torch.ones(4096)}}, tmp_path / f"epoch_{epoch}.pt")
        save_state(folder, epoch, {"loss": {"step": epoch}})
    assert latest_good_checkpoint(folder, with_state=True) == (
        str(tmp_path / "epoch_10.pt"), state_path(folder, 10))  # natural order: 10 after 3
    _truncate(tmp_path / "epoch_10.pt")  # killed while OpenCLIP wrote it in place
    save_state(folder, 3, {"loss": {"bank": torch.tensor([float("nan")])}})
    with caplog.at_level("WARNING"):
        assert latest_good_checkpoint(folder, with_state=True) == (
            str(tmp_path / "epoch_2.pt"), state_path(folder, 2))
    assert f"skipping {tmp_path / 'epoch_10.pt'}: checkpoint" in caplog.text
    assert f"skipping {tmp_path / 'epoch_3.pt'}" in caplog.text and "non-finite" in caplog.text
    # without the plugin the state does not matter; the missing state of epoch 2 does with it
    assert latest_good_checkpoint(folder, with_state=False) == (str(tmp_path / "epoch_3.pt"), None)
    # a checkpoint without any state (plain OpenCLIP's) is not skipped: the caller decides
    os.remove(state_path(folder, 2))
    assert latest_good_checkpoint(folder, with_state=True) == (str(tmp_path / "epoch_2.pt"), None)


def test_latest_refuses_when_checkpoints_exist_and_none_is_usable(tmp_path):
    """Checkpoints that all fail must stop the run: OpenCLIP, told there is none, would train
    from scratch and write its epochs over them."""
    from open_clip_hn.state import StateError, latest_good_checkpoint

    folder = str(tmp_path)
    for epoch in (1, 2):
        torch.save({"epoch": epoch, "state_dict": {"w": torch.ones(4096)}}, tmp_path / f"epoch_{epoch}.pt")
        save_state(folder, epoch, {"loss": {"bank": torch.tensor([float("nan")])}})
    _truncate(tmp_path / "epoch_2.pt")
    with pytest.raises(StateError, match="no checkpoint in .* can be resumed") as err:
        latest_good_checkpoint(folder, with_state=True)
    assert "epoch_2.pt: checkpoint" in str(err.value) and "epoch_1.pt" in str(err.value)
    assert "--hn-drop-state" in str(err.value)
    assert latest_good_checkpoint(folder, with_state=False) == (str(tmp_path / "epoch_1.pt"), None)
    _truncate(tmp_path / "epoch_1.pt")
    with pytest.raises(StateError) as err:  # nothing reads back: no --resume PATH to offer
        latest_good_checkpoint(folder, with_state=False)
    assert "--hn-drop-state" not in str(err.value) and "move them out of" in str(err.value)


def test_every_rank_checks_resume_latest(tmp_path, caplog):
    """OpenCLIP's master alone picks for --resume latest; the plugin checks on every rank at parse
    time, so no rank is left waiting for a master that refused (and a patched OpenCLIP's own pick
    cannot start over on damaged files). Quietly: the master's pick warns."""
    import argparse

    from open_clip_hn.hooks import check_resume_latest
    from open_clip_hn.state import StateError

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": {}}, folder / "epoch_1.pt")
    save_state(str(folder), 1, {"loss": {"bank": torch.tensor([float("nan")])}})
    args = argparse.Namespace(resume="latest", logs=str(tmp_path), name="run", remote_sync=None,
                              save_most_recent=False)
    check_resume_latest(args, with_state=False)  # the weights load: usable without the plugin
    with caplog.at_level("WARNING"), pytest.raises(StateError, match="no checkpoint in .* can be resumed"):
        check_resume_latest(args, with_state=True)
    assert "skipping" not in caplog.text
    for openclips in ({"remote_sync": "s3://bucket"}, {"save_most_recent": True}, {"name": None},
                      {"resume": str(folder / "epoch_1.pt")}):  # no pick of the plugin's to check
        check_resume_latest(argparse.Namespace(**{**vars(args), **openclips}), with_state=True)


def test_a_kill_during_the_first_save_leaves_nothing_to_resume_not_an_error(tmp_path):
    """The temp file of a write cut short is not a checkpoint (OpenCLIP's own glob skips dot
    files): the run starts, as nothing was trained yet."""
    from open_clip_hn.files import TMP_PREFIX
    from open_clip_hn.state import checkpoints_newest_first, latest_good_checkpoint

    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(4096)}}, tmp_path / f"{TMP_PREFIX}n1-42-abcepoch_1.pt")
    _truncate(tmp_path / f"{TMP_PREFIX}n1-42-abcepoch_1.pt")
    assert checkpoints_newest_first(tmp_path) == []
    assert latest_good_checkpoint(str(tmp_path), with_state=True) is None


def test_set_aside_moves_only_unreadable_newest_checkpoints(tmp_path):
    from open_clip_hn.state import set_aside_broken_checkpoints

    torch.save({"epoch": 1, "state_dict": {}}, tmp_path / "epoch_1.pt")
    torch.save({"epoch": 2, "state_dict": {"w": torch.ones(4096)}}, tmp_path / "epoch_2.pt")
    torch.save({"epoch": 2, "state_dict": {"w": torch.ones(4096)}}, tmp_path / "epoch_latest.pt")
    _truncate(tmp_path / "epoch_2.pt")
    _truncate(tmp_path / "epoch_latest.pt")
    assert set_aside_broken_checkpoints(tmp_path) == [tmp_path / "epoch_latest.pt.broken",
                                                      tmp_path / "epoch_2.pt.broken"]
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pt", "epoch_2.pt.broken", "epoch_latest.pt.broken"]
    _truncate(tmp_path / "epoch_1.pt")  # none readable left: nothing moves, resume refuses
    assert set_aside_broken_checkpoints(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pt", "epoch_2.pt.broken", "epoch_latest.pt.broken"]


def test_set_aside_with_state_moves_a_readable_checkpoint_whose_state_is_damaged(tmp_path):
    """The patched route's pick: epoch 2 reads but its plugin state is cut, so with the plugin on
    it is set aside and OpenCLIP's newest-file pick becomes epoch 1's good pair."""
    from open_clip_hn.state import save_state, set_aside_broken_checkpoints

    for epoch in (1, 2):
        torch.save({"epoch": epoch, "state_dict": {}}, tmp_path / f"epoch_{epoch}.pt")
        save_state(str(tmp_path), epoch, {"step": epoch})
    _truncate(tmp_path / "epoch_2.pt.hn")
    assert set_aside_broken_checkpoints(tmp_path) == []  # the weights read: plain OpenCLIP's pick stands
    assert set_aside_broken_checkpoints(tmp_path, with_state=True) == [tmp_path / "epoch_2.pt.broken"]
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pt", "epoch_1.pt.hn", "epoch_2.pt.broken", "epoch_2.pt.hn"]


def test_atomic_torch_save_keeps_the_old_file_when_the_write_fails(tmp_path):
    from open_clip_hn.state import atomic_torch_save

    path = tmp_path / "epoch_1.pt"
    atomic_torch_save({"epoch": 1}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="killed mid-save"):
        atomic_torch_save({"epoch": 2, "x": Unpicklable()}, path)
    assert torch.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["epoch_1.pt"]


def test_state_files_beside_a_checkpoint_are_listed_without_reading_them(tmp_path):
    from open_clip_hn.state import state_files_beside

    checkpoint = touch_checkpoint(tmp_path, "epoch_2.pt", 2)
    assert state_files_beside(checkpoint, 2) == []
    (tmp_path / "epoch_2.pt.hn").write_bytes(b"damaged")  # listed, not loaded
    assert state_files_beside(checkpoint, 2) == [str(tmp_path / "epoch_2.pt.hn")]
    latest = touch_checkpoint(tmp_path, "epoch_latest.pt", 2)
    assert state_files_beside(latest, 2) == [str(tmp_path / "epoch_2.pt.hn")]


def test_step_checkpoints_with_embedded_state_sort_inside_their_epoch(tmp_path, caplog):
    import numpy as np

    from open_clip_hn.state import EMBEDDED_STATE_KEY, latest_good_checkpoint

    folder = str(tmp_path)
    torch.save({"epoch": 1, "state_dict": {}}, tmp_path / "epoch_1.pt")
    save_state(folder, 1, {"loss": {"step": 1}})
    step = tmp_path / "epoch_1_step_30.pt"  # mid-epoch: state and RNG (numpy) inside
    torch.save({"epoch": 1, "state_dict": {}, "rng": np.random.get_state(),
                EMBEDDED_STATE_KEY: {"loss": {"bank": torch.zeros(2)}}}, step)
    assert latest_good_checkpoint(folder, with_state=True) == (str(step), str(step))
    torch.save({"epoch": 1, "state_dict": {},
                EMBEDDED_STATE_KEY: {"loss": {"bank": torch.tensor([float("nan")])}}}, step)
    with caplog.at_level("WARNING"):
        assert latest_good_checkpoint(folder, with_state=True)[0] == str(tmp_path / "epoch_1.pt")
    assert "hn_state.loss.bank" in caplog.text


def test_a_legacy_format_checkpoint_is_readable(tmp_path):
    """torch's pre-1.6 format cannot be memory-mapped: it is read whole, as OpenCLIP would, not
    refused as damaged (a plain `--resume latest` over such a folder resumes it)."""
    from open_clip_hn.state import latest_good_checkpoint, read_checkpoint

    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(3)}}, tmp_path / "epoch_1.pt",
               _use_new_zipfile_serialization=False)
    assert read_checkpoint(str(tmp_path / "epoch_1.pt"))["epoch"] == 1
    assert latest_good_checkpoint(str(tmp_path), with_state=False)[0] == str(tmp_path / "epoch_1.pt")


def test_a_missing_state_is_refused_unless_resume_latest_picked_it_without_a_way_back(tmp_path, caplog):
    """epoch_latest.pt one epoch behind its record (a kill between OpenCLIP's two saves of an
    epoch under --save-most-recent --delete-previous-checkpoint): OpenCLIP reads that file
    itself, so a refusal would fail every restart; the run goes on without the state, warned."""
    import logging

    from open_clip_hn.config import HNConfig
    from open_clip_hn.run import HardNegativeRun
    from open_clip_hn.state import MissingState

    latest = tmp_path / "epoch_latest.pt"
    latest.write_bytes(b"x")
    (tmp_path / "epoch_latest.pt.json").write_text('{"model": "hn-tiny-vit"}')  # written for epoch 3
    checkpoint = {"epoch": 2, "state_dict": {}}
    config = HNConfig(negatives="online", loss=("itc",), given=("--hn-negatives",))
    with pytest.raises(MissingState, match="is missing.*--hn-drop-state"):
        HardNegativeRun(config).checkpoint_loaded(str(latest), checkpoint)
    run = HardNegativeRun(config)
    with caplog.at_level(logging.WARNING):
        run.checkpoint_loaded(str(latest), checkpoint, picked=True)
    assert run.pending_state is None and "cannot fall back, so the run goes on without it" in caplog.text
