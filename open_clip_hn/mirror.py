"""Mirrored image pairs: the image-side hard negative that teaches spatial relations.

Text negatives alone leave "left of" vs "right of" at chance: the image never has to encode the
layout, because no batch holds two images that differ only in it. Mirroring an image whose caption
names a relation along the mirror's axis gives exactly that pair. The flipped image is described by
the caption with that axis's words exchanged ("a cube to the left of a cone" -> "... right of ..."),
so each sample brings a (mirrored image, mirrored caption) pair that is a hard negative of the
original pair in both directions.

The mirrored caption is made in the loader workers (packed with the negatives, see `data.py`); the
flip itself is done on the preprocessed image tensor in the model's forward pre-hook (a flip
commutes with OpenCLIP's resize, centre crop and per-channel normalisation).
"""

from __future__ import annotations

import re
from typing import Collection

import torch

MIRROR_AXES = ("horizontal", "vertical")
AXIS_TO_ID = {axis: index for index, axis in enumerate(MIRROR_AXES)}

# words that a flip along the axis turns into each other (both directions are listed)
_AXIS_WORDS: dict[str, dict[str, str]] = {
    "horizontal": {"left": "right", "right": "left", "leftmost": "rightmost",
                   "rightmost": "leftmost"},
    "vertical": {"above": "below", "below": "above", "top": "bottom", "bottom": "top",
                 "upper": "lower", "lower": "upper", "over": "under", "under": "over",
                 "topmost": "bottommost", "bottommost": "topmost"},
}
_AXIS_PATTERNS = {axis: re.compile(r"\b(" + "|".join(sorted(words, key=len, reverse=True)) + r")\b",
                                   re.IGNORECASE)
                  for axis, words in _AXIS_WORDS.items()}


def parse_axes(value: str) -> tuple[str, ...]:
    """'horizontal,vertical' -> ('horizontal', 'vertical'); 'none' -> () (turns a recipe's
    mirrors off); ValueError naming unknown axes."""
    if value.strip() == "none":
        return ()
    axes = tuple(dict.fromkeys(a.strip() for a in value.split(",") if a.strip()))
    unknown = [a for a in axes if a not in MIRROR_AXES]
    if unknown:
        raise ValueError(f"unknown mirror axis/axes {', '.join(unknown)}; use a comma list of: "
                         f"{', '.join(MIRROR_AXES)}")
    return axes


def _swap_word(match: re.Match, words: dict[str, str]) -> str:
    word = match.group(0)
    swapped = words[word.lower()]
    if word.isupper():
        return swapped.upper()
    return swapped.capitalize() if word[0].isupper() else swapped


def mirror_caption(caption: str, axes: Collection[str]) -> tuple[str, str] | None:
    """(caption of the image flipped along the first axis the caption speaks of, that axis).

    None when the caption names no relation along any of `axes`: its flipped image would still
    match it, so it is no negative.
    """
    for axis in MIRROR_AXES:
        if axis not in axes:
            continue
        words = _AXIS_WORDS[axis]
        mirrored, count = _AXIS_PATTERNS[axis].subn(lambda m: _swap_word(m, words), caption)
        if count:
            return mirrored, axis
    return None


def flip_images(images: torch.Tensor, axis_ids: torch.Tensor) -> torch.Tensor:
    """Flip each [C, H, W] image of `images` [N, C, H, W] along its axis (0 horizontal, 1 vertical)."""
    if axis_ids.numel() and not bool(((axis_ids == 0) | (axis_ids == 1)).all()):
        raise ValueError(f"mirror axis ids must be 0 (horizontal) or 1 (vertical), got "
                         f"{sorted(set(axis_ids.tolist()))}")
    horizontal = (axis_ids == AXIS_TO_ID["horizontal"]).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(horizontal.to(images.device), images.flip(-1), images.flip(-2))
