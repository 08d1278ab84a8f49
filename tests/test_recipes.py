"""Recipe files: keys validated against the real parser, command line overrides, print round trip."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from conftest import load_benchmark
from open_clip_hn.config import HNConfig, given_hn_flags
from open_clip_hn.hooks import build_parser, recipe_config
from open_clip_hn.recipes import expand_recipe, format_resolved_config, recipe_argv

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
EXPECTED_RECIPES = {"negclip", "ce-clip", "diht", "cm-hnco", "fsc-clip", "concept-permutation",
                    "recommended"}


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_listed_recipe_exists_with_a_header():
    assert {p.stem for p in CONFIGS} == EXPECTED_RECIPES
    for path in CONFIGS:
        header = path.read_text().splitlines()[:4]
        assert all(line.startswith("#") for line in header), path
        assert "Source:" in path.read_text() and "Reproduces:" in path.read_text(), path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_resolves_into_a_valid_config(path: Path, parser):
    args = parser.parse_args(recipe_argv(str(path), parser))
    config = HNConfig.from_args(args)
    recipe = yaml.safe_load(path.read_text())
    if "hn-loss" in recipe:
        expected = recipe["hn-loss"]
        expected = expected if isinstance(expected, list) else expected.split(",")
        assert config.loss == tuple(expected)
    if "lr" in recipe:
        assert args.lr == pytest.approx(float(recipe["lr"]))


def test_key_spellings_and_value_forms(tmp_path, parser):
    path = write(tmp_path, "batch_size: 7\n--hn-num-negatives: 2\nhn-loss: [itc, choice]\n"
                           "lock-image: true\nsave-most-recent: false\nimage-mean: [0.1, 0.2, 0.3]\n"
                           "aug-cfg: {scale: [0.5, 1.0], use_timm: false}\nhn-negatives: online\n")
    argv = recipe_argv(path, parser)
    args = parser.parse_args(argv)
    assert args.batch_size == 7 and args.hn_num_negatives == 2
    assert args.hn_loss == ("itc", "choice")
    assert args.lock_image is True and args.save_most_recent is False
    assert args.image_mean == [0.1, 0.2, 0.3]
    assert args.aug_cfg == {"scale": [0.5, 1.0], "use_timm": False}


def test_command_line_overrides_the_file(tmp_path, parser):
    path = write(tmp_path, "batch-size: 7\nhn-negatives: online\nhn-num-negatives: 2\n")
    argv = expand_recipe(["--hn-config", path, "--hn-num-negatives", "5"], parser)
    args = parser.parse_args(argv)
    assert (args.batch_size, args.hn_negatives, args.hn_num_negatives) == (7, "online", 5)
    assert args.hn_config_file == path
    assert expand_recipe(["--batch-size", "3"], parser) == ["--batch-size", "3"]
    path = write(tmp_path, "hn-negatives: online\nhn-vocabulary: train-data\n", "v.yaml")
    assert parser.parse_args(expand_recipe(["--hn-config", path], parser)).hn_vocabulary == "train-data"
    lifted = parser.parse_args(expand_recipe(["--hn-config", path, "--hn-vocabulary", "none"], parser))
    assert lifted.hn_vocabulary is None  # 'none' drops a recipe's vocabulary


def test_a_flag_typed_twice_is_warned_about_but_a_recipe_override_is_not(tmp_path, parser, caplog):
    path = write(tmp_path, "hn-negatives: online\nhn-num-negatives: 2\n")
    with caplog.at_level("WARNING"):
        argv = expand_recipe(["--hn-config", path, "--hn-num-negatives", "5"], parser)
    assert not caplog.records and parser.parse_args(argv).hn_num_negatives == 5
    with caplog.at_level("WARNING"):
        argv = expand_recipe(["--hn-num-neg", "3", "--hn-num-negatives=4", "--", "--hn-num-negatives"],
                             parser)
    assert [r.getMessage() for r in caplog.records] == [
        "--hn-num-negatives is given 2 times on the command line: the last one counts"]


def test_early_warnings_are_printed_once_and_replayed_into_the_runs_log(tmp_path):
    import logging

    from open_clip_hn.hooks import early_warnings, log_early_warnings

    root = logging.getLogger()
    kept = root.handlers[:]
    root.handlers[:] = []  # as in a fresh process: nothing configured logging yet
    try:
        with early_warnings():
            logging.warning("read early")
        assert root.handlers == []  # logging.warning did not configure the root logger itself
        log = logging.FileHandler(tmp_path / "out.log")  # OpenCLIP's setup_logging, later
        root.addHandler(log)
        log_early_warnings()
        log_early_warnings()  # once only
        log.close()
        root.removeHandler(log)
        own = logging.FileHandler(tmp_path / "own.log")  # a caller's log, there while parsing
        root.addHandler(own)
        with early_warnings():
            logging.warning("read early again")
        log_early_warnings()
        own.close()
    finally:
        root.handlers[:] = kept
    assert (tmp_path / "out.log").read_text().count("read early") == 1
    assert (tmp_path / "own.log").read_text().count("read early again") == 1  # not twice


def test_print_config_is_the_file_plus_overrides(tmp_path, parser):
    recipe_path = CONFIGS[[p.stem for p in CONFIGS].index("ce-clip")]
    overrides = ["--hn-num-negatives", "2", "--batch-size", "16", "--hn-types", "swap_objects"]
    args = parser.parse_args(expand_recipe(["--hn-config", str(recipe_path), *overrides], parser))
    printed = yaml.safe_load(format_resolved_config(args, parser))

    expected = yaml.safe_load(recipe_path.read_text())
    expected.update({"hn-num-negatives": 2, "batch-size": 16, "hn-types": "swap_objects"})
    expected["hn-loss"] = ",".join(expected["hn-loss"])  # printed in the flag's own comma form
    expected["hn-types"] = "swap_objects"
    for key, value in expected.items():
        assert printed[key] == value, key
    # Everything else keeps the parser's default.
    defaults = parser.parse_args([])
    assert printed["epochs"] == defaults.epochs and printed["hn-memory-bank-size"] == 0
    # The printed text is itself a recipe that reproduces the same namespace.
    again = parser.parse_args(recipe_argv(write(tmp_path, format_resolved_config(args, parser), "p.yaml"),
                                          parser))
    assert {k: v for k, v in vars(again).items() if k != "hn_config_file"} == \
           {k: v for k, v in vars(args).items() if k != "hn_config_file"}


@pytest.mark.parametrize("text, message", [
    ("hn-num-negatvies: 3\n", "unknown key 'hn-num-negatvies'. Did you mean 'hn-num-negatives'?"),
    ("hn-num-negatives: many\n", "key 'hn-num-negatives' has a bad value 'many'"),
    ("hn-num-negatives: -1\n", "must be >= 0"),
    ("hn-negatives: offline\n", "key 'hn-negatives' must be one of none, online, precomputed"),
    ("hn-loss: [itc, bogus]\n", "unknown loss term(s) bogus"),
    ("lock-image: 1\n", "key 'lock-image' is a switch: use true or false"),
    ("batch-size: true\n", "key 'batch-size' expects a single value"),
    ("hn-config: other.yaml\n", "cannot be set inside a recipe"),
    ("- batch-size\n", "must be a mapping of flag names to values"),
    # one of two settings, or a value left out, would be lost without a word
    ("hn-loss: itc\nhn-loss: itc,choice\n", "key 'hn-loss' is given twice"),
    ("hn_num_negatives: 2\nhn-num-negatives: 6\n",
     "keys 'hn_num_negatives' and 'hn-num-negatives' both set --hn-num-negatives; keep one"),
    ("hn-loss:\n", "key 'hn-loss' has no value; give one, or remove the key"),
    ("hn-types: []\n", "key 'hn-types' has no value"),
    # a run with a recipe that sets nothing trained without any hard negative
    ("", "sets no flag (the file is empty or holds only comments)"),
    ("# hn-loss: itc,choice\n", "sets no flag (the file is empty or holds only comments)"),
    ("{}\n", "sets no flag"),
    # the command line's abbreviation is not a key; Python's own texts are not the message
    ("hn-num: 2\n", "unknown key 'hn-num'. Did you mean 'hn-num-negatives'? (a recipe's keys are whole"),
    ("hn-seed: 1.5\n", "key 'hn-seed' has a bad value 1.5: expects a whole number"),
    ("hn-negatives: off\n", "got False (YAML reads true/false/yes/no/on/off as a switch: quote a word"),
])
def test_bad_recipes_name_the_key_the_file_and_the_fix(tmp_path, parser, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        recipe_argv(path, parser)
    assert message in str(err.value) and path in str(err.value)


def test_a_folder_or_a_device_as_recipe_is_named_for_what_it_is(tmp_path):
    from open_clip_hn.recipes import resolve_recipe

    with pytest.raises(FileNotFoundError, match=f"recipe {tmp_path} is a folder; give a YAML recipe file"):
        resolve_recipe(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="recipe /dev/null is not a regular file"):
        resolve_recipe("/dev/null")


def test_unknown_key_lists_the_valid_keys(tmp_path, parser):
    path = write(tmp_path, "not-a-flag: 1\n")
    with pytest.raises(ValueError, match="Valid keys: .*hn-negatives.*") as err:
        recipe_argv(path, parser)
    assert "batch-size" in str(err.value)


def test_missing_recipe_file(tmp_path, parser):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_recipe(["--hn-config", str(tmp_path / "nope.yaml")], parser)


def test_a_file_named_like_a_shipped_recipe_is_refused_unless_given_as_a_path(tmp_path, parser,
                                                                               monkeypatch):
    """`--hn-config negclip` read a file `negclip` of the working folder (empty: no hard
    negatives) while the printed header and params.txt looked like the shipped recipe's."""
    from open_clip_hn.recipes import resolve_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "negclip").write_text("hn-negatives: online\n")
    with pytest.raises(FileNotFoundError, match="'negclip' is both a shipped recipe and a file in"):
        resolve_recipe("negclip")
    assert resolve_recipe("./negclip") == "./negclip"
    (tmp_path / "negclip").unlink()
    assert resolve_recipe("negclip").endswith("negclip.yaml")
    args = parser.parse_args(expand_recipe(["--hn-config", "negclip"], parser))
    assert format_resolved_config(args, parser).startswith(
        f"# resolved configuration (recipe negclip: {resolve_recipe('negclip')} + command line)")


def run_config(flags: list[str], parser: argparse.ArgumentParser) -> HNConfig:
    """The configuration a run with `flags` gets, checked as the trainer checks it (a setting
    typed for a part that is off included)."""
    argv = expand_recipe(list(flags), parser)
    args = parser.parse_args(argv)
    args.hn_given, args.hn_typed = given_hn_flags(argv, parser), given_hn_flags(flags, parser)
    return HNConfig.from_args(args, recipe=recipe_config(args, parser))


def test_recipe_worlds_variants_resolve_and_the_hinge_variant_is_the_shipped_recipe(parser):
    """benchmarks/recipe_worlds.py names the runs behind README's tables: each must still build a
    valid configuration after the recipe file changes, and the variant the recipe was chosen from
    must be the recipe as shipped (so its measurements are the shipped recipe's)."""
    module = load_benchmark("recipe_worlds")

    configs = {name: run_config(flags, parser) for name, flags in module.VARIANTS.items() if flags}
    shipped = configs["recommended.yaml"]
    assert configs["recommended + converse hinge 0.02 (weight 10), mirror 1"] == shipped
    assert configs["recommended + distill ema"].mirror_weight == 5 and \
        configs["recommended + distill ema"].converse_weight == 0  # sessions 10-12's recipe
    assert configs["previous recommended - mirrors"].mirror == ()
    assert configs["recommended.yaml - mirrors"].mirror == () and \
        configs["recommended.yaml - mirrors"].converse_weight == 0


def test_recipe_worlds_towers_are_shipped_configs_that_differ_only_where_named():
    """Each (world, tower) of recipe_worlds.py names a model config the package ships; the
    diagnostic towers change only what their name says (vit-w128 the image width, vit-t4 the text
    depth), so a change of result is theirs and not some other difference."""
    module = load_benchmark("recipe_worlds")
    configs = {tower: json.loads((Path(module.CONFIGS) / name).read_text())
               for (_, tower), name in module.MODEL_CONFIGS.items()}
    vit = configs["vit"]
    assert configs["vit-w128"]["text_cfg"] == vit["text_cfg"]
    assert {k: v for k, v in configs["vit-w128"]["vision_cfg"].items() if k != "width"} == \
        {k: v for k, v in vit["vision_cfg"].items() if k != "width"}
    assert configs["vit-t4"]["vision_cfg"] == vit["vision_cfg"]
    assert configs["vit-t4"]["text_cfg"] == {**vit["text_cfg"], "layers": 2 * vit["text_cfg"]["layers"]}


def test_recipe_worlds_scores_each_run_once(tmp_path, monkeypatch):
    """recipe_worlds.scored_run (also oracle_world2.py's) trains and evaluates a run once: the
    same command line is read back from the scores file, another one is trained again."""
    module = load_benchmark("recipe_worlds")
    calls = []
    acc = {"acc": 0.5}
    monkeypatch.setattr(module.demo, "run_training", lambda argv, logs, name, epochs, quiet:
                        calls.append(name) or f"{logs}/{name}/epoch_{epochs}.pt")
    monkeypatch.setattr(module.demo, "evaluate_checkpoints", lambda checkpoints, sets, device, model_config: {
        v: {"test": {**{k: acc for k in ("replace_relation", "swap_attributes", "swap_objects",
                                           "replace_object")}, "retrieval": {"image_to_text_R@1": 0.25}}}
        for v in checkpoints})
    args = argparse.Namespace(epochs=3, device="cpu", samples=10, lr=1e-3)
    scores = str(tmp_path / "scores.json")

    def run(argv):
        return module.scored_run(args, scores, "world2/vit", "v", "a", argv, str(tmp_path), "test",
                                 "m.json")
    first = run(["--name", "a", "--seed", "0"])
    assert first["i2t_R@1"] == 0.25 and calls == ["a"]
    assert run(["--name", "a", "--seed", "0"]) == first and calls == ["a"]  # recorded: not run again
    run(["--name", "a", "--seed", "1"])
    assert calls == ["a", "a"]
    recorded = json.load(open(scores))["world2/vit"]["v"]
    assert recorded["stamp"]["argv"] == ["--name", "a", "--seed", "1"] and recorded["settings"]["samples"] == 10
    (tmp_path / "scores.json").write_text("{broken")
    with pytest.raises(SystemExit, match="scores file .*scores.json is not readable JSON"):
        run(["--name", "a", "--seed", "1"])


def test_recipe_worlds_seeds_train_in_their_own_folders(tmp_path):
    """A second seed of recipe_worlds.py must neither reuse nor overwrite seed 0's runs: its own
    runs folder, its own setting name in the scores files, and the seed in its training command;
    seed 0 keeps the names its finished runs were recorded under."""
    module = load_benchmark("recipe_worlds")
    assert module.setting_folder("/o", "world2", "resnet", 0) == ("world2/resnet",
                                                                  "/o/runs/world2-resnet")
    setting, logs = module.setting_folder("/o", "world2", "resnet", 2)
    assert setting == "world2/resnet seed 2" and logs == "/o/runs/world2-resnet-seed2"
    parser = argparse.ArgumentParser()
    module.add_protocol_arguments(parser)
    args = parser.parse_args(["--seed", "2", "--samples", "512"])
    data = module.demo.DemoData(str(tmp_path / "train"), str(tmp_path / "val"), str(tmp_path / "test"))
    argv = module.continued_argv(args, data, logs, "m.json", "vanilla", "p.pt", [])
    assert argv[argv.index("--seed") + 1] == "2" and argv[argv.index("--logs") + 1] == logs
    assert module.steps_per_epoch(args) == 2 and argv[argv.index("--warmup") + 1] == "1"


def test_ablate_demo_rows_resolve(parser):
    """Every row of benchmarks/ablate_demo.py builds a valid configuration from the shipped recipe
    (taking the mirrors away must take the converse term, which needs them, too)."""
    module = load_benchmark("ablate_demo")
    for name, flags in module.ABLATIONS.items():
        if flags:
            config = run_config(flags, parser)
            assert ("mirror" in name and "without mirrors" in name) == (config.mirror == ()), name


def test_recipe_worlds_demo64_renders_the_demo_world_at_the_vits_resolution(tmp_path, monkeypatch,
                                                                            capsys):
    """demo64 is the demo's world drawn at 64 pixels (not 32-pixel scenes the ViT upsamples): its
    shards and test images are 64 pixels, the demo's stay 32, each world in its own data folder;
    it exists for the ViT only, and an unknown world or a setting without a model config is
    refused by name."""
    from PIL import Image

    import io
    import tarfile

    from open_clip_hn.files import expand_shards

    module = load_benchmark("recipe_worlds")
    sizes = {}
    for world in ("demo", "demo64", "world2"):
        data = module.prepare_world(str(tmp_path), world, 8, 4)
        assert data.test.startswith(str(tmp_path / f"data-{world}"))
        picture = sorted((tmp_path / f"data-{world}" / "test" / "images").glob("*.png"))[0]
        with tarfile.open(expand_shards(data.train)[0]) as shard:
            member = next(m for m in shard.getmembers() if m.name.endswith(".png"))
            trained = Image.open(io.BytesIO(shard.extractfile(member).read())).size
        sizes[world] = (Image.open(picture).size, trained)
    assert sizes == {"demo": ((32, 32), (32, 32)), "demo64": ((64, 64), (64, 64)),
                     "world2": ((64, 64), (64, 64))}
    with pytest.raises(ValueError, match="unknown world 'demo128'.*demo64"):
        module.prepare_world(str(tmp_path), "demo128", 8, 4)
    assert ("demo64", "vit") in module.MODEL_CONFIGS and ("demo64", "resnet") not in module.MODEL_CONFIGS
    monkeypatch.setattr("sys.argv", ["recipe_worlds.py", "--output-dir", str(tmp_path),
                                     "--settings", "demo64/resnet", "--variants", "vanilla"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2 and "demo64/vit" in capsys.readouterr().err


def test_a_recipes_bad_path_names_its_key_and_where_paths_are_read_from(tmp_path, scene_shards,
                                                                       capsys, monkeypatch):
    """`hn-vocabulary: words.txt` beside the recipe is read from the working folder, as on the
    command line; the error says so and names the recipe's key, not only the flag."""
    from open_clip_hn.hooks import parse_args

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "words.txt").write_text("cube\nsphere\n")
    recipe = tmp_path / "recipes" / "rel.yaml"
    recipe.write_text("hn-negatives: online\nhn-vocabulary: words.txt\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        parse_args(["--model", "RN50", "--train-data", scene_shards, "--hn-config", str(recipe)])
    err = capsys.readouterr().err
    assert "error: --hn-vocabulary words.txt: file not found" in err
    assert (f"(key hn-vocabulary of --hn-config {recipe}); a recipe's relative paths are read from "
            "the working folder, as on the command line") in err
    monkeypatch.chdir(tmp_path / "recipes")  # from the recipe's folder the same recipe reads it
    assert parse_args(["--model", "RN50", "--train-data", scene_shards, "--hn-config",
                       str(recipe)]).hn_vocabulary == "words.txt"
