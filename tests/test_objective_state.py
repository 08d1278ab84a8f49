"""Curriculum, rank thresholds, step counting under --accum-freq, and exact resume of the state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from open_clip_hn.config import HNConfig
from open_clip_hn.curriculum import RankThresholds, curriculum_value, negative_keep_mask
from open_clip_hn.objective import HardNegativeLoss
from open_clip_hn.packing import PackedOutputs

B, K, D = 4, 2, 8
SCALE = torch.tensor(5.0)


def step_batch(step: int):
    g = torch.Generator().manual_seed(step)
    image = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(B * (1 + K), D, generator=g), dim=-1)
    mask = torch.rand(B, K, generator=g) > 0.2
    types = torch.randint(0, 9, (B, K), generator=g).masked_fill(~mask, -1)
    return image, text, mask, types


def call(loss: HardNegativeLoss, step: int):
    image, text, mask, types = step_batch(step)
    return loss(image, text, SCALE, PackedOutputs(mask, types), output_dict=True)


def full_config(**kw) -> HNConfig:
    return HNConfig(negatives="online", num_negatives=K, loss=("itc", "choice", "intra", "rank", "mined"),
                    memory_bank_size=10, mined_k=3, curriculum="linear", curriculum_warmup=1,
                    curriculum_start=0.5, curriculum_end=1.0, **kw)


def run(loss: HardNegativeLoss, steps: range) -> list[dict[str, float]]:
    logs = []
    for step in steps:
        out = call(loss, step)
        sum(out.values()).backward()
        logs.append({k: v.item() for k, v in out.items()})
    return logs


@pytest.mark.parametrize("kind,expected", [
    ("const", [0, 0, 0.2, 0.2, 0.2, 0.2]),
    ("linear", [0, 0, 0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0]),
    ("cosine", [0, 0, 0.2, 0.4, 0.8, 1.0]),
    ("step", [0, 0, 0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0]),
])
def test_curriculum_schedules(kind, expected):
    """Six optimizer steps (0-5), warmup 2: `start` at step 2, `end` at the last step, 5."""
    values = [curriculum_value(s, kind=kind, warmup=2, start=0.2, end=1.0, total_steps=6) for s in range(6)]
    assert values == pytest.approx(expected, abs=1e-9)
    assert curriculum_value(6, kind=kind, warmup=2, start=0.2, end=1.0, total_steps=6) == \
        pytest.approx(0.2 if kind == "const" else 1.0)
    # the only step after the warmup is the last: `start`, the value right after the warmup
    assert curriculum_value(5, kind=kind, warmup=5, start=0.2, end=1.0, total_steps=6) == pytest.approx(0.2)


def test_a_warmup_share_is_that_part_of_the_run():
    """`--hn-curriculum-warmup 12.5%` is 117 of 937 steps and 58 of 468: a recipe's warmup stays
    the same part of a run of any length; steps are taken as given."""
    from open_clip_hn.curriculum import parse_warmup, warmup_steps

    assert parse_warmup("117") == 117 and parse_warmup("12.50%") == "12.5%"
    assert (warmup_steps("12.5%", 937), warmup_steps("12.5%", 468), warmup_steps(117, 468)) == (117, 58, 117)
    with pytest.raises(ValueError, match="share of the run's optimizer steps, but the run's length is unknown"):
        warmup_steps("12.5%", None)  # would silently be no warmup
    with pytest.raises(ValueError, match="pass total_steps"):
        HardNegativeLoss(HNConfig(curriculum_warmup="12.5%"))
    values = [curriculum_value(s, kind="const", warmup="50%", start=1.0, end=1.0, total_steps=6)
              for s in range(6)]
    assert values == [0, 0, 0, 1, 1, 1]
    for bad in ("-1", "1.5", "100%", "x%", "ten"):
        with pytest.raises(ValueError, match="share|steps"):
            parse_warmup(bad)


def test_a_warmup_share_reaches_the_trainer_and_its_printed_recipe(capsys):
    from open_clip_hn import hooks

    with pytest.raises(SystemExit) as stop:
        hooks.parse_args(["--hn-config", "recommended", "--hn-curriculum-warmup", "12.5%",
                          "--hn-print-config"])
    assert stop.value.code == 0
    assert "hn-curriculum-warmup: 12.5%" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        hooks.parse_args(["--hn-config", "recommended", "--hn-curriculum-warmup", "120%"])
    assert stop.value.code == 2
    assert "a share is a percentage in [0, 100)" in capsys.readouterr().err


def test_keep_mask_is_a_pure_function_of_seed_and_step():
    a = negative_keep_mask((64, 4), 0.5, seed=3, step=7)
    assert torch.equal(a, negative_keep_mask((64, 4), 0.5, seed=3, step=7))
    assert not torch.equal(a, negative_keep_mask((64, 4), 0.5, seed=3, step=8))
    assert 0.3 < a.float().mean() < 0.7
    assert negative_keep_mask((5, 4), 0.0, seed=0, step=0).sum() == 0


def test_warmup_uses_no_hard_negatives():
    loss = HardNegativeLoss(full_config())
    out = call(loss, 0)
    assert out["hn_curriculum"].item() == 0 and out["hn_negatives"].item() == 0
    assert out["intra_loss"].item() == 0 and out["rank_loss"].item() == 0 and out["mined_loss"].item() == 0


def test_rank_thresholds_follow_the_observed_gaps():
    """CE-CLIP's rule: each step sets a type's margin to its mean logit gap (or largest / 5),
    clamped to [0, 10]; a mis-ranked negative lowers the mean, never raises it."""
    gaps = torch.tensor([[2.0, 4.0], [6.0, -5.0], [-1.0, 3.0]])
    types = torch.tensor([[0, 0], [1, 1], [2, 2]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    mean = RankThresholds("adaptive-mean")
    mean.update(gaps, types, mask)
    assert mean.values()[:4].tolist() == pytest.approx([3.0, 6.0, 1.0, 0.0])
    assert mean.seen()[:4].tolist() == [True, True, True, False]
    mean.update(torch.tensor([[30.0, 20.0], [-2.0, 0.0], [0.0, 0.0]]), types,
                torch.tensor([[True, True], [True, True], [False, False]]))
    # replaced (no average), clamped to [0, 10]; a type absent from the step keeps its margin
    assert mean.values()[:3].tolist() == pytest.approx([10.0, 0.0, 1.0])
    maximum = RankThresholds("adaptive-max")
    maximum.update(gaps, types, mask)
    assert maximum.values()[:4].tolist() == pytest.approx([0.8, 1.2, 0.6, 0.0])
    fixed = RankThresholds("fixed", fixed=2.0)
    fixed.update(gaps, types, mask)
    assert torch.allclose(fixed.values(), torch.full((9,), 2.0))
    assert fixed.seen().all()  # every type has the fixed margin: logged as Hn_rank_thr 2.0, not 0
    again = RankThresholds("adaptive-mean")
    again.load_state_dict(mean.state_dict())
    assert torch.equal(again.values(), mean.values())
    older = RankThresholds("adaptive-mean")  # a state of the cosine-average margins
    older.load_state_dict({"average": torch.full((9,), 0.05, dtype=torch.float64),
                           "updates": torch.ones(9, dtype=torch.long)})
    assert older.values().eq(0).all()


def test_state_updates_once_per_optimizer_step_with_accum_freq():
    loss = HardNegativeLoss(full_config(), accum_freq=3, start_step=5)
    for micro_batch in range(3):
        assert loss.step == 5
        assert len(loss.bank) == 0
        run(loss, range(micro_batch, micro_batch + 1))
    assert loss.step == 6 and len(loss.bank) == B
    with torch.no_grad():  # evaluation-like calls move nothing
        call(loss, 0)
    assert loss.step == 6 and len(loss.bank) == B


def test_resume_continues_bank_thresholds_and_curriculum_exactly():
    straight = HardNegativeLoss(full_config(), total_steps=8)
    expected = run(straight, range(8))
    first = HardNegativeLoss(full_config(), total_steps=8)
    run(first, range(4))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = HardNegativeLoss(full_config(), total_steps=8, start_step=saved["step"])
    resumed.load_state_dict(saved)
    assert resumed.step == 4
    assert run(resumed, range(4, 8)) == expected[4:]
    final, again = straight.state_dict(), resumed.state_dict()
    assert torch.equal(final["bank"]["storage"], again["bank"]["storage"])
    assert torch.equal(final["thresholds"]["margins"], again["thresholds"]["margins"])
    assert final["step"] == again["step"] == 8


def test_resume_refuses_a_different_bank_size():
    state = HardNegativeLoss(full_config()).state_dict()
    other = copy.deepcopy(state)
    other["bank"] = {"size": 99, "pointer": 0, "count": 0, "storage": None}
    with pytest.raises(ValueError, match="--hn-memory-bank-size"):
        HardNegativeLoss(full_config()).load_state_dict(other)


def test_resume_names_a_flag_changed_since_the_saved_run_even_one_it_did_not_save(caplog):
    """A flag added after the checkpoint's version had its default then (or, where the default
    is new behaviour, the old one): a resume that sets it differently is named like any other."""
    import dataclasses
    import logging

    from open_clip_hn.run import HardNegativeRun

    run = HardNegativeRun(HNConfig(negatives="online", negative_grad="none", num_negatives=2,
                                   given=("--hn-negatives",), typed=("--hn-negatives",)))
    saved = dataclasses.asdict(run.config)
    with caplog.at_level(logging.WARNING):
        run._warn_config_changes(saved)
    assert not caplog.records
    # how the flags were given (recipe or command line) is not a setting: an older state without
    # that record, or flags moved into a recipe, name nothing
    older = {k: v for k, v in saved.items() if k not in ("negative_grad", "sample_shuffle", "typed")}
    older["given"] = ()
    older["num_negatives"] = 4
    with caplog.at_level(logging.WARNING):
        run._warn_config_changes(older)
    messages = [r.getMessage() for r in caplog.records]
    assert "Resuming with --hn-negative-grad changed: 'full' -> 'none'" in messages
    assert "Resuming with --hn-num-negatives changed: 4 -> 2" in messages
    # added with a new behaviour as default: the saved run had the old one
    assert "Resuming with --hn-sample-shuffle changed: 'process' -> 'seeded'" in messages
    assert len(messages) == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the recipe's field is named by its flag, --hn-config
        run._warn_config_changes({**saved, "config_file": "negclip"})
    assert [r.getMessage() for r in caplog.records] == ["Resuming with --hn-config changed: 'negclip' -> None"]


def test_an_epoch_whose_bank_yields_no_negative_is_warned_about(caplog):
    """On a collapsed model (or a threshold too low) the false-negative filter drops every bank
    entry: the mined term logged Hn_mined 0 and trained nothing without a word."""
    from open_clip_hn.run import HardNegativeRun

    for threshold, warned in ((-1.0, True), (0.9, False)):
        hn_run = HardNegativeRun(full_config(false_negative_threshold=threshold))
        hn_run.create_loss(rank=0, world_size=1, local_loss=False, gather_with_grad=False,
                           accum_freq=1)
        logs = run(hn_run.loss, range(3))
        assert (logs[-1]["hn_mined"] == 0) == warned
        caplog.clear()
        hn_run.epoch_trained(1)
        assert ("The mined term found no usable memory-bank entry in epoch 1" in caplog.text) == warned
        assert hn_run.loss.take_mined_counts() == (0, 0)  # taken once per epoch


def test_an_input_file_changed_under_the_same_path_is_named_on_resume(tmp_path, caplog):
    """The vocabulary (and plausibility, exclusion, neighbour index) files are recorded by
    content: rewritten between a run and its resume, the negatives change, and a warning says so."""
    import logging

    from open_clip_hn import state as hn_state
    from open_clip_hn.run import HardNegativeRun

    from conftest import tiny_model

    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("red\nblue\ncube\n")
    config = HNConfig(negatives="online", vocabulary=str(vocabulary), loss=("itc",),
                      given=("--hn-negatives", "--hn-vocabulary"))
    model = tiny_model()

    def run_from(changed: bool) -> list[str]:
        run = HardNegativeRun(config)
        run.model_created(model, None)
        run.create_loss(rank=0, world_size=1, local_loss=False, gather_with_grad=False, accum_freq=1)
        folder = tmp_path / ("changed" if changed else "same")
        folder.mkdir()
        hn_state.save_state(str(folder), 1, {**run.state(), "weights_digest": hn_state.weights_digest(
            model.state_dict())})
        if changed:
            vocabulary.write_text("green\nsphere\n")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            HardNegativeRun(config).checkpoint_loaded(str(folder / "epoch_1.pt"),
                                                      {"epoch": 1, "state_dict": model.state_dict()})
        return [r.getMessage() for r in caplog.records]

    assert not any("changed since" in m for m in run_from(changed=False))
    assert any(m.startswith(f"Resuming with --hn-vocabulary {vocabulary} changed since the checkpoint "
                            "was saved") for m in run_from(changed=True))
