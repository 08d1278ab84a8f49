"""Flags typed on the command line against a recipe's: abbreviations read as the parser reads them,
and one policy for a setting of a part of the run that is off (a recipe's is dropped, a typed one
refused)."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
import yaml
from conftest import TINY_MODEL

from open_clip_hn import hooks
from open_clip_hn.config import HNConfig, given_hn_flags
from open_clip_hn.recipes import expand_recipe, spell_out_flags

MIRROR_WEIGHT_OFF = "--hn-mirror-weight acts on the mirror term (--hn-mirror AXES), which is off"


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return hooks.build_parser()


def parse(*argv: str) -> argparse.Namespace:
    """The trainer's parse of a command line (the monkeypatched route)."""
    hooks.install()
    return hooks.parse_args(["--model", TINY_MODEL, *argv])


def refusal(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        parse(*argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def printed_config(capsys, *argv: str) -> dict:
    with pytest.raises(SystemExit) as stop:
        parse(*argv, "--hn-print-config")
    assert stop.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------- abbreviations


def test_typed_flags_are_named_as_the_parser_reads_them(parser):
    """OpenCLIP's parser takes a unique prefix for its flag (allow_abbrev, argparse's default),
    so the record of typed flags must too: by prefix, with `=value`, and never after `--`."""
    assert parser.allow_abbrev
    argv = ["--hn-mirror-w", "2", "--hn-num=2", "--batch-s", "4", "--hn-memory-bank-fp16"]
    assert spell_out_flags(argv, parser) == ["--hn-mirror-weight", "2", "--hn-num-negatives=2",
                                             "--batch-size", "4", "--hn-memory-bank-fp16"]
    assert given_hn_flags(argv, parser) == ("--hn-mirror-weight", "--hn-num-negatives",
                                            "--hn-memory-bank-fp16")
    # an ambiguous prefix is left for argparse to refuse; an exact flag is never a prefix
    assert spell_out_flags(["--hn-memory-bank", "--hn-mirror", "x"], parser) == \
        ["--hn-memory-bank", "--hn-mirror", "x"]
    assert spell_out_flags(["--", "--hn-mirror-w"], parser) == ["--", "--hn-mirror-w"]
    strict = argparse.ArgumentParser(allow_abbrev=False)
    strict.add_argument("--hn-mirror-weight")
    assert spell_out_flags(["--hn-mirror-w", "2"], strict) == ["--hn-mirror-w", "2"]
    assert given_hn_flags(["--hn-mirror-w", "2"], strict) == ()  # not its flag: argparse refuses it
    # only the parser's flags: not a value that looks like one, nor anything after `--`
    assert given_hn_flags(["--name", "--hn-x y", "--", "--hn-mirror", "x"], parser) == ()


@pytest.mark.parametrize("typed", [["--hn-mirror-w", "2"], ["--hn-mirror-w=2"],
                                   ["--hn-mirror-weight=2"]])
def test_an_abbreviated_setting_for_a_part_that_is_off_is_refused(capsys, typed):
    assert MIRROR_WEIGHT_OFF in refusal(capsys, "--hn-negatives", "online", *typed)


def test_an_abbreviated_flag_trains_as_in_full(capsys):
    """The trainer's parser accepts the abbreviation: the run must get its value (it used to
    fail in OpenCLIP's own parse of the flags left over), and --hn-print-config show it."""
    args = parse("--hn-mirror", "horizontal", "--hn-mirror-w", "2", "--hn-converse-w=3")
    assert (args.hn_mirror_weight, args.hn_converse_weight) == (2.0, 3.0)
    printed = printed_config(capsys, "--hn-mirror", "horizontal", "--hn-mirror-w", "2")
    assert printed["hn-mirror-weight"] == 2.0


def test_an_abbreviated_recipe_flag_reads_the_recipe(parser, capsys):
    """`--hn-conf NAME` is --hn-config to argparse: the recipe must be read, not left out."""
    argv = expand_recipe(["--hn-conf", "cm-hnco"], parser)
    assert parser.parse_args(argv).hn_memory_bank_size == 4096
    assert printed_config(capsys, "--hn-conf", "cm-hnco")["hn-memory-bank-size"] == 4096


def test_an_abbreviation_overrides_a_recipe_like_the_full_flag(tmp_path, capsys):
    """Typed, abbreviated: refused for a part that is off, as the full flag is (it was taken
    for the recipe's own setting and dropped without a word)."""
    recipe = write(tmp_path, "hn-negatives: online\nhn-loss: itc,choice\nhn-choice-weight: 2\n")
    err = refusal(capsys, "--hn-config", recipe, "--hn-loss", "itc", "--hn-choice-w", "3")
    assert "--hn-choice-weight acts on the choice term" in err
    assert parse("--hn-config", recipe, "--hn-choice-w", "3").hn_choice_weight == 3.0


def test_the_patched_route_reads_abbreviations_too(tmp_path, parser, capsys):
    """On patched OpenCLIP the plugin records typed flags in `expand_argv`, before the recipe."""
    recipe = write(tmp_path, "hn-negatives: online\nhn-loss: itc,choice\nhn-choice-weight: 2\n")
    plugin = hooks.Plugin()
    argv = plugin.expand_argv(["--model", TINY_MODEL, "--hn-conf", recipe, "--hn-loss", "itc",
                               "--hn-choice-w", "3"], parser)
    assert plugin.typed == ("--hn-config", "--hn-loss", "--hn-choice-weight")
    with pytest.raises(SystemExit):
        plugin.configure(parser.parse_args(argv), argv, parser)
    assert "--hn-choice-weight acts on the choice term" in capsys.readouterr().err


# ---------------------------------------------------------------------------- one policy


def test_recommended_without_mirrors_drops_its_converse_settings(capsys, caplog):
    """A recipe is a bundle whose parts the command line may switch off: `--hn-mirror none`
    switches recommended's converse term off with its mirrors, and the printed configuration
    is the run's (it used to ask for --hn-converse-weight 0 --hn-converse-margin 0 too)."""
    args = parse("--hn-config", "recommended", "--hn-mirror", "none")
    assert args.hn_mirror == () and (args.hn_converse_weight, args.hn_converse_margin) == (0.0, 0.0)
    run = hooks._PLUGIN.run
    assert run.config.converse_weight == 0 and not run.config.packs_converse
    # what was dropped is said once logging is up (OpenCLIP sets it up after the parse)
    assert run.config.dropped == ("--hn-converse-margin 0.02", "--hn-converse-weight 10.0")
    with caplog.at_level(logging.INFO):
        run.model_created(torch.nn.Linear(1, 1), preprocess_val=None)
    assert ("Recipe settings for a part this command line switched off run at their defaults: "
            "--hn-converse-margin 0.02, --hn-converse-weight 10.0 (from --hn-config ") in caplog.text
    printed = printed_config(capsys, "--hn-config", "recommended", "--hn-mirror", "none")
    assert (printed["hn-converse-weight"], printed["hn-converse-margin"]) == (0.0, 0.0)
    assert printed["hn-negatives"] == "online" and printed["hn-choice-weight"] == 2.0
    assert capsys.readouterr().err == ""  # nothing alarming
    # typed, a converse setting for the term that is off is refused like any other
    err = refusal(capsys, "--hn-config", "recommended", "--hn-mirror", "none", "--hn-converse-margin", "0.05")
    assert "--hn-converse-margin acts on the converse term" in err and "which is off in this run" in err
    err = refusal(capsys, "--hn-config", "recommended", "--hn-mirror", "none", "--hn-converse-w", "5")
    assert "--hn-converse-weight acts on the converse term (--hn-mirror AXES), which is off" in err
    # switching the converse term off keeps the mirrors and drops the recipe's hinge margin
    args = parse("--hn-config", "recommended", "--hn-converse-weight", "0")
    assert args.hn_mirror and args.hn_converse_margin == 0.0


def test_printed_configuration_of_a_part_switched_off_is_itself_a_recipe(tmp_path, capsys):
    printed = printed_config(capsys, "--hn-config", "recommended", "--hn-mirror", "none")
    again = printed_config(capsys, "--hn-config", write(tmp_path, yaml.safe_dump(printed)))
    assert again == printed


ONLINE_RECIPE = ("hn-negatives: online\nhn-loss: [itc, choice]\nhn-vocabulary: words.txt\n"
                 "hn-plausibility: captions.txt\nhn-exclude-negatives: sets\nhn-swap-reorders: drop\n"
                 "hn-lm: lm\nhn-negative-grad: none\nhn-choice-grad: text\nhn-types: [replace_object, swap_objects]\n")


@pytest.mark.parametrize("negatives", ["none", "precomputed"])
def test_a_recipes_online_settings_go_with_its_online_negatives(tmp_path, negatives):
    """--hn-negatives none or precomputed over a recipe with online-only settings (files that
    need not exist here: the run reads none of them) used to be refused setting by setting."""
    recipe = write(tmp_path, ONLINE_RECIPE)
    args = parse("--hn-config", recipe, "--hn-negatives", negatives, "--hn-loss", "itc")
    config = hooks._PLUGIN.run.config
    assert (config.vocabulary, config.plausibility, config.exclude_negatives, config.lm) == (None,) * 4
    assert (config.swap_reorders, config.choice_grad) == ("keep", "both")
    assert config.negative_grad == ("full" if negatives == "none" else "none")
    assert args.hn_vocabulary is None and args.hn_lm is None  # what params.txt records


@pytest.mark.parametrize("typed, message", [
    (["--hn-vocabulary", "words.txt"], "--hn-vocabulary acts on online text negatives "
                                       "(--hn-negatives online), which is off in this run"),
    (["--hn-plausibility", "c.txt"], "--hn-plausibility acts on online text negatives"),
    (["--hn-exclude-negatives", "sets"], "--hn-exclude-negatives acts on online text negatives"),
    (["--hn-swap-reorders", "drop"], "; for precomputed negatives pass --swap-reorders drop to "
                                     "`python -m open_clip_hn.negatives precompute`"),
    (["--hn-lm", "lm"], "; for precomputed negatives pass --lm to `python -m"),
    (["--hn-loss", "itc", "--hn-choice-grad", "text"], "--hn-choice-grad acts on the choice term"),
])
def test_a_typed_online_setting_with_precomputed_negatives_is_refused(capsys, typed, message):
    assert message in refusal(capsys, "--hn-negatives", "precomputed", *typed)


def test_typed_settings_without_text_negatives_are_refused(capsys):
    err = refusal(capsys, "--hn-mirror", "horizontal", "--hn-negative-grad", "none")
    assert "--hn-negative-grad acts on text negatives" in err
    err = refusal(capsys, "--hn-negatives", "online", "--hn-types", "swap_objects", "--hn-lm", "lm")
    assert "--hn-lm acts on online replace_object and replace_attribute negatives" in err


def test_out_of_range_is_an_error_wherever_it_comes_from(tmp_path, capsys):
    """Dropping a recipe's setting for a part that is off does not hide a value no run takes."""
    recipe = write(tmp_path, "hn-negatives: online\nhn-distill-ema-decay: 1.0\n")
    assert "key 'hn-distill-ema-decay' has a bad value 1.0: must be in [0, 1)" in refusal(
        capsys, "--hn-config", recipe)
    recipe = write(tmp_path, "hn-negatives: online\nhn-importance-tau-plus: 1\n")
    assert "--hn-importance-tau-plus is a class prior" in refusal(capsys, "--hn-config", recipe)


def test_a_config_built_without_a_command_line_is_checked_as_typed():
    """No record of a recipe: every setting for a part that is off is refused (tests, benchmarks)."""
    with pytest.raises(ValueError, match=r"--hn-converse-weight acts on the converse term \(--hn-mirror"):
        HNConfig(converse_weight=1.0).validate()
    with pytest.raises(ValueError, match="--hn-converse-margin acts on the converse term"):
        HNConfig(mirror=("horizontal",), converse_margin=0.05).validate()
    HNConfig(mirror=("horizontal",), converse_weight=1.0, converse_margin=0.05).validate()


def test_a_typed_negative_count_without_negatives_is_refused(capsys, tmp_path):
    """`--hn-num-negatives 8` with no text negatives changed nothing: refused like the others; a
    recipe's count is dropped when the command line switches its negatives off."""
    err = refusal(capsys, "--hn-mirror", "horizontal", "--hn-num-negatives", "8")
    assert ("--hn-num-negatives acts on text negatives (--hn-negatives online or precomputed), "
            "which is off in this run") in err
    recipe = write(tmp_path, "hn-negatives: online\nhn-num-negatives: 8\nhn-loss: [itc]\n")
    assert printed_config(capsys, "--hn-config", recipe, "--hn-negatives", "none",
                          "--hn-mirror", "horizontal")["hn-num-negatives"] == 4


def test_a_recipe_setting_for_a_part_the_recipe_leaves_off_is_its_own_mistake(capsys, tmp_path):
    """Only what the command line switched off is dropped: a recipe file whose own setting acts on
    a part it leaves off is refused, naming the file's key (it was refused before the drop too)."""
    recipe = write(tmp_path, "hn-negatives: precomputed\nhn-vocabulary: words.txt\nhn-loss: [itc]\n")
    err = refusal(capsys, "--hn-config", recipe)
    assert (f"--hn-vocabulary (key hn-vocabulary of --hn-config {recipe}) acts on online text "
            "negatives (--hn-negatives online), which is off in this run") in err
    assert "pass --vocabulary to `python -m open_clip_hn.negatives precompute`" in err
    # the same setting of a part the recipe has on, switched off on the command line: dropped
    (tmp_path / "words.txt").write_text("dog\n")
    online = write(tmp_path, f"hn-negatives: online\nhn-vocabulary: {tmp_path / 'words.txt'}\n"
                             "hn-loss: [itc]\n")
    assert printed_config(capsys, "--hn-config", online, "--hn-negatives", "none",
                          "--hn-mirror", "horizontal").get("hn-vocabulary") is None
