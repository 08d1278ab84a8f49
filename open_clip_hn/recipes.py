"""Recipe files: YAML whose keys are flag names, turned into argv tokens before the command line.

A recipe is just a saved command line, so it is resolved by the same parser that reads the
command line: `recipe_argv` turns the file into tokens that go *before* the user's tokens, and
argparse's last-wins rule makes the command line override the file. Every key and value is
checked against the parser's own actions first, so a typo fails with the file and key named
instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import logging
import os
import pathlib
from typing import Any

import yaml

RECIPE_FLAG = "--hn-config"
# Flags that steer recipe handling itself; a recipe may not set them (no nesting, no exit).
_META_FLAGS = ("--hn-config", "--hn-print-config", "--hn-list-configs", "--help")


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option string (e.g. '--batch-size') -> its action, for every optional flag."""
    actions = {}
    for action in parser._actions:  # argparse has no public accessor for its actions
        for option in action.option_strings:
            if option.startswith("--"):
                actions[option] = action
    return actions


def _normalize_key(key: Any) -> str:
    """'batch_size', '--batch-size' and 'batch-size' all name the flag '--batch-size'."""
    return "--" + str(key).lstrip("-").replace("_", "-")


def _error(path: str, message: str) -> ValueError:
    return ValueError(f"recipe {path}: {message}")


def _check_scalar(path: str, option: str, action: argparse.Action, value: Any) -> str:
    """Run the action's own type and choices on one value; return its command-line form."""
    if isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off as booleans
        raise _error(path, f"key {option[2:]!r} expects a single value, got {value!r} (YAML reads "
                           "true/false/yes/no/on/off as a switch: quote a word, e.g. 'off')")
    if isinstance(value, (dict, list)):
        raise _error(path, f"key {option[2:]!r} expects a single value, got {value!r}")
    text = str(value)
    converted: Any = text
    if action.type is not None:
        try:
            converted = action.type(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            if action.type in (int, float):  # their own text is Python's ("invalid literal ...")
                err = f"expects {'a whole number' if action.type is int else 'a number'}"
            raise _error(path, f"key {option[2:]!r} has a bad value {value!r}: {err}") from None
    if action.choices is not None and converted not in action.choices:
        raise _error(path, f"key {option[2:]!r} must be one of {', '.join(map(str, action.choices))}; "
                           f"got {value!r}")
    return text


def _tokens(path: str, option: str, action: argparse.Action, value: Any) -> list[str]:
    """The argv tokens that set `option` to `value`, validated; [] leaves the default."""
    if value is None or value == []:  # a value left out: the default would pass unnoticed
        raise _error(path, f"key {option[2:]!r} has no value; give one, or remove the key for "
                           "the default")
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise _error(path, f"key {option[2:]!r} is a switch: use true or false, got {value!r}")
        switch_on = value if isinstance(action, argparse._StoreTrueAction) else not value
        return [option] if switch_on else []
    if isinstance(value, dict):
        if not (action.nargs in ("*", "+") and action.type is None):
            raise _error(path, f"key {option[2:]!r} does not take a mapping, got {value!r}")
        return [option, *(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in value.items())]
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [option, *(_check_scalar(path, option, action, item) for item in items)]
    if isinstance(value, list):  # comma-list flags such as --hn-loss accept a YAML list too
        value = ",".join(map(str, value))
    return [f"{option}={_check_scalar(path, option, action, value)}"]


RECIPE_SUFFIX = ".yaml"
# A source checkout run without installing (PYTHONPATH=checkout) has no `open_clip_hn.configs`
# package; its recipes are the same files, in the checkout's `configs/`.
_CHECKOUT_RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _recipe_files() -> dict[str, str]:
    """Shipped recipe name -> file: the package `open_clip_hn.configs` (pyproject maps it to the
    repository's `configs/`, so a wheel and an editable install read the same files), else the
    source checkout's `configs/`."""
    try:
        folder = importlib.resources.files("open_clip_hn.configs")
    except ModuleNotFoundError:
        folder = pathlib.Path(_CHECKOUT_RECIPES)
    if not folder.is_dir():
        return {}
    return {entry.name[: -len(RECIPE_SUFFIX)]: os.fspath(entry) for entry in folder.iterdir()
            if entry.name.endswith(RECIPE_SUFFIX)}


def recipe_names() -> list[str]:
    """Names `--hn-config NAME` accepts: the shipped recipe files without `.yaml`, sorted."""
    return sorted(_recipe_files())


def resolve_recipe(name_or_path: str) -> str:
    """The file for `--hn-config VALUE`: an existing file as given, else a shipped recipe name.

    A path wins over a name, so a local `negclip.yaml` edited by the user is read as given;
    an unknown value fails with the shipped names listed.
    """
    shipped = _recipe_files()
    if os.path.isfile(name_or_path):
        if name_or_path in shipped:  # a bare name: which one was meant cannot be told
            raise FileNotFoundError(
                f"{name_or_path!r} is both a shipped recipe and a file in {os.getcwd()}; pass "
                f"./{name_or_path} for the file, or rename it to use the shipped recipe")
        return name_or_path
    if name_or_path in shipped:
        return shipped[name_or_path]
    names = ", ".join(sorted(shipped)) or "(none installed)"
    if os.path.exists(name_or_path):
        kind = "a folder" if os.path.isdir(name_or_path) else "not a regular file"
        raise FileNotFoundError(f"recipe {name_or_path} is {kind}; give a YAML recipe file or a "
                                f"shipped recipe name: {names}")
    if "/" in name_or_path or os.sep in name_or_path or name_or_path.endswith(RECIPE_SUFFIX):
        raise FileNotFoundError(f"recipe file {name_or_path} does not exist; give an existing YAML "
                                f"recipe or a shipped recipe name: {names}")
    raise FileNotFoundError(f"unknown recipe name {name_or_path!r}; shipped recipes: {names} "
                            "(or give the path of a YAML recipe)")


def recipe_summary(path: str) -> str:
    """The first line of the recipe's header comment (what `--hn-list-configs` shows)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#"):
                text = line.lstrip("#").strip()
                if text:
                    return text
            elif line.strip():
                break
    return "(no header comment)"


def format_recipe_list() -> str:
    """One line per shipped recipe: its name and the first line of its header."""
    shipped = _recipe_files()
    if not shipped:
        return "no shipped recipes found (is open_clip_hn installed with its package data?)"
    width = max(map(len, shipped))
    folder = os.path.dirname(next(iter(shipped.values())))
    lines = [f"{name.ljust(width)}  {recipe_summary(shipped[name])}" for name in sorted(shipped)]
    return "\n".join([f"recipes in {folder} (use --hn-config NAME, or a path to your own):", *lines])


class ListRecipesAction(argparse.Action):
    """`--hn-list-configs`: print the shipped recipes and exit, like argparse's --version."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(format_recipe_list())
        parser.exit()


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (where PyYAML keeps the
    last silently, so one of the two settings would be lost without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str) -> dict[str, Any]:
    """Read a recipe file (or shipped recipe name) into a mapping; a file that sets nothing
    (empty, comments only) is refused: a run with it trained without any hard negative."""
    path = resolve_recipe(path)
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.load(handle, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise _error(path, f"is not valid YAML: {err}") from None
    if not data:
        raise _error(path, "sets no flag (the file is empty or holds only comments); write the "
                           "recipe's flags in it, or drop --hn-config")
    if not isinstance(data, dict):
        raise _error(path, f"must be a mapping of flag names to values, got {type(data).__name__}")
    return data


def recipe_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """Validated argv tokens for the recipe at `path`, to be placed before the command line."""
    actions = flag_actions(parser)
    argv: list[str] = []
    keys: dict[str, str] = {}
    for key, value in load_recipe(path).items():
        option = _normalize_key(key)
        if option in keys:
            raise _error(path, f"keys {keys[option]!r} and {key!r} both set {option}; keep one")
        keys[option] = key
        if option in _META_FLAGS:
            raise _error(path, f"key {key!r} cannot be set inside a recipe; give it on the command line")
        if option not in actions:
            valid = sorted(o[2:] for o in actions if o not in _META_FLAGS)
            extended = [v for v in valid if v.startswith(option[2:])]  # the command line's abbreviation
            close = extended if len(extended) == 1 else difflib.get_close_matches(option[2:], valid, n=1)
            hint = f" Did you mean {close[0]!r}? (a recipe's keys are whole flag names)" if close else ""
            raise _error(path, f"unknown key {key!r}.{hint} Valid keys: {', '.join(valid)}")
        argv += _tokens(path, option, actions[option], value)
    return argv


def recipe_path(argv: list[str]) -> str | None:
    """The `--hn-config` value on a command line (the last one wins, as argparse's would)."""
    finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    finder.add_argument(RECIPE_FLAG, default=None)
    return finder.parse_known_args(argv)[0].hn_config


def _full_flag(token: str, actions: dict[str, argparse.Action], allow_abbrev: bool) -> str:
    """The long flag `token` names, written in full, as argparse resolves it: the token, or its
    part before `=`, exactly, else (with abbreviations allowed) the one flag it begins."""
    name, sep, value = token.partition("=")
    if not token.startswith("--") or name in actions or not allow_abbrev:
        return token
    matches = [option for option in actions if option.startswith(name)]
    return matches[0] + sep + value if len(matches) == 1 else token  # else: argparse refuses it


def spell_out_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv` with each abbreviated long flag written in full, as `parser` reads it.

    argparse takes a unique prefix of a flag for the flag unless `allow_abbrev` is off (OpenCLIP's
    parser leaves it on: `--hn-mirror-w 2` sets --hn-mirror-weight), so steps that find flags by
    name (the recipe, the flags typed on the command line, the plugin's flags among OpenCLIP's)
    read the spelled-out form. Tokens after `--` are values and stay as they are.
    """
    actions = flag_actions(parser)
    end = argv.index("--") if "--" in argv else len(argv)
    return [_full_flag(token, actions, parser.allow_abbrev) for token in argv[:end]] + argv[end:]


def expand_recipe(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`argv`, spelled out (`spell_out_flags`), with the tokens of its `--hn-config` recipe (if
    any) put in front of it."""
    argv = spell_out_flags(list(argv), parser)
    _warn_repeated_flags(argv)
    path = recipe_path(argv)
    return argv if path is None else recipe_argv(path, parser) + argv


def _warn_repeated_flags(argv: list[str]) -> None:
    """A `--hn-*` flag typed twice takes its last value, as argparse reads it; a script that
    appends an override to a flag list it also sets would otherwise change a run unannounced."""
    end = argv.index("--") if "--" in argv else len(argv)
    names = [token.split("=", 1)[0] for token in argv[:end] if token.startswith("--hn-")]
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            logging.warning("%s is given %d times on the command line: the last one counts",
                            name, names.count(name))


def _yaml_value(action: argparse.Action, value: Any) -> Any:
    """The recipe form of a parsed value, so that the printed config is itself a recipe."""
    if isinstance(value, tuple) and action.nargs not in ("*", "+") and not isinstance(action.nargs, int):
        # comma-list flags parse to tuples; an empty one is a part switched off (--hn-mirror
        # none), since an empty list is refused as what an unset shell variable gives
        return ",".join(map(str, value)) or "none"
    if isinstance(value, tuple):
        return list(value)
    return value


def format_resolved_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """Every flag's resolved value as a YAML recipe (what `--hn-print-config` prints).

    The output is a valid recipe: saving it and passing it to `--hn-config` reproduces the run.
    """
    resolved: dict[str, Any] = {}
    seen: set[int] = set()
    for option, action in flag_actions(parser).items():
        if option in _META_FLAGS or id(action) in seen or not hasattr(args, action.dest):
            continue  # one entry per action (its first long name); recipe flags themselves skipped
        seen.add(id(action))
        value = _yaml_value(action, getattr(args, action.dest))
        if value is not None and value != []:  # unset (the default): a recipe leaves such keys out
            resolved[option[2:]] = value
    recipe = getattr(args, "hn_config_file", None)
    recipe_file = None if recipe is None else resolve_recipe(recipe)
    source = recipe if recipe_file == recipe else f"{recipe}: {recipe_file}"
    header = f"# resolved configuration{f' (recipe {source} + command line)' if recipe else ''}\n"
    return header + yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None)
