"""The model a checkpoint was trained as: recorded beside it, checked by eval."""

from __future__ import annotations

import os

import pytest

from open_clip_hn import eval as hn_eval
from open_clip_hn import provenance

CONFIG = os.path.join(os.path.dirname(hn_eval.__file__), "model_configs", "hn-tiny-vit.json")


def test_mismatch_messages():
    config = {"embed_dim": 8}
    record = provenance.model_record("ViT-B-32-quickgelu", "openai", config)
    assert provenance.model_mismatch(record, "ViT-B-32-quickgelu", dict(config)) is None
    message = provenance.model_mismatch(record, "ViT-B-32", {"embed_dim": 8, "quick_gelu": False})
    assert "trained as --model ViT-B-32-quickgelu, not --model ViT-B-32" in message
    assert "QuickGELU vs GELU" in message
    edited = provenance.model_mismatch(record, "ViT-B-32-quickgelu", {"embed_dim": 16})
    assert "another architecture" in edited and provenance.config_digest(config)[:12] in edited
    assert provenance.model_mismatch(record, "ViT-B-32-quickgelu", None) is None  # unknown: name only


def test_sidecars_are_atomic_named_after_the_checkpoint_and_pruned(tmp_path):
    record = provenance.model_record("m", None, None)
    for epoch in (1, 2):
        (tmp_path / f"epoch_{epoch}.pt").write_bytes(b"x")
    provenance.write_sidecars([str(tmp_path / "epoch_1.pt")], record)
    os.remove(tmp_path / "epoch_1.pt")  # --delete-previous-checkpoint
    provenance.write_sidecars([str(tmp_path / "epoch_2.pt"), str(tmp_path / "epoch_latest.pt")],
                              record)
    assert sorted(os.listdir(tmp_path)) == ["epoch_2.pt", "epoch_2.pt.json", "epoch_latest.pt.json"]
    assert provenance.read_sidecar(str(tmp_path / "epoch_2.pt")) == record
    (tmp_path / "epoch_2.pt.json").write_text("{broken")
    with pytest.raises(ValueError, match="epoch_2.pt.json: unreadable model record"):
        provenance.read_sidecar(str(tmp_path / "epoch_2.pt"))


def test_eval_refuses_another_model_naming_both(tmp_path, capsys):
    checkpoint = tmp_path / "epoch_1.pt"
    checkpoint.write_bytes(b"never loaded")
    provenance.write_sidecars([str(checkpoint)], provenance.model_record("ViT-B-32-quickgelu",
                                                                         "openai", None))
    with pytest.raises(SystemExit):
        hn_eval.main(["--model", "ViT-B-32", "--pretrained", str(checkpoint),
                      "--compositional", str(tmp_path / "not-read")])
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint}: it was trained as --model ViT-B-32-quickgelu, not --model " \
           "ViT-B-32" in err and "--allow-model-mismatch" in err


def test_without_a_sidecar_the_plugin_state_says_what_a_checkpoint_was_trained_as(tmp_path, capsys):
    """A step checkpoint (the record inside its plugin state) and an epoch checkpoint whose
    `.json` was lost (the record in `epoch_N.pt.hn` beside it) are checked like a sidecar's; a
    plain OpenCLIP checkpoint or a damaged state gives no record (nothing to check)."""
    import torch

    from open_clip_hn import state

    record = provenance.model_record("ViT-B-32-quickgelu", "openai", None)
    step = tmp_path / "epoch_1_step_40.pt"
    torch.save({"epoch": 1, "state_dict": {}, state.EMBEDDED_STATE_KEY: {"trained_as": record}}, step)
    epoch = tmp_path / "epoch_2.pt"
    torch.save({"epoch": 2, "state_dict": {}}, epoch)
    state.save_state(str(tmp_path), 2, {"trained_as": record})
    plain = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {}}, plain)
    (tmp_path / "epoch_3.pt.hn").write_bytes(b"cut")
    assert provenance.read_record(str(step)) == record
    assert provenance.read_record(str(epoch)) == record
    assert provenance.read_record(str(plain)) is None
    for checkpoint in (step, epoch):
        with pytest.raises(SystemExit):
            hn_eval.main(["--model", "ViT-B-32", "--pretrained", str(checkpoint),
                          "--compositional", str(tmp_path / "not-read")])
        assert f"checkpoint {checkpoint}: it was trained as --model ViT-B-32-quickgelu" in capsys.readouterr().err


def test_allow_model_mismatch_warns_and_evaluates(tmp_path, caplog):
    import open_clip
    import torch

    from open_clip_hn import scenes

    open_clip.add_model_config(CONFIG)
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": open_clip.create_model("hn-tiny-vit").state_dict()},
               checkpoint)
    (tmp_path / "sets").mkdir()
    scenes.write_compositional_sets(str(tmp_path / "sets"), num_items=4, num_pairs=2, num_retrieval=4)
    provenance.write_sidecars([str(checkpoint)], provenance.model_record("hn-other", None, None))
    document = hn_eval.main(["--model", "hn-tiny-vit", "--model-config", CONFIG, "--pretrained",
                             str(checkpoint), "--compositional", str(tmp_path / "sets"),
                             "--allow-model-mismatch"])
    assert "trained as --model hn-other, not --model hn-tiny-vit" in caplog.text
    assert document["runs"][0]["results"]


class _Payload:
    """Unpickling it runs code: a downloaded file may hold such an object."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_reading_a_record_never_runs_code_in_a_checkpoint(tmp_path):
    """eval reads the record of every --pretrained file before OpenCLIP loads it: a file of any
    name is read weights-only, as OpenCLIP reads it, so a pickle that runs code is not run."""
    import torch

    from open_clip_hn.provenance import read_record

    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "payload": _Payload(str(marker))}, tmp_path / "downloaded.pt")
    assert read_record(str(tmp_path / "downloaded.pt")) is None
    assert not marker.exists()
