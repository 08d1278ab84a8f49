"""Recipes ship in the package: by name, by path, unknown names listed, --hn-list-configs."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, run_module

from open_clip_hn import demo
from open_clip_hn.hooks import build_parser
from open_clip_hn.recipes import recipe_argv, recipe_names, resolve_recipe

SHIPPED = ["ce-clip", "cm-hnco", "concept-permutation", "diht", "fsc-clip", "negclip", "recommended"]


def test_every_file_in_configs_is_a_shipped_name():
    """configs/ is the one source: each of its recipes resolves by name, to that same content."""
    assert recipe_names() == SHIPPED == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    for name in SHIPPED:
        with open(resolve_recipe(name), encoding="utf-8") as handle:
            assert handle.read() == (REPO / "configs" / f"{name}.yaml").read_text()


def test_name_and_path_give_the_same_tokens():
    parser = build_parser()
    by_path = recipe_argv(str(REPO / "configs" / "negclip.yaml"), parser)
    assert recipe_argv("negclip", parser) == by_path and "--hn-negatives=online" in by_path


def test_a_local_file_named_like_a_shipped_recipe_is_read_by_its_path(tmp_path, monkeypatch):
    (tmp_path / "negclip").write_text("hn-num-negatives: 7\n")
    monkeypatch.chdir(tmp_path)
    assert recipe_argv("./negclip", build_parser()) == ["--hn-num-negatives=7"]
    with pytest.raises(FileNotFoundError, match="pass ./negclip for the file"):
        recipe_argv("negclip", build_parser())  # which one was meant cannot be told


@pytest.mark.parametrize("value, message", [
    ("negclp", "unknown recipe name 'negclp'; shipped recipes: ce-clip, cm-hnco, "
               "concept-permutation, diht, fsc-clip, negclip, recommended"),
    ("my/recipe.yaml", "recipe file my/recipe.yaml does not exist; give an existing YAML recipe "
                       "or a shipped recipe name: ce-clip,"),
])
def test_unknown_recipe_lists_the_names(value, message):
    with pytest.raises(FileNotFoundError) as err:
        resolve_recipe(value)
    assert message in str(err.value)


def test_train_cli_lists_recipes_and_takes_names(tmp_path):
    listed = run_module("open_clip_hn.train", ["--hn-list-configs"]).stdout.splitlines()
    assert [line.split()[0] for line in listed[1:]] == SHIPPED
    for name, line in zip(SHIPPED, listed[1:]):
        header = (REPO / "configs" / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        assert line.split(None, 1)[1] == header
    printed = yaml.safe_load(run_module("open_clip_hn.train", [
        "--hn-config", "ce-clip", "--hn-print-config"]).stdout)
    expected = yaml.safe_load((REPO / "configs" / "ce-clip.yaml").read_text())
    assert printed["hn-intra-weight"] == expected["hn-intra-weight"]
    assert printed["hn-negatives"] == expected["hn-negatives"]


def test_train_cli_names_the_unknown_recipe():
    with pytest.raises(AssertionError, match="unknown recipe name 'nope'; shipped recipes: ce-clip"):
        run_module("open_clip_hn.train", ["--hn-config", "nope"])


def test_demo_default_recipe_is_found_by_name():
    stamp = demo.run_stamp(["--hn-config", demo.RECOMMENDED])
    assert list(stamp["file_contents"].values()) == [(REPO / "configs" / "recommended.yaml").read_text()]
