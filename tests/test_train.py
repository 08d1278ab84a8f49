"""End to end through OpenCLIP's own trainer: flags, vanilla equivalence, checkpoints, resume."""

from __future__ import annotations

import json
import os
import socket
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO, TINY_MODEL, TINY_MODEL_CONFIG, env_without_nltk_data, free_port, run_module,
                      same_weights, scene_words, train_argv)
from open_clip_hn.hooks import build_parser

HN_ONLINE = ["--hn-negatives", "online", "--hn-num-negatives", "2", "--hn-loss", "itc",
             "--hn-types", "swap_attributes,swap_objects,replace_attribute,replace_object,"
                           "replace_relation"]

TINY_RN_CONFIG = REPO / "open_clip_hn" / "model_configs" / "hn-tiny-rn.json"

VANILLA = ("import open_clip, sys; open_clip.add_model_config(sys.argv.pop(1)); "
           "import open_clip_train.main as m; m.main(sys.argv[1:])")


def run_vanilla(argv: list[str]) -> None:
    """`open_clip_train.main` itself (with the tiny model registered), no plugin imported."""
    i = argv.index("--model-config")
    argv = argv[:i] + argv[i + 2:]
    proc = subprocess.run([sys.executable, "-c", VANILLA, str(TINY_MODEL_CONFIG), *argv],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]


def checkpoint(logs: Path, name: str, epoch: int | str = 1) -> dict:
    return torch.load(logs / name / "checkpoints" / f"epoch_{epoch}.pt", weights_only=False)


def logged_losses(logs: Path, name: str) -> list[str]:
    lines = (logs / name / "out.log").read_text().splitlines()
    return [line.split("Contrastive_loss:")[1].split()[0] for line in lines if "Train Epoch" in line]


def test_help_lists_openclip_and_hn_flags():
    help_text = run_module("open_clip_hn.train", ["--help"]).stdout
    for flag in ("--train-data", "--accum-freq", "--local-loss", "--gather-with-grad", "--resume",
                 "--hn-negatives", "--hn-num-negatives", "--hn-types", "--hn-loss", "--hn-seed",
                 "--model-config"):
        assert flag in help_text, flag


@pytest.mark.parametrize("argv, message", [
    (["--hn-negatives", "sometimes"], "invalid choice: 'sometimes'"),
    (["--hn-num-negatives", "-1"], "must be >= 0"),
    (["--hn-types", "swap_colours"], "unknown negative type(s) swap_colours"),
    (["--hn-loss", "itc,magic"], "unknown loss term(s) magic"),
    (["--hn-loss", "rank"], "needs text hard negatives"),
    (["--hn-negatives", "online", "--siglip"], "--siglip"),
    (["--hn-negatives", "online", "--hn-num-negatives", "0"], "generates nothing"),
    (["--hn-loss", "importance", "--hn-importance-tau-plus", "1"], "--hn-importance-tau-plus"),
    (["--hn-loss", "mined"], "--hn-memory-bank-size"),
    (["--hn-loss", "itc,mined", "--hn-memory-bank-size", "8", "--hn-mined-k", "32"],
     "--hn-mined-k 32: the memory bank holds 8 pairs"),
    (["--hn-vocabulary", "words.txt"],
     "--hn-vocabulary acts on online text negatives (--hn-negatives online), which is off"),
    (["--hn-negatives", "online", "--hn-vocabulary", "/nonexistent/words.txt"],
     "--hn-vocabulary /nonexistent/words.txt: file not found"),
    (["--hn-negatives", "online", "--hn-plausibility", "/nonexistent/captions.txt"],
     "--hn-plausibility /nonexistent/captions.txt: file not found"),
    (["--model-config", "/nonexistent/cfg.json"], "--model-config /nonexistent/cfg.json: file not found"),
    (["--hn-negatives", "online", "--hn-exclude-negatives", "/nonexistent/sets"],
     "--hn-exclude-negatives /nonexistent/sets: no such file or folder"),
    (["--hn-negatives", "precomputed", "--hn-exclude-negatives", "sets"],
     "--hn-exclude-negatives acts on online text negatives"),
    # a setting typed for a part of the run that is off would be silently ignored
    (["--hn-negatives", "none", "--hn-types", "swap_objects", "--hn-mirror", "horizontal"],
     "--hn-types acts on text negatives"),
    (["--hn-negatives", "online", "--hn-mirror-weight", "2"],
     "--hn-mirror-weight acts on the mirror term (--hn-mirror AXES), which is off in this run: turn it on"),
    (["--hn-negatives", "online", "--hn-loss", "itc", "--hn-choice-weight", "2"],
     "--hn-choice-weight acts on the choice term (--hn-loss ...,choice)"),
    (["--hn-negatives", "online", "--hn-memory-bank-size", "64"],
     "--hn-memory-bank-size acts on a term that reads the memory bank"),
    (["--hn-negatives", "online", "--hn-distill-weight", "2"], "--hn-distill-weight acts on the distill term"),
    (["--hn-negatives", "online", "--hn-distill", "frozen", "--hn-distill-ema-decay", "0.9"],
     "--hn-distill-ema-decay acts on an EMA teacher"),
    (["--hn-negatives", "online", "--hn-eval-every", "2"], "--hn-eval-every acts on the in-training evaluation"),
    (["--hn-negatives", "online", "--hn-image-neighbors-per-sample", "2"],
     "--hn-image-neighbors-per-sample acts on image neighbours"),
    (["--hn-negatives", "online", "--hn-rank-threshold", "0.1"], "--hn-rank-threshold acts on the rank term"),
    (["--hn-negatives", "online", "--hn-importance-beta", "1"], "--hn-importance-beta acts on the importance"),
    # an empty path (an unset shell variable) would silently turn its feature off
    (["--hn-negatives", "online", "--hn-eval-compositional="], "--hn-eval-compositional: empty path"),
    (["--hn-negatives", "online", "--hn-image-neighbors="], "--hn-image-neighbors: empty path"),
    (["--hn-negatives", "online", "--hn-lm="], "--hn-lm: empty path"),
    (["--model-config="], "--model-config: empty path"),
    # --hn-print-config prints only what a run would accept
    (["--hn-loss", "choice", "--hn-print-config"], "--hn-loss choice needs text hard negatives"),
    # settings that would change nothing in this run
    (["--hn-mirror", "horizontal", "--hn-loss", "clip", "--hn-label-smoothing", "0.1"],
     "--hn-label-smoothing acts on the softmaxes that hold text negatives"),
    (["--hn-save-every-steps", "50", "--hn-curriculum", "linear"], "--hn-curriculum acts on the curriculum"),
    (["--hn-save-every-steps", "50", "--hn-curriculum-warmup", "5"], "--hn-curriculum-warmup acts on the curriculum"),
    (["--hn-save-every-steps", "50", "--hn-seed", "3"], "--hn-seed acts on online text negatives"),
    (["--hn-negatives", "precomputed", "--hn-seed", "3"], "--hn-seed acts on online text negatives"),
    (["--hn-negatives", "online", "--hn-curriculum-end", "0.5"], "--hn-curriculum-end acts on a curriculum that moves"),
    (["--hn-negatives", "online", "--hn-curriculum", "linear"],
     "--hn-curriculum linear moves the share from --hn-curriculum-start to --hn-curriculum-end, both 1 here"),
    (["--hn-negatives", "online", "--hn-loss", "clip,importance"], "clip and importance are each OpenCLIP's contrastive loss"),
    (["--hn-negatives", "online", "--hn-drop-state"], "--hn-drop-state acts on a resume"),
    (["--hn-save-every-steps", "5", "--logs", "none"], "--hn-save-every-steps 5 writes checkpoints, and --logs none"),
    (["--hn-negatives", "online", "--hn-loss", "clip,choice", "--hn-choice-grad", "image", "--lock-image"],
     "--hn-choice-grad image trains only the image tower through the choice term, and --lock-image freezes it"),
    # the plugin's own tiny models are not in OpenCLIP's registry: the fix names the shipped file
    (["--model", "hn-tiny-rn-c32", "--hn-negatives", "online"],
     "--model hn-tiny-rn-c32: OpenCLIP has no model of that name; the plugin ships its config: pass "
     f"--model-config {REPO / 'open_clip_hn' / 'model_configs' / 'hn-tiny-rn-c32.json'}"),
    (["--model", "no-such-model", "--hn-negatives", "online"], "--model no-such-model: OpenCLIP has no model"),
    (["--hn-config", "recommended", "--hn-drop-state", "--hn-print-config"], "--hn-drop-state acts on a resume"),
    # an empty list (an unset shell variable) is not read as "none" or "all"
    (["--hn-negatives", "online", "--hn-mirror", ""], "no mirror axis in ''"),
    (["--hn-negatives", "online", "--hn-mirror", " , "], "no mirror axis in ' , '"),
    (["--hn-negatives", "online", "--hn-types", ""], "no negative type in ''"),
    (["--hn-config", "diht", "--hn-label-smoothing", "0.1"], "the softmaxes that hold text negatives (itc, choice or local"),
    (["--hn-negatives", "precomputed", "--hn-seed", "3"], "pass --seed to `python -m open_clip_hn.negatives precompute`"),
    (["--hn-negatives", "online", "--dataset-type", "synthetic", "--hn-sample-shuffle", "process"],
     "--dataset-type synthetic is not webdataset"),
    (["--hn-negatives", "online", "--train-data", "train.csv", "--hn-sample-shuffle", "process"],
     "--hn-sample-shuffle process acts on webdataset's shuffle buffer"),
    (["--hn-negatives", "online", "--train-data", "train.csv", "--hn-image-neighbors", "/tmp"],
     "--hn-image-neighbors reads webdataset shards"),
    (["--hn-negatives", "online", "--hn-loss", "clip"], "no loss term of this run reads text negatives"),
    (["--hn-negatives", "online", "--hn-types", "replace_object", "--hn-swap-reorders", "drop"],
     "--hn-swap-reorders acts on online swap negatives (--hn-negatives online, --hn-types with "
     "swap_objects or swap_attributes), which is off in this run"),
    (["--hn-negatives", "online", "--resume", "latest"],
     "--resume latest continues the experiment --name names; without --name OpenCLIP makes a new dated"),
    (["--hn-negatives", "online", "--resume", "/nonexistent/epoch_9.pt"],
     "--resume /nonexistent/epoch_9.pt: checkpoint /nonexistent/epoch_9.pt: file not found"),
    # local reads a ViT's patches: the tiny ResNet is refused before any work, printed or run
    (["--model", "hn-tiny-rn", "--model-config", str(TINY_RN_CONFIG), "--hn-negatives", "online",
      "--hn-loss", "clip,choice,local"], "this model does not fit: its image tower is a ResNet"),
    (["--model", "hn-tiny-rn", "--model-config", str(TINY_RN_CONFIG), "--hn-config", "fsc-clip",
      "--hn-print-config"], "this model does not fit: its image tower is a ResNet"),
])
def test_bad_flags_fail_naming_the_input(argv, message, capsys):
    from open_clip_hn import hooks

    hooks.install()
    with pytest.raises(SystemExit):
        hooks.parse_args(["--model", TINY_MODEL] + argv)
    assert message in capsys.readouterr().err


def test_save_most_recent_never_starts_over_on_a_runs_epoch_checkpoints(tmp_path, capsys):
    """OpenCLIP's --save-most-recent resume reads epoch_latest.pt alone: on a folder of
    epoch_N.pt without it (a run first trained without the flag) it trained from scratch over
    them. With the plugin on that is refused; with epoch_latest.pt there it resumes."""
    from open_clip_hn import hooks

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": {}}, folder / "epoch_1.pt")
    hooks.install()
    argv = ["--model", TINY_MODEL, *HN_ONLINE, "--logs", str(tmp_path), "--name", "run", "--resume",
            "latest", "--save-most-recent"]
    with pytest.raises(SystemExit):
        hooks.parse_args(argv)
    assert (f"--resume latest with --save-most-recent resumes only {folder / 'epoch_latest.pt'}, which "
            f"is not there, while the run's folder holds {folder / 'epoch_1.pt'}") in capsys.readouterr().err
    torch.save({"epoch": 1, "state_dict": {}}, folder / "epoch_latest.pt")
    assert hooks.parse_args(argv).save_most_recent


def test_a_hub_model_is_checked_when_built_not_fetched_at_parse_time():
    """`local` checks --model's config at parse time only where it is at hand: a hub or
    local-folder model would be downloaded or read there (offline: a traceback), so its check
    waits for the built model (`token_features.check_token_model`)."""
    from open_clip_hn import hooks

    hooks.install()
    for model in ("hf-hub:timm/ViT-B-16-SigLIP", "local-dir:/nonexistent"):
        args = hooks.parse_args(["--model", model, *HN_ONLINE, "--hn-loss", "clip,choice,local"])
        assert args.hn_loss == ("clip", "choice", "local")


def test_a_resume_file_that_cannot_be_read_is_refused_before_any_work(tmp_path, capsys):
    """`--resume PATH` (with the plugin on): a truncated file ends as a parser error naming it,
    not a torch traceback after set-up; a bare weights file (no epoch), which OpenCLIP's resume
    loads as weights only, is accepted."""
    from open_clip_hn import hooks

    whole = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.zeros(4)}}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:200])
    bare = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(4)}, bare)
    hooks.install()
    with pytest.raises(SystemExit):
        hooks.parse_args(["--model", TINY_MODEL, *HN_ONLINE, "--resume", str(cut)])
    assert f"--resume {cut}: checkpoint {cut} cannot be read" in capsys.readouterr().err
    for path in (whole, bare):
        assert hooks.parse_args(["--model", TINY_MODEL, *HN_ONLINE, "--resume", str(path)]).resume == str(path)


def test_missing_local_shards_are_refused_before_any_work(tmp_path, capsys):
    """OpenCLIP's loader logs a missing shard and goes on, so a mistyped brace range trained on
    part of the data; with the plugin on, the run stops naming the missing shards. Remote URLs
    are not checked, and without --hn-* flags OpenCLIP's own behaviour is kept."""
    from open_clip_hn import hooks

    (tmp_path / "shard-0.tar").write_bytes(b"")
    data = f"{tmp_path}/shard-{{0..2}}.tar"
    hooks.install()
    with pytest.raises(SystemExit):
        hooks.parse_args(["--model", TINY_MODEL, *HN_ONLINE, "--train-data", data])
    err = capsys.readouterr().err
    assert f"--train-data: 2 of 3 shards not found ({tmp_path}/shard-1.tar, {tmp_path}/shard-2.tar)" in err
    assert hooks.parse_args(["--model", TINY_MODEL, "--train-data", data]).train_data == data
    remote = "https://example.com/shard-{0..2}.tar"
    assert hooks.parse_args(["--model", TINY_MODEL, *HN_ONLINE, "--train-data", remote]).train_data == remote


def test_a_shard_cut_short_is_warned_about_before_any_work(tmp_path, scene_shards, caplog):
    """A truncated shard trains only on what OpenCLIP's loader reads of it (a log line per
    epoch); its missing end-of-archive marker is named at start."""
    import shutil

    from open_clip_hn import hooks

    whole = scene_shards.split("::")[0]
    shutil.copy(whole, tmp_path / "shard-0.tar")
    data = (tmp_path / "shard-0.tar").read_bytes()
    (tmp_path / "shard-1.tar").write_bytes(data[: len(data) // 2 // 512 * 512])  # cut at a block
    hooks.install()
    with caplog.at_level("WARNING"):
        hooks.parse_args(["--model", TINY_MODEL, *HN_ONLINE, "--train-data", f"{tmp_path}/shard-{{0..1}}.tar"])
    warned = [r.getMessage() for r in caplog.records if "end-of-archive" in r.getMessage()]
    assert warned and warned[0].startswith(f"--train-data: 1 of 2 shards do not end in tar's end-of-archive "
                                           f"marker, so they look cut short ({tmp_path}/shard-1.tar)")


def test_missing_nltk_data_is_refused_before_any_work(tmp_path):
    """Online negatives, converse captions and the composed mirror axes parse captions in the
    loader: a missing WordNet failed in a loader worker once training had begun (for the
    converse term, at the first caption with a relation word)."""
    from open_clip_hn.config import HNConfig

    assert HNConfig(negatives="online", num_negatives=2).parses_captions
    assert HNConfig(mirror=("horizontal+colour",), mirror_weight=1.0).parses_captions
    assert HNConfig(mirror=("horizontal",), converse_weight=1.0).parses_captions
    assert not HNConfig(mirror=("horizontal",), converse_weight=0.0).parses_captions
    assert not HNConfig(negatives="precomputed", num_negatives=2).parses_captions
    env = env_without_nltk_data(tmp_path)
    argv = train_argv(str(tmp_path / "unread.csv"), str(tmp_path), "run", "--hn-mirror", "horizontal",
                      "--hn-converse-weight", "1", "--hn-loss", "itc")
    (tmp_path / "unread.csv").write_text("filepath\ttitle\nx.png\ta cube left of a cone\n")
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: NLTK's WordNet corpus was not found" in proc.stderr
    assert "python -m nltk.downloader wordnet" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_ranks_parsing_with_different_taggers_are_refused(tmp_path):
    """Nodes with and without NLTK's tagger data would mix two parsers' negatives."""
    import torch.multiprocessing as mp

    mp.spawn(_tagger_rank, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    assert sorted(p.read_text() for p in tmp_path.glob("rank*")) == ["refused", "refused"]


def _tagger_rank(rank: int, folder: str, port: int) -> None:
    import torch.distributed as dist

    from open_clip_hn.argtypes import InputError
    from open_clip_hn.run import HardNegativeRun

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    HardNegativeRun._check_tagger("lexicon")  # the same on every rank: accepted
    try:
        HardNegativeRun._check_tagger(["nltk", "lexicon"][rank])
        outcome = "accepted"
    except InputError as err:
        outcome = "refused" if "rank 0: nltk, rank 1: lexicon" in str(err) else str(err)
    Path(folder, f"rank{rank}").write_text(outcome)
    dist.destroy_process_group()


def test_a_csv_without_the_image_or_caption_column_is_refused_before_any_work(tmp_path, capsys):
    """OpenCLIP's CSV loader raised a bare KeyError ('title') after set-up; with the plugin on the
    flags naming the columns are named, with the file's columns."""
    from open_clip_hn import hooks

    csv = tmp_path / "train.csv"
    csv.write_text("filepath\tcaption\na.png\ta red cube\n")
    hooks.install()
    with pytest.raises(SystemExit):
        hooks.parse_args(["--model", TINY_MODEL, *HN_ONLINE, "--train-data", str(csv)])
    assert (f"--train-data {csv}: no column named by --csv-caption-key title (its columns: filepath, "
            "caption)") in capsys.readouterr().err
    args = hooks.parse_args(["--model", TINY_MODEL, *HN_ONLINE, "--train-data", str(csv),
                             "--csv-caption-key", "caption"])
    assert args.csv_caption_key == "caption"


def test_resuming_a_checkpoint_trained_as_another_model_is_refused(tmp_path, capsys):
    """A checkpoint's record (its .json, or its plugin state) names the model it was trained as:
    a resume as another model of the same shapes (QuickGELU vs GELU) would load, train on as the
    wrong network and record the new model as the checkpoint's; refused at start, by path or
    through --resume latest. Without --hn-* flags OpenCLIP's resume is left alone."""
    from open_clip_hn import hooks, provenance, state

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    checkpoint = checkpoints / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.zeros(4)}}, checkpoint)
    record = provenance.model_record("ViT-B-32-quickgelu", "openai", None)
    state.save_state(str(checkpoints), 1, {"trained_as": record})  # no .json: the state's record
    hooks.install()
    for resume in (str(checkpoint), "latest"):
        with pytest.raises(SystemExit):
            hooks.parse_args(["--model", TINY_MODEL, *HN_ONLINE, "--resume", resume,
                              "--logs", str(tmp_path), "--name", "run"])
        err = capsys.readouterr().err
        assert (f"--resume {checkpoint}: it was trained as --model ViT-B-32-quickgelu, not --model "
                f"{TINY_MODEL}") in err and f"--pretrained {checkpoint}" in err
    assert hooks.parse_args(["--model", "ViT-B-32-quickgelu", *HN_ONLINE, "--resume", str(checkpoint)])
    assert hooks.parse_args(["--model", TINY_MODEL, "--resume", str(checkpoint)]).resume == str(checkpoint)


def test_a_recipe_setting_for_a_part_switched_off_is_not_refused(tmp_path, capsys):
    """Only flags typed on the command line are refused for a part that is off: a recipe is a
    bundle, and turning one of its parts off must not make the user undo each of its settings
    (they are dropped: the run's configuration has them at their defaults)."""
    from open_clip_hn import hooks

    recipe = tmp_path / "r.yaml"
    recipe.write_text("hn-negatives: online\nhn-loss: itc,choice\nhn-choice-weight: 2\n")
    hooks.install()
    args = hooks.parse_args(["--model", TINY_MODEL, "--hn-config", str(recipe), "--hn-loss", "itc"])
    assert args.hn_choice_weight == 1.0 and args.hn_loss == ("itc",)
    with pytest.raises(SystemExit):
        hooks.parse_args(["--model", TINY_MODEL, "--hn-config", str(recipe), "--hn-loss", "itc",
                          "--hn-choice-weight", "3"])
    assert "--hn-choice-weight acts on the choice term" in capsys.readouterr().err
    # a typed default is how the command line switches a recipe's part off
    args = hooks.parse_args(["--model", TINY_MODEL, "--hn-config", "cm-hnco", "--hn-loss", "itc",
                             "--hn-memory-bank-size", "0"])
    assert args.hn_memory_bank_size == 0


def test_the_patched_route_tells_typed_flags_from_the_recipes(tmp_path, capsys):
    """On patched OpenCLIP the plugin sees the argv through `expand_argv` and then `configure`:
    the flags typed before the recipe was expanded are the ones checked."""
    from open_clip_hn.hooks import Plugin

    recipe = tmp_path / "r.yaml"
    recipe.write_text("hn-negatives: online\nhn-loss: itc,choice\nhn-choice-weight: 2\n")
    parser = build_parser()
    for extra, refused in (([], False), (["--hn-choice-weight", "3"], True)):
        plugin = Plugin()
        argv = plugin.expand_argv(["--model", TINY_MODEL, "--hn-config", str(recipe), "--hn-loss", "itc",
                                   *extra], parser)
        args = parser.parse_args(argv)
        if refused:
            with pytest.raises(SystemExit):
                plugin.configure(args, argv, parser)
            assert "--hn-choice-weight acts on the choice term" in capsys.readouterr().err
        else:
            plugin.configure(args, argv, parser)
            assert plugin.run.config.choice_weight == 1.0 and plugin.run.config.loss == ("itc",)


def test_bad_exclude_negatives_stop_the_run_by_name_before_any_work(tmp_path, capsys):
    """--hn-exclude-negatives is read when the flags are parsed: a set file instead of its
    folder, a folder without sets or retrieval captions, or a damaged set stops the run with
    the flag and the path in the message (before OpenCLIP makes its logs folder)."""
    from open_clip_hn import hooks

    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "swap_objects.json").write_text('{"0": {"filename": "a.png"}}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("nothing")
    hooks.install()
    for path, message in ((tmp_path / "sets" / "swap_objects.json", "expected a folder of evaluation sets"),
                          (tmp_path / "empty", "no captions in it"),
                          (tmp_path / "sets", "item '0' lacks one of filename, caption, negative_caption")):
        with pytest.raises(SystemExit):
            hooks.parse_args(["--model", TINY_MODEL, "--hn-negatives", "online",
                              "--hn-exclude-negatives", str(path)])
        err = capsys.readouterr().err
        assert f"--hn-exclude-negatives {path}: " in err and message in err, err


def test_parser_holds_every_openclip_flag():
    import open_clip_train.params as params

    ours = {s for a in build_parser()._actions for s in a.option_strings}
    openclip_flags = set(re.findall(r'"(--[a-z0-9-]+)"', Path(params.__file__).read_text()))
    assert len(openclip_flags) > 80 and openclip_flags <= ours


@pytest.mark.slow
def test_no_hn_flag_run_equals_openclip(tmp_path, scene_csv):
    """Same seed, same data, no --hn-* flag: identical losses and identical weights."""
    run_vanilla(train_argv(scene_csv, str(tmp_path), "vanilla"))
    run_module("open_clip_hn.train", train_argv(scene_csv, str(tmp_path), "plugin"))
    assert logged_losses(tmp_path, "vanilla") == logged_losses(tmp_path, "plugin")
    a, b = checkpoint(tmp_path, "vanilla")["state_dict"], checkpoint(tmp_path, "plugin")["state_dict"]
    assert same_weights(a, b)
    assert sorted(os.listdir(tmp_path / "plugin" / "checkpoints")) == ["epoch_1.pt"]  # no .hn, no .json


PLAIN_OPENCLIP_SCORE = """
import sys, open_clip, torch
from PIL import Image
open_clip.add_model_config(sys.argv[1])
model, _, preprocess = open_clip.create_model_and_transforms(sys.argv[2], pretrained=sys.argv[3])
tokenizer = open_clip.get_tokenizer(sys.argv[2])
image = preprocess(Image.new("RGB", (32, 32), (200, 30, 30))).unsqueeze(0)
with torch.no_grad():
    f_img = model.encode_image(image, normalize=True)
    f_txt = model.encode_text(tokenizer(["a red square", "a blue ball"]), normalize=True)
probs = (100 * f_img @ f_txt.T).softmax(-1)
assert "open_clip_hn" not in sys.modules
print("SCORES", probs.tolist())
"""


def tensorboard_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.mark.slow
def test_online_negatives_epoch_loads_in_plain_openclip(tmp_path, scene_shards):
    argv = train_argv(scene_shards, str(tmp_path), "hn", *HN_ONLINE)
    argv[argv.index("--report-to") + 1] = "tensorboard"
    proc = run_module("open_clip_hn.train", argv)
    ckpt_dir = tmp_path / "hn" / "checkpoints"
    assert (ckpt_dir / "epoch_1.pt").exists() and (ckpt_dir / "epoch_1.pt.hn").exists()
    import open_clip

    from open_clip_hn.provenance import config_digest
    open_clip.add_model_config(str(TINY_MODEL_CONFIG))
    trained_as = json.loads((ckpt_dir / "epoch_1.pt.json").read_text())  # the model record
    assert trained_as["model"] == TINY_MODEL and trained_as["model_config_sha256"] == \
        config_digest(open_clip.get_model_config(TINY_MODEL))
    assert torch.load(ckpt_dir / "epoch_1.pt.hn", weights_only=False)["trained_as"] == trained_as
    log = (tmp_path / "hn" / "out.log").read_text()
    assert "Contrastive_loss" in log and "Hn_" in log  # HN statistics on OpenCLIP's console line
    tags = tensorboard_tags(tmp_path / "hn")
    assert "train/contrastive_loss" in tags and any(t.startswith("train/hn_") for t in tags)
    assert_plain_openclip_scores(ckpt_dir / "epoch_1.pt")
    assert proc.returncode == 0


def assert_plain_openclip_scores(checkpoint_path: Path) -> None:
    """A process that never imports open_clip_hn loads the checkpoint and scores with it."""
    scored = subprocess.run(
        [sys.executable, "-c", PLAIN_OPENCLIP_SCORE, str(TINY_MODEL_CONFIG), TINY_MODEL,
         str(checkpoint_path)], capture_output=True, text=True, timeout=120)
    assert scored.returncode == 0, scored.stderr[-3000:]
    probs = json.loads(scored.stdout.split("SCORES", 1)[1])
    assert abs(sum(probs[0]) - 1) < 1e-5


@pytest.mark.slow
def test_all_objectives_epoch_logs_each_term(tmp_path, scene_shards):
    """Issue 5's run: importance (HCL's contrastive loss, in place of itc: two contrastive terms
    are refused since session 32), intra, rank + the bank's mined term + a linear curriculum
    with warmup."""
    argv = train_argv(scene_shards, str(tmp_path), "all", "--hn-negatives", "online",
                      "--hn-num-negatives", "2", "--hn-loss", "importance,intra,rank,choice,mined",
                      "--hn-memory-bank-size", "256", "--hn-curriculum", "linear",
                      "--hn-curriculum-start", "0.5", "--hn-curriculum-warmup", "2")
    run_module("open_clip_hn.train", argv)
    lines = [l for l in (tmp_path / "all" / "out.log").read_text().splitlines() if "Train Epoch" in l]
    for term in ("Contrastive_loss", "Intra_loss", "Rank_loss", "Choice_loss", "Mined_loss", "Hn_curriculum"):
        assert term in lines[-1], term
    curriculum = [float(l.split("Hn_curriculum:")[1].split()[0]) for l in lines]
    assert curriculum[0] == 0.0 and curriculum[-1] > 0  # no hard negatives during warmup
    assert "nan" not in " ".join(lines).lower()
    assert_plain_openclip_scores(tmp_path / "all" / "checkpoints" / "epoch_1.pt")


MIRROR = ["--hn-mirror", "horizontal,vertical", "--hn-mirror-weight", "2", "--hn-loss", "itc,choice"]
CONVERSE = [*MIRROR, "--hn-converse-weight", "1"]
COLOUR = ["--hn-mirror", "colour", "--hn-mirror-weight", "2", "--hn-loss", "itc,choice"]


DISTILL = ["--hn-distill", "ema", "--hn-distill-ema-decay", "0.5", "--hn-loss", "itc,choice"]
LOCAL = ["--hn-mirror", "horizontal", "--hn-loss", "clip,choice,local", "--hn-local-weight", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], MIRROR, DISTILL, CONVERSE, COLOUR, LOCAL],
                         ids=["negatives", "negatives+mirror", "negatives+distill",
                              "negatives+mirror+converse", "negatives+colour", "negatives+mirror+local"])
def test_accum_freq_equals_the_big_batch(tmp_path, scene_csv, extra):
    """--accum-freq 2 with batch 4 takes the same steps as batch 8: the metadata (and the
    mirrored pairs) stay aligned."""
    big = train_argv(scene_csv, str(tmp_path), "big", *HN_ONLINE, *extra, batch_size=8)
    accum = train_argv(scene_csv, str(tmp_path), "accum", *HN_ONLINE, *extra, "--accum-freq", "2",
                       batch_size=4)
    run_module("open_clip_hn.train", big)
    run_module("open_clip_hn.train", accum)
    a, b = checkpoint(tmp_path, "big")["state_dict"], checkpoint(tmp_path, "accum")["state_dict"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    # Adam turns float noise in a near-zero gradient into up to a step of lr (1e-3) for that
    # weight (1.1e-4 with one thread for `local`); metadata out of line moves many by steps
    assert worst < 2.5e-4, worst
    if extra == DISTILL:  # the EMA teacher moved once per optimizer step in both runs
        log = (tmp_path / "accum" / "out.log").read_text()
        assert "Distill_loss" in log
        assert "--hn-distill ema with neither --pretrained nor --resume" in log  # from scratch
        teachers = [torch.load(tmp_path / name / "checkpoints" / "epoch_1.pt.hn",
                               weights_only=False)["teacher"] for name in ("big", "accum")]
        assert teachers[0]["updates"] == teachers[1]["updates"] == 32 // 8
        for key, value in teachers[0]["weights"].items():
            torch.testing.assert_close(value, teachers[1]["weights"][key], rtol=1e-4, atol=1e-4)
    if extra == LOCAL:  # the token-level term trained, with a value, in both runs
        for run in ("big", "accum"):
            lines = [l for l in (tmp_path / run / "out.log").read_text().splitlines() if "Local_loss" in l]
            assert lines and float(lines[-1].split("Local_loss:")[1].split()[0]) > 0, run
    if extra == CONVERSE:  # the converse term ran in both runs (the equality above covers its rows)
        log = (tmp_path / "accum" / "out.log").read_text()
        assert "Converse_loss" in log and "Hn_converse_acc" in log
    if extra == MIRROR:
        log = (tmp_path / "accum" / "out.log").read_text()
        mirrored = [float(l.split("Hn_mirrored:")[1].split()[0]) for l in log.splitlines()
                    if "Train Epoch" in l]
        assert mirrored and min(mirrored) == 1.0  # every scene caption names a relation
        assert "Mirror_loss" in log
        assert_plain_openclip_scores(tmp_path / "accum" / "checkpoints" / "epoch_1.pt")
    if extra == COLOUR:  # colour-exchanged pairs rode in the micro-batches
        log = (tmp_path / "accum" / "out.log").read_text()
        mirrored = [float(l.split("Hn_mirrored:")[1].split()[0]) for l in log.splitlines()
                    if "Train Epoch" in l]
        # the scenes whose two objects differ in colour (most; "a red cube above a red cone" has none)
        assert mirrored and 0.4 < sum(mirrored) / len(mirrored) < 1.0
        assert "Mirror_loss" in log


@pytest.mark.slow
def test_resume_latest_restores_plugin_state(tmp_path, scene_shards):
    first = train_argv(scene_shards, str(tmp_path), "run", *HN_ONLINE, "--hn-memory-bank-size",
                       "16", "--hn-loss", "itc,mined", epochs=1)
    run_module("open_clip_hn.train", first)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "epoch_1.pt.hn", weights_only=False)
    second = train_argv(scene_shards, str(tmp_path), "run", *HN_ONLINE, "--hn-memory-bank-size",
                        "16", "--hn-loss", "itc,mined", "--resume", "latest", epochs=2)
    run_module("open_clip_hn.train", second)
    log = (tmp_path / "run" / "out.log").read_text()
    assert "restored hard-negative state" in log
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "epoch_2.pt.hn", weights_only=False)
    assert saved["epoch"] == 1 and resumed["epoch"] == 2
    step = next(k for k in saved["loss"] if k.endswith("step"))
    steps_per_epoch = 32 // 8
    assert int(saved["loss"][step]) == steps_per_epoch
    assert int(resumed["loss"][step]) == 2 * steps_per_epoch


@pytest.mark.slow
@pytest.mark.parametrize("latest", [False, True], ids=["epochs", "save-most-recent"])
def test_delete_previous_checkpoint_leaves_no_state_or_record_behind(tmp_path, scene_shards, latest):
    extra = ["--save-most-recent"] if latest else []
    argv = train_argv(scene_shards, str(tmp_path), "run", *HN_ONLINE,
                      "--delete-previous-checkpoint", *extra, epochs=3)
    run_module("open_clip_hn.train", argv)
    left = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    latest_files = ["epoch_latest.pt", "epoch_latest.pt.json"] if latest else []
    assert left == ["epoch_3.pt", "epoch_3.pt.hn", "epoch_3.pt.json", *latest_files]


def test_a_bank_smaller_than_one_global_batch_is_refused(tmp_path, scene_shards):
    """Each step pushes all ranks' pairs; a smaller bank kept only part of the latest batch."""
    argv = train_argv(scene_shards, str(tmp_path), "run", *HN_ONLINE, "--hn-loss", "itc,mined",
                      "--hn-memory-bank-size", "6", "--hn-mined-k", "2")
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert ("error: --hn-memory-bank-size 6 is smaller than one global batch (8 x 1 ranks = 8)"
            in proc.stderr)
    assert not (tmp_path / "run").exists()  # refused before OpenCLIP makes the run's folder
    # a step with --accum-freq 2 pushes both micro-batches
    argv = train_argv(scene_shards, str(tmp_path), "accum", *HN_ONLINE, "--hn-loss", "itc,mined",
                      "--hn-memory-bank-size", "8", "--hn-mined-k", "2", "--accum-freq", "2")
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and ("error: --hn-memory-bank-size 8 is smaller than one global batch "
                                     "(8 x 1 ranks x --accum-freq 2 = 16)") in proc.stderr, proc.stderr[-2000:]


def test_precomputed_without_negatives_is_refused(tmp_path, scene_shards):
    argv = train_argv(scene_shards, str(tmp_path), "pre", "--hn-negatives", "precomputed")
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0
    assert "has no neg.json members" in proc.stderr + proc.stdout
    assert "open_clip_hn.negatives precompute" in proc.stderr + proc.stdout


def test_too_few_captions_for_the_plausibility_filter_is_an_error_naming_the_fix(tmp_path, scene_shards):
    """`--hn-plausibility train-data` on 64 captions: `error: ...`, exit 2, no traceback, no step."""
    argv = train_argv(scene_shards, str(tmp_path), "few", "--hn-negatives", "online",
                      "--hn-plausibility", "train-data")
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --hn-plausibility train-data: " in proc.stderr
    assert f"{scene_shards}: 64 usable captions; a plausibility model needs at least 200" in proc.stderr
    assert "--hn-plausibility none" in proc.stderr
    assert "Traceback" not in proc.stderr and "Train Epoch" not in proc.stderr + proc.stdout


def run_two_ranks(argv: list[str]) -> None:
    """`open_clip_hn.train argv` as 2 gloo CPU processes (the env torchrun sets); both succeed."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": "2", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-m", "open_clip_hn.train", *argv], cwd=REPO,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]


@pytest.mark.slow
def test_two_ranks_train_with_negatives(tmp_path, scene_shards):
    """2 gloo CPU processes (the env torchrun sets): both ranks train, one checkpoint + state;
    each rank reads the same vocabulary from the training captions."""
    argv = train_argv(scene_shards, str(tmp_path), "ddp", *HN_ONLINE, "--dist-backend", "gloo",
                      "--hn-vocabulary", "train-data", batch_size=4)
    run_two_ranks(argv)
    log = (tmp_path / "ddp" / "out.log").read_text()
    assert "Process (global: 0, local 0), total 2" in log
    assert f"Negatives stay inside the {len(scene_words())} words of the --train-data captions" in log
    assert "Hn_" in log
    assert (tmp_path / "ddp" / "checkpoints" / "epoch_1.pt.hn").exists()


@pytest.mark.slow
def test_an_epoch_checkpoint_of_one_process_resumes_on_two_ranks(tmp_path, scene_shards):
    """OpenCLIP loads a one-process checkpoint into the DDP wrapper as it is (no `module.`
    prefix: every key missing); with the plugin on the run scales out at an epoch end."""
    run_module("open_clip_hn.train", train_argv(scene_shards, str(tmp_path), "grow", *HN_ONLINE))
    argv = train_argv(scene_shards, str(tmp_path), "grow", *HN_ONLINE, "--dist-backend", "gloo",
                      "--resume", "latest", batch_size=4, epochs=2)
    run_two_ranks(argv)
    log = (tmp_path / "grow" / "out.log").read_text()
    assert "=> resuming checkpoint" in log and "=> restored hard-negative state" in log
    resumed = checkpoint(tmp_path, "grow", 2)
    assert all(k.startswith("module.") for k in resumed["state_dict"])  # as OpenCLIP saves on DDP


INSTALL_ROUTE = ("import sys, open_clip_hn; open_clip_hn.install(); "
                 "import open_clip_train.main as m; m.main(sys.argv[1:])")


@pytest.mark.slow
def test_install_route_and_in_loop_evaluation(tmp_path, scene_shards):
    """`open_clip_hn.install()` then OpenCLIP's own `main`; compositional accuracy is logged."""
    from open_clip_hn.scenes import write_compositional_sets

    sets = tmp_path / "sets"
    write_compositional_sets(str(sets), num_items=24, num_pairs=8, num_retrieval=16)
    argv = train_argv(scene_shards, str(tmp_path), "own", *HN_ONLINE, "--hn-eval-compositional",
                      str(sets), num_samples=16)
    proc = subprocess.run([sys.executable, "-c", INSTALL_ROUTE, *argv], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "own" / "checkpoints" / "epoch_1.pt.hn").exists()
    results = [json.loads(line) for line in
               (tmp_path / "own" / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert results[-1]["epoch"] == 1
    accuracies = {k: v for k, v in results[-1].items() if k.endswith("/acc")}
    assert "compositional/replace_relation/acc" in accuracies
    assert all(0 <= v <= 1 for v in accuracies.values())
    assert "Eval Epoch: 1" in (tmp_path / "own" / "out.log").read_text()


def test_readme_documents_every_plugin_flag():
    readme = (REPO / "README.md").read_text()
    group = next(g for g in build_parser()._action_groups if g.title.startswith("open_clip_hn"))
    missing = [a.option_strings[0] for a in group._group_actions if f"`{a.option_strings[0]}" not in readme]
    assert not missing, f"README's flag reference lacks {missing}"


@pytest.mark.slow
def test_a_second_run_into_a_live_runs_folder_is_refused(tmp_path, scene_shards):
    """Two jobs with one --logs/--name (both resume latest, as the SLURM launcher's do) trained
    into one folder: the second picked up the first's step checkpoint, which the first deleted
    at its next save, and params.txt and out.log mixed both runs. The process training into a
    folder holds a lock on it; a dead run's lock is gone, so a requeued job is not refused."""
    import signal

    from conftest import start_training, wait_for_steps

    argv = train_argv(scene_shards, str(tmp_path), "shared", *HN_ONLINE, "--resume", "latest",
                      epochs=50, num_samples=64)
    first = start_training(argv)
    try:
        wait_for_steps(tmp_path / "shared" / "out.log", 2, first)
        second = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True,
                                text=True, timeout=300, cwd=REPO)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"process {first.pid} on " in second.stderr
        assert f"is training into {tmp_path / 'shared'}: two runs in one experiment folder" in second.stderr
        assert "OpenCLIP made the run's folder" not in second.stderr  # the live run's: keep it
        assert first.poll() is None  # the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the first is dead (no stop, no save): its lock went with it, and a restart resumes
    restart = train_argv(scene_shards, str(tmp_path), "shared", *HN_ONLINE, "--resume", "latest",
                         epochs=1, num_samples=64)
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *restart], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and "is training into" not in proc.stderr, proc.stderr[-3000:]


LOCKS_FILE = """
import fcntl, sys
handle = open(sys.argv[1], "a+")
try:
    fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except OSError:
    print("held")
"""


def test_the_folder_lock_is_released_when_an_in_process_run_ends(tmp_path, monkeypatch):
    """A run started in-process (a notebook) kept its experiment-folder lock after it ended, so
    any other process training into that folder was refused by an idle one."""
    import argparse

    from open_clip_hn import hooks

    lock = tmp_path / hooks.LOCK_NAME
    seen = []

    def fake_main(argv):
        hooks.claim_experiment_folder(argparse.Namespace(log_path=str(tmp_path / "out.log"), rank=0,
                                                         checkpoint_path=str(tmp_path / "checkpoints")))
        seen.append(subprocess.run([sys.executable, "-c", LOCKS_FILE, str(lock)], capture_output=True,
                                   text=True).stdout.strip())

    monkeypatch.setattr(hooks.oc_main, "main", fake_main)
    hooks.run_openclip_main([])
    after = subprocess.run([sys.executable, "-c", LOCKS_FILE, str(lock)], capture_output=True, text=True)
    assert seen == ["held"] and after.stdout.strip() == "free"


def test_claiming_the_folder_removes_the_temps_of_killed_saves(tmp_path, caplog):
    """A kill during a checkpoint's write leaves its temp (a whole checkpoint's size); the next
    run into the folder, holding its lock, removes every such temp, whichever host wrote it."""
    import argparse

    from open_clip_hn import hooks
    from open_clip_hn.files import TMP_PREFIX

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname().replace("-", "_")
    left = [f"{TMP_PREFIX}otherhost-1-abcepoch_2.pt", f"{TMP_PREFIX}{host}-{dead}-x.pt",
            "epoch_3.pt.tmp", "tmp.pt"]
    kept = ["epoch_1.pt", "epoch_1.pt.hn", "notes.tmp",
            f"{TMP_PREFIX}{host}-{os.getpid()}-y.pt"]  # a live writer of this host keeps its temp
    for name in left + kept:
        (checkpoints / name).write_bytes(b"x")
    args = argparse.Namespace(log_path=str(tmp_path / "out.log"), rank=0, checkpoint_path=str(checkpoints))
    try:
        with caplog.at_level("INFO"):
            hooks.claim_experiment_folder(args)
    finally:
        for handle in hooks._LOCKS.values():
            handle.close()
        hooks._LOCKS.clear()
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(kept)
    assert "Removed 4 temp file(s) of interrupted saves" in caplog.text


def test_lock_text_without_frozen_layer_norms_is_refused_before_the_model_is_built(scene_shards, capsys):
    """OpenCLIP's CLIP asserts 'Unfreezing LayerNorm is not supported' once the model is built;
    with --hn-* flags the command line is refused naming the flag that fixes it."""
    from open_clip_hn.hooks import parse_args

    base = ["--model", "RN50", "--train-data", scene_shards, "--hn-negatives", "online", "--lock-text"]
    with pytest.raises(SystemExit):
        parse_args(base)
    assert "add --lock-text-freeze-layer-norm" in capsys.readouterr().err
    assert parse_args([*base, "--lock-text-freeze-layer-norm"]).lock_text
