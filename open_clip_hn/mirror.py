"""Mirrored image pairs: the image-side hard negatives that teach spatial relations (flips),
attribute binding (colour exchange) and object binding (both composed).

Text negatives alone leave "left of" vs "right of" at chance: the image never has to encode the
layout, because no batch holds two images that differ only in it. Mirroring an image whose caption
names a relation along the mirror's axis gives exactly that pair. The flipped image is described by
the caption with that axis's words exchanged ("a cube to the left of a cone" -> "... right of ..."),
so each sample brings a (mirrored image, mirrored caption) pair that is a hard negative of the
original pair in both directions.

The concept's one home: the axes and the caption rewrite (run in the loader workers, packed with
the negatives by `packing.py`), the image flip (done on the preprocessed image tensor in the
model's forward pre-hook: a flip commutes with OpenCLIP's resize, centre crop and per-channel
normalisation), `MirrorPairs` (what the model returns) and `MirrorBatch` (the pairs gathered
across ranks, as the objective's terms use them). The mirror term itself is `losses.mirror_loss`.

The axis `colour` is the same pair for attribute binding: the caption's two colours exchanged in
caption and image (`recolour.py`). A caption that allows a flip and a colour exchange gets one of
them, chosen by a hash of the caption (stable across epochs, workers and ranks), so both kinds of
pair are trained where the axes list both.

The axes `horizontal+colour` and `vertical+colour` compose the two: the image flipped along the
caption's relation axis and then its two colours exchanged. Each colour stays where it was and the
objects trade places, so the pair differs only in which shape is where: the image-side pair for
object binding, which neither a flip (positions) nor an exchange (colours) asks the image tower to
read. Its caption is said as a swap-objects negative reads ("a red cube left of a blue cone" ->
"a red cone left of a blue cube"; the objects trade their sizes too, where they differ). A caption
gets a composed pair only where that holds: exactly one relation word of a flip, each of the
relation's two objects coloured with one of the two exchanged colours, and the two objects
differing in more than colour ("a pink cross over a brown cross" would give the scene itself).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection

import torch

from .distributed import gather_rows
from .recolour import COLOUR_TO_ID, PAIR_BASE, colour_prototype, exchange_colour_words, phrase_colour

if TYPE_CHECKING:
    from .negatives import NegativeGenerator

MIRROR_AXES = ("horizontal", "vertical", "colour", "horizontal+colour", "vertical+colour")
SPATIAL_AXES = ("horizontal", "vertical")
# axes whose image is a flip followed by a colour exchange, by their flip's axis
FLIP_COLOUR_AXES = {"horizontal+colour": "horizontal", "vertical+colour": "vertical"}
# axes whose image needs a colour exchange (a colour pair code travels with them)
COLOUR_AXES = ("colour", *FLIP_COLOUR_AXES)
AXIS_TO_ID = {axis: index for index, axis in enumerate(MIRROR_AXES)}
# words a composed pair's two objects may differ in and still be the same object
_ARTICLES = frozenset(("a", "an", "the", "another"))

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
    if not axes:
        raise ValueError(f"no mirror axis in {value!r} (an unset shell variable?); name axes "
                         f"({', '.join(MIRROR_AXES)}), or none to switch mirrors off")
    unknown = [a for a in axes if a not in MIRROR_AXES]
    if unknown:
        raise ValueError(f"unknown mirror axis/axes {', '.join(unknown)}; use a comma list of: "
                         f"{', '.join(MIRROR_AXES)}")
    return axes


def mirror_pair(caption: str, axes: Collection[str],
                parser: "NegativeGenerator | None" = None) -> tuple[str, str, int] | None:
    """(caption of the image's mirrored pair, its axis, colour pair code or -1), or None.

    The options are the flip along the first spatial axis the caption speaks of, the exchange of
    its first two colours (code: first * PAIR_BASE + second colour id) and their composition
    (that flip, then that exchange); where several apply, a hash of the caption picks one. The
    composed image is described the way a swap-objects negative reads: the caption with its two
    related objects traded and each colour kept in place (`parser`, needed for composed axes,
    finds and trades them; see `_objects_trade_places` for when there is no composed option).
    """
    options: list[tuple[str, str, int]] = []
    flipped = mirror_caption(caption, axes)
    if flipped is not None:
        options.append((*flipped, -1))
    composed = [flip for axis, flip in FLIP_COLOUR_AXES.items() if axis in axes]
    exchanged = exchange_colour_words(caption) if "colour" in axes or composed else None
    if "colour" in axes and exchanged is not None:
        text, first, second = exchanged
        options.append((text, "colour", first * PAIR_BASE + second))
    if composed and parser is None:
        raise ValueError("the composed mirror axes (horizontal+colour, vertical+colour) need a "
                         "caption parser to trade the related objects")
    relation = mirror_caption(caption, composed) if composed else None
    if relation is not None and exchanged is not None and _axis_word_count(caption) == 1:
        text, first, second = exchanged
        words = axis_words(relation[1])
        phrases = parser.related_objects(caption, words)
        traded = (parser.exchange_related_objects(text, words)
                  if phrases is not None and _objects_trade_places(phrases, first, second) else None)
        if traded is not None:
            options.append((traded, f"{relation[1]}+colour", first * PAIR_BASE + second))
    if not options:
        return None
    return options[zlib.crc32(caption.encode("utf-8")) % len(options)]


def _axis_word_count(caption: str) -> int:
    """How many relation words of any spatial axis the caption holds: a flip reverses them all,
    while a trade of the related objects keeps every other one's meaning, so a composed pair
    needs exactly one."""
    return sum(len(pattern.findall(caption)) for pattern in _AXIS_PATTERNS.values())


def _objects_trade_places(phrases: tuple[list[str], list[str]], first: int, second: int) -> bool:
    """A flip and the exchange of colours `first` and `second` trade the relation's two objects
    while each colour stays in place: each phrase names one of the two colours, and the phrases
    differ in more than colour and article (else the composed image is the scene itself)."""
    colours = [phrase_colour(words) for words in phrases]
    if None in colours or set(colours) != {colour_prototype(first), colour_prototype(second)}:
        return False
    bare = [[w.lower() for w in words if w.lower() not in COLOUR_TO_ID and w.lower() not in _ARTICLES]
            for words in phrases]
    return bare[0] != bare[1]


def axis_words(axis: str) -> frozenset[str]:
    """The words a flip along `axis` exchanges (the relation words of that axis)."""
    return frozenset(_AXIS_WORDS[axis])


def converse_captions(caption: str, mirrored: tuple[str, str] | None,
                      parser: "NegativeGenerator") -> tuple[str, str] | None:
    """(converse of the caption, converse of the mirrored caption) for the converse term: each
    said in other words, its relation reversed and the relation's two objects exchanged
    (`parser.exchange_related_objects`): "a cube to the left of a cone" -> "a cone to the right
    of a cube". For a flip the mirrored caption already has the relation reversed; for a colour
    exchange or a composed pair both captions are first reversed along the first spatial axis they
    speak of, so the term also asks the text tower to bind each colour to its object. None without
    a mirrored caption, without a spatial relation, or where either exchange is ambiguous."""
    if mirrored is None:
        return None
    mirror_text, axis = mirrored
    if axis in SPATIAL_AXES:
        reversed_caption, reversed_mirror = mirror_text, caption
    else:
        flipped, flipped_mirror = (mirror_caption(caption, SPATIAL_AXES),
                                   mirror_caption(mirror_text, SPATIAL_AXES))
        if flipped is None or flipped_mirror is None:
            return None
        (reversed_caption, axis), (reversed_mirror, _) = flipped, flipped_mirror
    converse = parser.exchange_related_objects(reversed_caption, axis_words(axis))
    mirror_converse = parser.exchange_related_objects(reversed_mirror, axis_words(axis))
    return None if converse is None or mirror_converse is None else (converse, mirror_converse)


def _swap_word(match: re.Match, words: dict[str, str]) -> str:
    word = match.group(0)
    swapped = words[word.lower()]
    if word.isupper():
        return swapped.upper()
    return swapped.capitalize() if word[0].isupper() else swapped


def mirror_caption(caption: str, axes: Collection[str]) -> tuple[str, str] | None:
    """(caption of the image flipped along the first spatial axis the caption speaks of, that axis).

    None when the caption names no relation along any of `axes`: its flipped image would still
    match it, so it is no negative.
    """
    for axis in SPATIAL_AXES:
        if axis not in axes:
            continue
        words = _AXIS_WORDS[axis]
        mirrored, count = _AXIS_PATTERNS[axis].subn(lambda m: _swap_word(m, words), caption)
        if count:
            return mirrored, axis
    return None


def axis_in(axis_ids: torch.Tensor, axes: Collection[str]) -> torch.Tensor:
    """[N] bool: the row's mirror axis id is one of `axes` (comparisons: no id tensor to copy to
    the device every step)."""
    found = torch.zeros_like(axis_ids, dtype=torch.bool)
    for axis in axes:
        found |= axis_ids == AXIS_TO_ID[axis]
    return found


def flip_images(images: torch.Tensor, axis_ids: torch.Tensor) -> torch.Tensor:
    """Flip each [C, H, W] image of `images` [N, C, H, W] along its axis (0 horizontal, 1 vertical;
    the composed axes flip along their flip's axis)."""
    flipping = (*SPATIAL_AXES, *FLIP_COLOUR_AXES)
    if axis_ids.numel() and not bool(axis_in(axis_ids, flipping).all()):
        raise ValueError(f"mirror axis ids must be those of a flip "
                         f"({sorted(map(AXIS_TO_ID.get, flipping))}), got {sorted(set(axis_ids.tolist()))}")
    horizontal_axes = [axis for axis in flipping if FLIP_COLOUR_AXES.get(axis, axis) == "horizontal"]
    horizontal = axis_in(axis_ids, horizontal_axes).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(horizontal.to(images.device), images.flip(-1), images.flip(-2))


@dataclass(frozen=True)
class MirrorPairs:
    """This rank's mirrored pairs as the model returns them; zero rows where a sample has none."""

    image: torch.Tensor  # [B, D] features of the flipped images
    text: torch.Tensor   # [B, D] features of the mirrored captions
    mask: torch.Tensor   # [B] bool: the sample has a mirrored pair
    converse: torch.Tensor | None = None       # [B, 2, D] converse of the caption, of the mirrored one
    converse_mask: torch.Tensor | None = None  # [B] bool: the sample has both (--hn-converse-weight)

    def float(self) -> "MirrorPairs":
        converse = None if self.converse is None else self.converse.float()
        converse_mask = None if self.converse_mask is None else self.converse_mask.to(torch.bool)
        return MirrorPairs(self.image.float(), self.text.float(), self.mask.to(torch.bool),
                           converse, converse_mask)


@dataclass(frozen=True)
class MirrorBatch:
    """The mirrored pairs of the global batch as the terms see them.

    Each used pair (valid, and kept by the curriculum's share) joins the itc softmax as one more
    pair after the N originals, in global order; `labels` is each anchor's row there.
    """

    all_image: torch.Tensor  # [N, D]
    all_text: torch.Tensor   # [N, D]
    all_used: torch.Tensor   # [N] bool: valid and kept
    image: torch.Tensor      # [A, D] the anchors' mirrored pairs
    text: torch.Tensor       # [A, D]
    used: torch.Tensor       # [A] bool
    labels: torch.Tensor     # [A] itc row of each anchor's mirrored pair
    # --hn-converse-weight: each pair's two converse captions, valid ones all used (the
    # curriculum does not thin them)
    all_converse: torch.Tensor | None = None       # [N, 2, D]
    all_converse_used: torch.Tensor | None = None  # [N] bool
    converse: torch.Tensor | None = None           # [A, 2, D] the anchors'
    converse_used: torch.Tensor | None = None      # [A] bool

    def itc_rows(self, image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor,
                 all_text: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(image anchors, text anchors, image columns, text columns, labels) of the itc softmax
        with every used mirrored pair added as one more pair."""
        own, every = self.used, self.all_used
        return (torch.cat([image, self.image[own]]), torch.cat([text, self.text[own]]),
                torch.cat([all_image, self.all_image[every]]),
                torch.cat([all_text, self.all_text[every]]), torch.cat([labels, self.labels[own]]))

    def row_share(self, anchors: int, rows: int) -> float:
        """Turns this rank's mean over its `rows` = A + own-mirror rows into its share of the
        global mean over N + V rows: R * N / (A * (N + V)); with local_loss the ranks' means then
        average to the global loss, as in ClipLoss."""
        n = self.all_image.shape[0]
        return rows * n / (anchors * (n + int(self.all_used.sum())))

    def hide_own_negatives(self, per_image: torch.Tensor, labels: torch.Tensor, k: int,
                           text_columns: int) -> torch.Tensor:
        """A mirrored image's own sample's text negatives may *be* its caption (a relation
        replacement reads like the mirrored caption): mask them in its itc row."""
        if not k:
            return per_image
        sources = labels[self.used]
        rows = per_image.shape[0] - sources.shape[0] + torch.arange(sources.shape[0],
                                                                    device=per_image.device)
        columns = text_columns + sources[:, None] * k + torch.arange(k, device=per_image.device)
        hide = torch.zeros_like(per_image, dtype=torch.bool)
        hide[rows[:, None], columns] = True
        return per_image.masked_fill(hide, float("-inf"))


def gather_mirrors(pairs: MirrorPairs, keep: torch.Tensor, *, rank: int, world_size: int,
                   local: bool, with_grad: bool) -> MirrorBatch:
    """Gather every rank's mirrored pairs; `keep` [N] is the curriculum's choice of pairs (none
    during its warmup). With `local`, this rank's anchors are its own samples."""
    parts = [pairs.image, pairs.text]
    if pairs.converse is not None:
        parts += [pairs.converse[:, 0], pairs.converse[:, 1]]
    stacked = gather_rows(torch.stack(parts, dim=1), rank=rank, world_size=world_size,
                          with_grad=with_grad, keep_local_grad=not local)
    valid = gather_rows(pairs.mask, rank=rank, world_size=world_size)
    all_used = valid & keep
    n = all_used.shape[0]
    all_labels = n + torch.cumsum(all_used.long(), dim=0) - 1
    all_converse = all_converse_used = None
    if pairs.converse is not None:
        all_converse = stacked[:, 2:]
        all_converse_used = gather_rows(pairs.converse_mask, rank=rank, world_size=world_size)
    if local:
        rows = slice(rank * pairs.mask.shape[0], (rank + 1) * pairs.mask.shape[0])
        return MirrorBatch(stacked[:, 0], stacked[:, 1], all_used, pairs.image, pairs.text,
                           all_used[rows], all_labels[rows], all_converse, all_converse_used,
                           pairs.converse, None if pairs.converse is None else all_converse_used[rows])
    return MirrorBatch(stacked[:, 0], stacked[:, 1], all_used, stacked[:, 0], stacked[:, 1],
                       all_used, all_labels, all_converse, all_converse_used, all_converse,
                       all_converse_used)
