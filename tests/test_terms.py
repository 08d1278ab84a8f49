"""The loss-term registry: flags, validation, the objective's loop and README derive from it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import REPO, unit
from open_clip_hn import losses as L
from open_clip_hn import terms
from open_clip_hn.config import HNConfig, add_hn_arguments
from open_clip_hn.curriculum import negative_keep_mask
from open_clip_hn.objective import HardNegativeLoss
from open_clip_hn.packing import PackedOutputs

SCALE = torch.tensor(10.0)


def parser():
    import argparse

    return add_hn_arguments(argparse.ArgumentParser(add_help=False))


def test_flags_and_config_fields_come_from_the_registry():
    fields = {f.name for f in dataclasses.fields(HNConfig)}
    options = {o for a in parser()._actions for o in a.option_strings}
    for term in terms.TERMS.values():
        if term.weight:
            assert term.weight_field in fields, f"HNConfig lacks {term.weight_field}"
            assert f"--hn-{term.name}-weight" in options
            # the flag's default (argparse) and the dataclass's (a recipe, HNConfig()) agree
            default = getattr(parser().parse_args([]), f"hn_{term.weight_field}")
            assert default == getattr(HNConfig(), term.weight_field) == term.weight_default, term.name
        else:
            assert f"--hn-{term.name}-weight" not in options
    selectable = terms.selectable_terms()
    assert "mirror" not in selectable and {"itc", "choice", "mined"} <= set(selectable)
    assert parser().parse_args(["--hn-loss", ",".join(selectable)]).hn_loss == selectable
    with pytest.raises(SystemExit):
        parser().parse_args(["--hn-loss", "mirror"])


def test_needs_are_checked_from_the_registry():
    with pytest.raises(ValueError, match=r"--hn-loss choice,rank needs text hard negatives; add --hn-negatives"):
        HNConfig(loss=("itc", "rank", "choice")).validate()
    with pytest.raises(ValueError, match="--hn-loss mined needs a memory bank; set --hn-memory-bank-size"):
        HNConfig(loss=("mined",)).validate()
    HNConfig(negatives="online", loss=("rank",)).validate()


@pytest.mark.parametrize("loss", [("clip", "importance"), ("itc", "clip"), ("importance", "itc", "choice")])
def test_two_contrastive_terms_are_refused(loss):
    """itc, clip and importance each compute OpenCLIP's contrastive loss: with two, the later one
    silently overwrote the other (`clip,importance` trained importance alone)."""
    with pytest.raises(ValueError, match=r"each OpenCLIP's contrastive loss .* keep one of them"):
        HNConfig(loss=loss, negatives="online").validate()


@pytest.mark.parametrize("loss", [("clip",), ("clip", "mined"), ("mined",)])
def test_text_negatives_no_term_reads_are_refused(loss):
    """`--hn-negatives online --hn-loss clip` generated and encoded negatives every step and
    trained exactly as vanilla OpenCLIP: no chosen term reads them."""
    with pytest.raises(ValueError, match=r"--hn-negatives online: no loss term of this run reads text "
                                         r"negatives .* add a term that does \(itc, choice, local, "
                                         r"intra, rank, importance\), or pass --hn-negatives none"):
        HNConfig(loss=loss, negatives="online", memory_bank_size=64 * ("mined" in loss)).validate()
    for reader in ("itc", "importance", "choice"):  # itc and importance read them where given
        chosen = (*loss, reader) if reader == "choice" or "clip" not in loss else (reader,)
        HNConfig(loss=chosen, negatives="online", memory_bank_size=64 * ("mined" in chosen)).validate()


def test_active_terms_follow_choice_and_automatic_needs():
    names = lambda config: [t.name for t in terms.active_terms(config)]  # noqa: E731
    assert names(HNConfig(loss=("importance",))) == ["importance"]
    assert names(HNConfig(loss=("choice", "itc"), negatives="online")) == ["itc", "choice"]
    assert names(HNConfig(loss=("itc",), mirror=("horizontal",))) == ["itc", "mirror"]
    assert names(HNConfig(loss=("itc",), mirror=("horizontal",), mirror_weight=0.0)) == ["itc"]


def test_readme_term_table_is_the_registry():
    assert terms.markdown_table() in (REPO / "README.md").read_text()


def test_a_new_term_is_one_decorated_function():
    """Register a term, and the objective computes it with its curriculum scaling: no other edit."""
    @terms.register_term("toy", summary="distance of each caption to its negatives",
                         source="test", needs=("text_negatives",), curriculum=True)
    def toy(b, ctx):
        return L.intra_loss(b.image, b.text, b.negatives, b.anchor_used, ctx.logit_scale)

    try:
        k, batch, dim = 2, 4, 8
        image, text = unit(batch, dim, seed=1), unit(batch, 1 + k, dim, seed=2).flatten(0, 1)
        mask = torch.ones(batch, k, dtype=torch.bool)
        config = HNConfig(negatives="online", num_negatives=k, loss=("itc", "toy"),
                          curriculum="linear", curriculum_start=0.5, curriculum_end=0.5)
        assert parser().parse_args(["--hn-loss", "itc,toy"]).hn_loss == ("itc", "toy")
        out = HardNegativeLoss(config)(image, text, SCALE, PackedOutputs(mask), output_dict=True)
        positives, negatives = L.split_text_features(text, batch)
        used = mask & negative_keep_mask((batch, k), 0.5, seed=0, step=0, device=mask.device)
        expected = 0.5 * L.intra_loss(image, positives, negatives, used, SCALE)
        torch.testing.assert_close(out["toy_loss"], expected)
        with pytest.raises(ValueError, match="toy needs text hard negatives"):
            HNConfig(loss=("toy",)).validate()
    finally:
        del terms.TERMS["toy"]


def test_misuse_from_code_is_refused_not_trained_on():
    """Audit 16: a stat returned as a plain tensor was summed into the loss; weight=True on a term
    from outside the package crashed at parse time; a misspelt or string --hn-loss built in code
    trained without the term (or returned the int 0)."""
    @terms.register_term("leaky", summary="", source="test", needs=("text_negatives",))
    def leaky(b, ctx):
        loss = L.choice_loss(b.image, b.text, b.negatives, b.anchor_used, ctx.logit_scale)
        return loss, {"leaky_stat": loss * 100}

    try:
        k, batch, dim = 2, 4, 8
        image, text = unit(batch, dim, seed=1), unit(batch, 1 + k, dim, seed=2).flatten(0, 1)
        mask = torch.ones(batch, k, dtype=torch.bool)
        config = HNConfig(negatives="online", num_negatives=k, loss=("itc", "leaky"))
        with pytest.raises(TypeError, match=r"'leaky' returned statistic\(s\) \['leaky_stat'\] that are not"):
            HardNegativeLoss(config)(image, text, SCALE, PackedOutputs(mask))
    finally:
        del terms.TERMS["leaky"]
    with pytest.raises(ValueError, match="weight=True needs the field weighty_weight in HNConfig"):
        terms.register_term("weighty", summary="", source="test", weight=True)
    assert "weighty" not in terms.TERMS
    with pytest.raises(ValueError, match="unknown loss term\\(s\\) chioce"):
        HardNegativeLoss(HNConfig(negatives="online", num_negatives=2, loss=("itc", "chioce")))
    with pytest.raises(ValueError, match="is a tuple of term names"):
        HardNegativeLoss(HNConfig(negatives="online", num_negatives=2, loss="choice"))


def test_a_registered_term_that_needs_the_bank_can_be_turned_on():
    """The bank's flags acted on the mined term only: a term of one's own with needs=("bank",)
    was refused without a bank and refused again with one."""
    @terms.register_term("banky", summary="", source="test", needs=("bank",))
    def banky(b, ctx):
        return b.image.sum() * 0

    try:
        HNConfig(loss=("clip", "banky"), memory_bank_size=64).validate()
        with pytest.raises(ValueError, match="--hn-memory-bank-size acts on a term that reads the memory bank"):
            HNConfig(loss=("clip", "choice"), negatives="online", num_negatives=2, memory_bank_size=64).validate()
    finally:
        del terms.TERMS["banky"]


def test_a_model_returning_a_tuple_is_refused_before_its_mask_is_lost(tokenizer):
    """OpenCLIP's default output_dict=False returned a tuple; the hook dropped the negative mask
    and every slot, empty placeholders included, was trained on as a negative."""
    import open_clip

    from open_clip_hn.run import HardNegativeRun

    model = open_clip.create_model("hn-tiny-vit")  # output_dict=False
    run = HardNegativeRun(HNConfig(negatives="online", num_negatives=2, loss=("itc", "choice")))
    run.model_created(model, None)
    tokenize = run.train_tokenizer(tokenizer, None)
    with pytest.raises(TypeError, match="build it with output_dict=True"):
        model(torch.zeros(2, 3, 32, 32), tokenize(["a red cube to the left of a blue sphere", "sky"]))


def test_register_refuses_unknown_needs_and_duplicates():
    with pytest.raises(ValueError, match="unknown needs"):
        terms.register_term("bad", summary="", source="", needs=("gpu",))
    with pytest.raises(ValueError, match="registered twice"):
        terms.register_term("itc", summary="", source="")


def test_clip_keeps_hard_negatives_out_of_the_retrieval_loss():
    """`--hn-loss clip,choice`: the contrastive loss is OpenCLIP's ClipLoss on the ordinary batch
    whatever the text negatives and mirrored pairs are, while `choice` and `mirror` see them."""
    from open_clip.loss import ClipLoss

    from open_clip_hn.mirror import MirrorPairs

    k, batch, dim = 2, 4, 8
    image, text = unit(batch, dim, seed=1), unit(batch, 1 + k, dim, seed=2).flatten(0, 1)
    m_image, m_text = unit(batch, dim, seed=3), unit(batch, dim, seed=4)
    packed = PackedOutputs(torch.ones(batch, k, dtype=torch.bool),
                           mirrors=MirrorPairs(m_image, m_text, torch.tensor([True, False, True, False])))
    config = HNConfig(negatives="online", num_negatives=k, loss=("clip", "choice"), mirror=("horizontal",))
    assert [t.name for t in terms.active_terms(config)] == ["clip", "choice", "mirror"]
    out = HardNegativeLoss(config)(image, text, SCALE, packed, output_dict=True)
    positives, negatives = L.split_text_features(text, batch)
    torch.testing.assert_close(out["contrastive_loss"], ClipLoss()(image, positives, SCALE))
    torch.testing.assert_close(out["choice_loss"] / config.choice_weight,
                               L.choice_loss(image, positives, negatives, packed.neg_mask, SCALE))
    assert out["mirror_loss"] > 0
    with_itc = HardNegativeLoss(dataclasses.replace(config, loss=("itc", "choice")))(
        image, text, SCALE, packed, output_dict=True)
    assert not torch.allclose(with_itc["contrastive_loss"], out["contrastive_loss"])  # itc sees them
