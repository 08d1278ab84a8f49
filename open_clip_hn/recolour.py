"""Colour-exchanged image pairs: the image-side hard negative that teaches attribute binding.

A text swap negative ("a red cube and a blue cone" -> "a blue cube and a red cone") asks the image
to pick its caption, but no batch holds the image it describes, so nothing makes the image tower
bind a colour to its object: on world2 the ViT did not even fit its own training swaps. Exchanging
the caption's two colours in the image gives that picture. The pair (recoloured image, caption
with the two colour words exchanged) then rides exactly like a mirrored pair (`mirror.py`: axis
`colour`): one more pair in the itc batch and four two-way choices in the mirror term.

Caption side (loader workers): the first two colour words that name different colours are
exchanged everywhere in the caption. Image side (the model's forward pre-hook, on the preprocessed
tensor): every pixel is given the nearest (in CIELAB) of the colour lexicon's prototypes, the image's own
background (the median of its border) and, as competitors, only prototypes clearly apart from the
two named colours (so "violet" does not steal "purple"'s pixels); the pixels of the two named
colours then trade their median colours (shading and anti-aliasing kept as offsets). A pair whose
image shows fewer than `MIN_SHARE` of its pixels in either colour is dropped (masked), never
trained as a wrong pair. Photos break the one-colour-per-object assumption more often than
rendered scenes; the exchange suits flat-coloured objects best.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

import torch

# typical renderings of common colour words (RGB 0-255): the lexicon's colour category
# (negatives/data/attributes.json) plus a few words it lacks; names sharing a prototype are synonyms
COLOUR_PROTOTYPES: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30),
    "green": (30, 160, 50), "lime": (130, 230, 30), "olive": (120, 130, 25),
    "blue": (30, 70, 230), "navy": (20, 25, 120), "cyan": (20, 210, 225),
    "turquoise": (60, 220, 200), "teal": (0, 128, 128), "purple": (135, 50, 190),
    "violet": (150, 90, 220), "magenta": (220, 30, 200), "pink": (245, 120, 185),
    "brown": (135, 75, 30), "maroon": (128, 10, 20), "beige": (225, 210, 170),
    "tan": (210, 180, 140), "khaki": (195, 175, 110), "gold": (225, 185, 40),
    "golden": (225, 185, 40), "black": (15, 15, 15), "white": (245, 245, 245),
    "gray": (128, 128, 128), "grey": (128, 128, 128), "silver": (192, 192, 192),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOUR_PROTOTYPES)
COLOUR_TO_ID = {name: index for index, name in enumerate(COLOUR_NAMES)}
PAIR_BASE = 256  # a colour pair travels as one integer: first * PAIR_BASE + second
MIN_SHARE = 0.002  # each colour must cover this share of the image's pixels
COMPETITOR_DISTANCE = 25.0  # prototypes nearer than this (CIELAB delta E) to a named colour drop out
MAX_DISTANCE = 60.0  # a pixel farther than this (delta E) from its nearest candidate keeps its colour
CHUNK_PIXELS = 1 << 21  # pixels classified at once (bounds the distance tensor to ~250 MB)
_PATTERN = re.compile(r"\b(" + "|".join(sorted(COLOUR_NAMES, key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)
# what may stand between two colour words that name one colouring together
_JOINED = re.compile(r"\s*(?:-|/|&|,|\band\b|\bor\b)?\s*", re.IGNORECASE)
# a colour word with the indefinite article right before it, which follows the new word's sound
_WITH_ARTICLE = re.compile(r"(?:\b(an?)(\s+))?" + _PATTERN.pattern, re.IGNORECASE)


def _prototype(name: str) -> tuple[int, int, int]:
    return COLOUR_PROTOTYPES[name.lower()]


def _matching_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word.capitalize() if like[0].isupper() else word.lower()


def exchange_colour_words(caption: str) -> tuple[str, int, int] | None:
    """(caption with its first two different colours exchanged, their colour ids).

    None when the caption names fewer than two different colours (synonyms such as gray/grey are
    one colour): its recoloured image would be no negative; and None when two colour words stand
    together ("black and white", "navy blue", "olive-green"): they name one colouring, and
    exchanging them would describe the same picture.
    """
    matches = list(_PATTERN.finditer(caption))
    if any(_JOINED.fullmatch(caption[a.end():b.start()]) for a, b in zip(matches, matches[1:])):
        return None
    words: list[str] = []
    for match in matches:
        word = match.group(0).lower()
        if all(_prototype(word) != _prototype(w) for w in words):
            words.append(word)
        if len(words) == 2:
            break
    if len(words) < 2:
        return None
    first, second = words
    by_colour = {_prototype(first): second, _prototype(second): first}

    def exchange(match: re.Match) -> str:
        article, space, word = match.groups()
        target = by_colour.get(_prototype(word))
        if target is None:
            return match.group(0)
        new = _matching_case(target, word)
        if article is None:
            return new
        agreeing = "an" if target[0] in "aeiou" else "a"
        return _matching_case(agreeing, article) + space + new

    return _WITH_ARTICLE.sub(exchange, caption), COLOUR_TO_ID[first], COLOUR_TO_ID[second]


def phrase_colour(words: Sequence[str]) -> tuple[int, int, int] | None:
    """The prototype of the one colour a phrase names (synonyms are one colour); None where it
    names none or several."""
    found = {_prototype(word) for word in (w.lower() for w in words) if word in COLOUR_TO_ID}
    return found.pop() if len(found) == 1 else None


def colour_prototype(colour_id: int) -> tuple[int, int, int]:
    """The prototype of a colour id (`exchange_colour_words`' ids)."""
    return _prototype(COLOUR_NAMES[colour_id])


@functools.lru_cache(maxsize=32)
def _constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small constant float tensor, made once per device (on a GPU each new one is a host-to-
    device copy in every training step). Shared: callers must not modify it; made outside
    inference mode, so one first made during evaluation still serves training."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=torch.float32, device=device)


_RGB_TO_XYZ = ((0.4124, 0.3576, 0.1805), (0.2126, 0.7152, 0.0722), (0.0193, 0.1192, 0.9505))
_WHITE = (0.9505, 1.0, 1.089)


@functools.lru_cache(maxsize=8)
def _prototype_lab(device: torch.device) -> torch.Tensor:
    """[C, 3] CIELAB of the lexicon's colour prototypes, once per device (in fp32 even when
    first asked for under autocast: the cached values serve every later call)."""
    with torch.inference_mode(False), torch.autocast(device.type, enabled=False):
        return lab(_constant(tuple(COLOUR_PROTOTYPES[n] for n in COLOUR_NAMES), device) / 255.0)


def lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65) of sRGB values in [0, 1] along the last dimension: distances there follow
    perceived colour difference, so a dark grey edge pixel is nearer black than brown."""
    rgb = rgb.clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ _constant(_RGB_TO_XYZ, rgb.device).T / _constant(_WHITE, rgb.device)
    f = torch.where(xyz > (6 / 29) ** 3, xyz.clamp(min=1e-12) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                        200 * (f[..., 1] - f[..., 2])], dim=-1)


def _border_median(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3] median colour of each image's one-pixel border: its background, as a competitor."""
    border = torch.cat([rgb[..., 0, :], rgb[..., -1, :], rgb[..., :, 0], rgb[..., :, -1]], dim=-1)
    return border.median(dim=-1).values


def colour_masks(rgb: torch.Tensor, first: torch.Tensor, second: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, H, W] bool masks of the pixels of colour ids `first` and `second` [N] in `rgb`
    [N, 3, H, W] (values in [0, 1]): nearest in CIELAB among the named colours, the background
    and the prototypes clearly apart from both named colours, and within `MAX_DISTANCE` of it."""
    n = rgb.shape[0]
    prototypes = _prototype_lab(rgb.device)                       # [C, 3]
    named = torch.stack([prototypes[first], prototypes[second]], 1)  # [N, 2, 3]
    apart = torch.cdist(prototypes[None].expand(n, -1, -1), named).min(dim=-1).values
    candidates = torch.cat([prototypes[None].expand(n, -1, -1), lab(_border_median(rgb))[:, None]], 1)
    excluded = torch.cat([apart < COMPETITOR_DISTANCE, torch.zeros(n, 1, dtype=torch.bool,
                                                                   device=rgb.device)], 1)
    rows = torch.arange(n, device=rgb.device)
    excluded[rows, first] = False
    excluded[rows, second] = False
    pixels = lab(rgb.flatten(2).transpose(1, 2))                  # [N, HW, 3]
    distance = torch.cdist(pixels, candidates)                    # [N, HW, C + 1]
    distance = distance.masked_fill(excluded[:, None], float("inf"))
    nearest, label = distance.min(dim=-1)
    close = nearest <= MAX_DISTANCE
    shape = rgb.shape[:1] + rgb.shape[2:]
    return ((label == first[:, None]) & close).view(shape), ((label == second[:, None]) & close).view(shape)


def _median_colour(rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, 3] median of each image's masked pixels (0 where none): the colour of the object's
    body, not of its anti-aliased edges."""
    masked = torch.where(mask[:, None], rgb, torch.full_like(rgb, float("nan"))).flatten(2)
    return masked.nanmedian(dim=-1).values.nan_to_num(0.0)


def exchange_colours(images: torch.Tensor, pairs: torch.Tensor, mean: Sequence[float],
                     std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images with each row's two colours exchanged, [N] bool: the exchange was possible).

    `images` [N, 3, H, W] are preprocessed (normalised with `mean`, `std`); `pairs` [N] hold
    first * PAIR_BASE + second colour ids (`exchange_colour_words`). Each colour's pixels move by
    the difference of the two colours' median pixel values, so shading and edges keep their offsets.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"colour exchange needs RGB image batches [N, 3, H, W], got {tuple(images.shape)}")
    pairs = pairs.to(images.device).long()
    first, second = pairs // PAIR_BASE, pairs % PAIR_BASE
    if pairs.numel() and not bool(((first >= 0) & (first < len(COLOUR_NAMES))
                                   & (second < len(COLOUR_NAMES)) & (first != second)).all()):
        raise ValueError(f"colour pair codes must hold two different colour ids below "
                         f"{len(COLOUR_NAMES)}, got {sorted(set(pairs.tolist()))}")
    mean_t = _constant(tuple(map(float, mean)), images.device).view(1, 3, 1, 1)
    std_t = _constant(tuple(map(float, std)), images.device).view(1, 3, 1, 1)
    rgb = images.float() * std_t + mean_t
    # in chunks of about CHUNK_PIXELS pixels: the [pixels, candidates] distances of a whole
    # batch of 224-pixel images would take the better part of a gigabyte
    per_chunk = max(1, CHUNK_PIXELS // max(1, rgb.shape[-2] * rgb.shape[-1]))
    masks = [colour_masks(*part) for part in zip(rgb.split(per_chunk), first.split(per_chunk),
                                                 second.split(per_chunk))]
    mask_a = torch.cat([m[0] for m in masks]) if masks else rgb[:, 0].bool()
    mask_b = torch.cat([m[1] for m in masks]) if masks else rgb[:, 0].bool()
    count_a = mask_a.flatten(1).sum(1)
    count_b = mask_b.flatten(1).sum(1)
    minimum = max(1, round(MIN_SHARE * rgb.shape[-2] * rgb.shape[-1]))
    ok = (count_a >= minimum) & (count_b >= minimum)
    shift = (_median_colour(rgb, mask_b) - _median_colour(rgb, mask_a))[..., None, None]
    moved = rgb + shift * mask_a[:, None] - shift * mask_b[:, None]
    moved = torch.where(ok.view(-1, 1, 1, 1), moved.clamp(0, 1), rgb)
    return ((moved - mean_t) / std_t).to(images.dtype), ok
