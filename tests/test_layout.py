"""The package's boundaries (DESIGN.md): the adapter alone touches OpenCLIP's trainer, and the
text-negative side never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "open_clip_hn"


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_only_the_adapter_imports_open_clip_train():
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if any(m.split(".")[0] == "open_clip_train" for m in imported_modules(p))}
    assert importers == {"hooks.py"}


def test_negatives_never_import_torch():
    for path in (PACKAGE / "negatives").rglob("*.py"):
        if path.name == "lm.py":
            continue  # --hn-lm loads a transformers model, torch inside its method only
        top = {m.split(".")[0] for m in imported_modules(path)}
        assert not top & {"torch", "open_clip", "open_clip_train"}, path


def test_negatives_cli_runs_without_loading_torch(tmp_path):
    excluded = tmp_path / "captions.txt"  # --exclude reads captions without torch too
    excluded.write_text("a blue car next to a red house\n")
    script = ("import sys\n"
              "from open_clip_hn.negatives.cli import main\n"
              f"assert main(['show', 'a red car next to a blue house', '--exclude', {str(excluded)!r}]) == 0\n"
              "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip'))\n"
              "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "swap_attributes:" in proc.stdout


def test_no_import_circle_inside_negatives():
    """generator.py and lm.py share the edit kit in edits.py instead of importing each other."""
    assert "from .generator" not in (PACKAGE / "negatives" / "lm.py").read_text()
    assert "from .edits import" in (PACKAGE / "negatives" / "generator.py").read_text()
    # the commands share cli_common.py; only the entry point imports the CLI module
    importers = {p.name for p in (PACKAGE / "negatives").glob("*.py") if "from .cli import" in p.read_text()}
    assert importers == {"__main__.py"}


def test_the_library_api_is_importable_from_the_package_without_loading_torch_first():
    """`from open_clip_hn import HardNegativeLoss, ...` works (each name is imported when first
    used), while `import open_clip_hn` alone stays cheap for loader workers."""
    script = ("import sys, open_clip_hn\n"
              "assert 'torch' not in sys.modules, 'import open_clip_hn loaded torch'\n"
              "from open_clip_hn import HardNegativeLoss, HNConfig, register_term, LoggedValue, "
              "PackedOutputs, NegativeGenerator, MemoryBank\n"
              "import open_clip_hn.objective as objective\n"
              "assert HardNegativeLoss is objective.HardNegativeLoss\n"
              "assert set(open_clip_hn.__all__) <= set(dir(open_clip_hn))\n"
              "try:\n    open_clip_hn.nothing\nexcept AttributeError as err:\n    assert 'nothing' in str(err)\n"
              "else:\n    raise SystemExit('no AttributeError')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
