"""What the trainer's flags and the offline CLIs share: argparse `type=` converters (numbers
checked by argparse itself, so `--num -1` is refused naming the flag, before any work), the
error a CLI prints as `error: ...`, and the guard that an output never overwrites an input.

Plain Python (no torch), so `python -m open_clip_hn.negatives` stays light.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


def argparse_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """`parse` as an argparse `type=`: its ValueError becomes argparse's usage error."""
    def convert(value: str) -> T:
        try:
            return parse(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def path_value(value: str) -> str:
    """A path flag's value; an empty one (an unset shell variable) would silently turn its
    feature off, so it is refused."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?); give a file or folder")
    return value


def optional_path(value: str) -> str | None:
    """A path flag whose 'none' means no file: off by default, and 'none' turns a recipe's
    setting off (--hn-vocabulary, --hn-plausibility, --hn-exclude-negatives, --exclude)."""
    return None if value == "none" else path_value(value)


def _int_at_least(value: str, least: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {number}")
    return number


def non_negative_int(value: str) -> int:
    return _int_at_least(value, 0)


def positive_int(value: str) -> int:
    return _int_at_least(value, 1)


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return number


def torch_device(value: str) -> str:
    """A `--device` value torch accepts and this machine has (else model loading fails later,
    with a message that blames the checkpoint)."""
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {value!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value}: no CUDA device on this machine; pass cpu")
    return value


def writable_output(path: str | None) -> str | None:
    """Why an output file cannot be written at `path` (its folder is a file, or cannot be made
    or written), or None: checked before the work whose result it is to hold."""
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    return None


def non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return number


def cosine(value: str) -> float:
    """A cosine-similarity threshold: a finite number in [-1, 1]."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not -1 <= number <= 1:
        raise argparse.ArgumentTypeError(f"a cosine similarity is in [-1, 1], got {value}")
    return number


def unit_float(value: str, top_open: bool = False) -> float:
    """A number in [0, 1] ([0, 1) where `top_open`), one message for every value outside."""
    interval = "[0, 1)" if top_open else "[0, 1]"
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {value!r}") from None
    if not 0 <= number <= 1 or (top_open and number == 1):
        raise argparse.ArgumentTypeError(f"must be in {interval}, got {value}")
    return number


def decay(value: str) -> float:
    """An EMA decay: in [0, 1) (1 would never move)."""
    return unit_float(value, top_open=True)


class InputError(ValueError):
    """An input file or flag a command cannot use: the CLIs print it as `error: ...`, exit 2."""


def overwritten_input(outputs: Iterable[str | None], inputs: Iterable[str]) -> str | None:
    """The first output path that names an existing input file (same file, any spelling)."""
    existing = [i for i in inputs if os.path.exists(i)]
    for output in outputs:
        if output and os.path.exists(output) and any(os.path.samefile(output, i) for i in existing):
            return output
    return None
