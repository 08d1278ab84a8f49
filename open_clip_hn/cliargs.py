"""Small pieces shared by the command lines: range-checked numbers, the same-path guard.

Plain Python (no torch), so the negatives CLI can use it too.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Iterable


class InputError(ValueError):
    """An input file or flag a command cannot use: the CLIs print it as `error: ...`, exit 2."""


def int_at_least(least: int) -> Callable[[str], int]:
    """An argparse `type` for integers >= `least`: `--num -1` is refused by argparse itself,
    with the flag named, before any work."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    parse.__name__ = f"integer >= {least}"
    return parse


def overwritten_input(outputs: Iterable[str | None], inputs: Iterable[str]) -> str | None:
    """The first output path that names an existing input file (same file, any spelling)."""
    existing = [i for i in inputs if os.path.exists(i)]
    for output in outputs:
        if output and os.path.exists(output) and any(os.path.samefile(output, i) for i in existing):
            return output
    return None
