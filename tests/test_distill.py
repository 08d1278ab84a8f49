"""--hn-distill: the pure KL term, the teacher (frozen / EMA, state), its model hook and the run."""

from __future__ import annotations

import argparse
import logging
import math

import pytest
import torch

from conftest import accum_freq_losses, tiny_model, unit
from open_clip_hn import losses as L
from open_clip_hn.config import HNConfig
from open_clip_hn.objective import HardNegativeLoss
from open_clip_hn.packing import PackedNegativeTokenizer, PackedOutputs
from open_clip_hn.run import HardNegativeRun
from open_clip_hn.teacher import Teacher, attach_teacher

SCALE = torch.tensor(10.0)


def reference_kl(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """KL(softmax(teacher) || softmax(student)) per row, averaged: written out in plain Python."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = math.log(sum(math.exp(v) for v in s_row))
        zt = math.log(sum(math.exp(v) for v in t_row))
        total += sum(math.exp(t - zt) * ((t - zt) - (s - zs)) for s, t in zip(s_row, t_row))
    return total / len(student)


def test_distill_loss_is_kl_both_directions_and_zero_for_the_same_model():
    image, text, t_image, t_text = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(5, 8, seed=3), unit(5, 8, seed=4)
    got = L.distill_loss(image, text, image, text, t_image, t_text, t_image, t_text, SCALE, torch.tensor(7.0))
    want = (reference_kl(10 * image @ text.T, 7 * t_image @ t_text.T)
            + reference_kl(10 * text @ image.T, 7 * t_text @ t_image.T)) / 2
    assert got.item() == pytest.approx(want, rel=1e-5)
    same = L.distill_loss(image, text, image, text, image, text, image, text, SCALE, SCALE)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    # anchors are a subset of the rows (local loss): rows 1..2 against all columns
    part = L.distill_loss(image[1:3], text[1:3], image, text, t_image[1:3], t_text[1:3], t_image, t_text,
                          SCALE, SCALE)
    want = (reference_kl(10 * image[1:3] @ text.T, 10 * t_image[1:3] @ t_text.T)
            + reference_kl(10 * text[1:3] @ image.T, 10 * t_text[1:3] @ t_image.T)) / 2
    assert part.item() == pytest.approx(want, rel=1e-5)


def test_distill_loss_sends_no_gradient_to_the_teacher():
    image = unit(4, 8, seed=1).requires_grad_()
    teacher = unit(4, 8, seed=2).requires_grad_()
    text = unit(4, 8, seed=3)
    L.distill_loss(image, text, image, text, teacher, text, teacher, text, SCALE, SCALE).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert teacher.grad is None


def test_ema_teacher_moves_by_the_decay_and_a_frozen_one_stays():
    student = tiny_model()
    ema, frozen = Teacher(student, "ema", decay=0.9), Teacher(student, "frozen")
    start = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update()
    frozen.update()
    name = "visual.conv1.weight"
    torch.testing.assert_close(ema.module.state_dict()[name], 0.9 * start[name] + 0.1 * (start[name] + 1))
    torch.testing.assert_close(frozen.module.state_dict()[name], start[name])
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_teacher_state_round_trips_and_is_validated():
    student = tiny_model()
    teacher = Teacher(student, "ema", decay=0.5)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(2)
    teacher.update()
    state = teacher.state_dict()
    other = Teacher(tiny_model(), "ema", decay=0.5)
    other.load_state_dict(state)
    assert other.updates == 1
    for a, b in zip(other.module.state_dict().values(), teacher.module.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="saved teacher is --hn-distill 'ema' but this run uses 'frozen'"):
        Teacher(tiny_model(), "frozen").load_state_dict(state)
    broken = {**state, "weights": {**state["weights"], "logit_scale": torch.tensor(float("nan"))}}
    with pytest.raises(ValueError, match="non-finite weights"):
        other.load_state_dict(broken)


def packed_batch(tokenizer, k=2):
    packer = PackedNegativeTokenizer(tokenizer, k, None)
    captions = ["a red cube left of a blue ball", "two green balls", "a big star", "one small cube"]
    return torch.randn(4, 3, 32, 32), packer(captions), tokenizer(captions)


def test_hook_adds_the_teacher_features_of_images_and_positive_captions(tokenizer):
    from open_clip_hn.packing import attach_model_hooks

    model = tiny_model()
    teacher = Teacher(model, "frozen")
    attach_model_hooks(model, 2)
    attach_teacher(model, teacher, 2)
    images, packed, plain = packed_batch(tokenizer)
    model.train()
    out = model(images, packed)
    assert out["text_features"].shape[0] == 4 * 3  # the student's packing is untouched
    read = PackedOutputs.read(out)
    with torch.no_grad():
        reference = tiny_model().eval()
        torch.testing.assert_close(read.teacher_image, reference.encode_image(images, normalize=True))
        torch.testing.assert_close(read.teacher_text, reference.encode_text(plain, normalize=True))
    assert read.teacher_logit_scale.shape == (4,) and not read.teacher_image.requires_grad
    model.eval()
    assert PackedOutputs.read(model(images, packed)).teacher_image is None  # evaluation pays nothing


def test_teacher_features_survive_accum_freq_concatenation(tokenizer):
    """OpenCLIP's --accum-freq path torch.cat's every output value along the batch."""
    from open_clip_hn.packing import attach_model_hooks

    config = HNConfig(negatives="online", num_negatives=2, loss=("itc",), distill="ema", given=("x",))
    model = tiny_model()
    teacher = Teacher(model, "ema")
    with torch.no_grad():
        model.text_projection.mul_(-1.5)  # the student has moved away from its teacher
    attach_model_hooks(model, 2)
    attach_teacher(model, teacher, 2)
    model.train()
    images, packed, _ = packed_batch(tokenizer)
    got, want = accum_freq_losses(model, images, packed, HardNegativeLoss(config))
    assert got["distill_loss"].item() == pytest.approx(want["distill_loss"].item(), rel=1e-5)
    assert got["distill_loss"].item() > 1e-3


def test_objective_runs_the_term_and_the_step_callback_once_per_optimizer_step():
    calls = []
    config = HNConfig(loss=("itc",), distill="frozen", distill_weight=0.5)
    loss = HardNegativeLoss(config, accum_freq=2, on_step_end=lambda: calls.append(1))
    image, text, t_image, t_text = unit(4, 8, seed=1), unit(4, 8, seed=2), unit(4, 8, seed=3), unit(4, 8, seed=4)
    packed = PackedOutputs(teacher_image=t_image, teacher_text=t_text, teacher_logit_scale=torch.full((4,), 5.0))
    out = loss(image, text, SCALE, packed, output_dict=True)
    want = 0.5 * L.distill_loss(image, text, image, text, t_image, t_text, t_image, t_text, SCALE,
                                torch.tensor(5.0))
    assert out["distill_loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert calls == []
    loss(image, text, SCALE, packed, output_dict=True)
    assert calls == [1]
    with pytest.raises(ValueError, match="no teacher features"):
        loss(image, text, SCALE, output_dict=True)


def test_distill_flags_are_validated(capsys):
    with pytest.raises(ValueError, match="--hn-distill-ema-decay must be in"):
        HNConfig(distill="ema", distill_ema_decay=1.0).validate()
    names = lambda c: [t.name for t in __import__("open_clip_hn.terms").terms.active_terms(c)]  # noqa: E731
    assert names(HNConfig()) == ["itc"]
    assert names(HNConfig(distill="ema")) == ["itc", "distill"]
    assert names(HNConfig(distill="ema", distill_weight=0.0)) == ["itc"]
    with pytest.raises(ValueError, match=r"--hn-distill ema with --hn-distill-weight 0 keeps, runs and "
                                         r"saves a teacher .* pass --hn-distill none"):
        HNConfig(distill="ema", distill_weight=0.0).validate()
    import argparse

    from open_clip_hn.config import add_hn_arguments

    parser = add_hn_arguments(argparse.ArgumentParser())
    for value, message in (("-0.1", "must be in [0, 1), got -0.1"), ("1", "must be in [0, 1), got 1"),
                           ("1.5", "must be in [0, 1), got 1.5"), ("x", "expected a number in [0, 1)")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--hn-distill-ema-decay", value])
        assert message in capsys.readouterr().err  # one message for every value outside


def test_run_saves_the_start_weights_and_a_resume_gets_them_back(tmp_path):
    """frozen = the weights the run started from, also after a resume from a later checkpoint."""
    from open_clip_hn import state as hn_state

    config = HNConfig(loss=("itc",), distill="frozen", given=("--hn-distill",))
    model = tiny_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    run = HardNegativeRun(config)
    run.model_created(model, None)
    run.create_loss(rank=0, world_size=1, local_loss=False, gather_with_grad=False, accum_freq=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # training moved the student
    hn_state.save_state(str(tmp_path), 1, run.state())
    checkpoint = {"epoch": 1, "state_dict": model.state_dict()}

    resumed_model = tiny_model()
    resumed_model.load_state_dict(checkpoint["state_dict"])  # OpenCLIP's --resume
    resumed = HardNegativeRun(config)
    resumed.model_created(resumed_model, None)
    resumed.checkpoint_loaded(str(tmp_path / "epoch_1.pt"), checkpoint)
    resumed.create_loss(rank=0, world_size=1, local_loss=False, gather_with_grad=False, accum_freq=1)
    for name, value in resumed.teacher.module.state_dict().items():
        torch.testing.assert_close(value, start[name], msg=name)

    # a resume without a saved teacher: the resumed weights, not the (here random) start
    (tmp_path / "epoch_1.pt.hn").unlink()
    fresh = HardNegativeRun(config)
    fresh.model_created(tiny_model(), None)
    fresh.teacher.student.load_state_dict(checkpoint["state_dict"])
    fresh.checkpoint_loaded(str(tmp_path / "epoch_1.pt"), checkpoint)
    fresh.create_loss(rank=0, world_size=1, local_loss=False, gather_with_grad=False, accum_freq=1)
    for name, value in fresh.teacher.module.state_dict().items():
        torch.testing.assert_close(value, checkpoint["state_dict"][name], msg=name)

    # ... unless the model was created with --pretrained weights: a frozen teacher stays those
    again = HardNegativeRun(config)
    again.model_created(model := tiny_model(), None, pretrained="start.pt")
    created = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(checkpoint["state_dict"])  # OpenCLIP's --resume over the --pretrained weights
    again.checkpoint_loaded(str(tmp_path / "epoch_1.pt"), checkpoint)
    again.create_loss(rank=0, world_size=1, local_loss=False, gather_with_grad=False, accum_freq=1)
    for name, value in again.teacher.module.state_dict().items():
        torch.testing.assert_close(value, created[name], msg=name)


@pytest.mark.parametrize("start, warned", [({}, True), ({"pretrained": "start.pt"}, False),
                                           ({"resume": "latest"}, False),
                                           ({"model": "hf-hub:org/clip"}, False),  # weights by name
                                           ({"pretrained_image": True}, False)])
def test_a_teacher_from_random_weights_is_warned_about(caplog, start, warned):
    from open_clip_hn.hooks import _warn_random_teacher

    args = argparse.Namespace(**{"model": "hn-tiny-vit", "pretrained": None, "pretrained_image": False,
                                 "resume": None, "rank": 0, "local_rank": 0, "log_local": False, **start})
    with caplog.at_level(logging.WARNING):
        _warn_random_teacher(args, HNConfig(loss=("itc",), distill="frozen", given=("--hn-distill",)))
        _warn_random_teacher(args, HNConfig(loss=("itc",)))  # no teacher: nothing to say
    assert [r.getMessage().startswith("--hn-distill frozen with neither --pretrained nor --resume")
            for r in caplog.records] == ([True] if warned else [])
