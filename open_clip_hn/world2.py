"""A second procedural world for development, built apart from the demo's (`scenes.py`).

The recipe was tuned on the demo's world; a recipe that only holds there is tuned to it. This
world changes what the demo's fixes: 2-4 objects per scene (a related pair plus 0-2 identical
"bystanders" named with a count), other shapes (star, ring, cross, diamond, hexagon), colours,
three size words, other relation words ("on the left of", "over", ...), three sentence forms,
and another renderer (pale tinted backgrounds, outlined polygons, 64 pixels by default).
Only the file-writing helpers are shared with `scenes.py` (tar members, PNG bytes, shard specs),
so the outputs are in the formats `open_clip_hn.eval` and OpenCLIP read:

  train shards   `{key}.png` + `{key}.txt` webdataset shards and `sizes.json`
  test sets      SugarCrepe layout `{type}.json` + `images/` for swap_attributes, swap_objects,
                 replace_relation, replace_attribute and replace_object (negatives edit the
                 related pair; bystanders stay), and `retrieval/` (distinct compositions)

Compositions (the related pair and the axis of their relation) are split 80/10/10 into
train/val/test by a hash, a pair and its mirror image sharing a split, so no test composition is
ever seen in training (nor as a `--hn-mirror` flip). Everything is a pure function of
(seed, split, kind, index).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import re
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from .files import atomic_write_bytes, atomic_write_json
from .argtypes import non_negative_int, positive_int
from .scenes import MIN_IMAGE_SIZE, _png, _tar_bytes, shards_spec

SHAPES: tuple[str, ...] = ("star", "ring", "cross", "diamond", "hexagon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "orange": (240, 130, 20),
    "pink": (240, 110, 190),
    "cyan": (30, 200, 220),
    "brown": (130, 75, 30),
    "black": (20, 20, 20),
    "olive": (120, 130, 20),
}
SIZES: dict[str, float] = {"tiny": 0.075, "big": 0.12, "huge": 0.165}  # radius / image side
RELATIONS: dict[str, str] = {"on the left of": "horizontal", "on the right of": "horizontal",
                             "over": "vertical", "under": "vertical"}
OPPOSITE: dict[str, str] = {"on the left of": "on the right of", "on the right of": "on the left of",
                            "over": "under", "under": "over"}
FORMS: tuple[str, ...] = ("{a} {relation} {b}{tail}", "there is {a} {relation} {b}{tail}",
                          "{a} is {relation} {b}{tail}")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two"}
SPLITS: dict[str, tuple[int, int]] = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
COMPOSITIONAL_TYPES: tuple[str, ...] = ("swap_attributes", "swap_objects", "replace_relation",
                                        "replace_attribute", "replace_object")
_SUPERSAMPLE = 4
WORLD_VERSION = 1  # bump when images or captions change (cached data is rendered anew)


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    x: float = 0.5
    y: float = 0.5

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.size)


@dataclass(frozen=True)
class World2Scene:
    """`subject` stands in `relation` to `reference`; `bystanders` are 0-2 identical objects
    (same shape and colour, any size) named with a count after the main clause."""

    subject: Thing
    relation: str
    reference: Thing
    bystanders: tuple[Thing, ...] = ()
    form: int = 0

    @property
    def caption(self) -> str:
        tail = ""
        if self.bystanders:
            first = self.bystanders[0]
            count = len(self.bystanders)
            noun = first.shape + ("es" if count > 1 and first.shape.endswith(("s", "x")) else
                                  "s" if count > 1 else "")
            word = COUNT_WORDS[count]
            if word == "a" and first.colour[0] in "aeiou":
                word = "an"
            tail = f", beside {word} {first.colour} {noun}"
        return FORMS[self.form].format(a=self.subject.phrase, relation=self.relation,
                                       b=self.reference.phrase, tail=tail)

    def composition(self) -> str:
        """The related pair's meaning independent of wording ("A left of B" == "B right of A")."""
        a, relation, b = self.subject.identity, self.relation, self.reference.identity
        if relation in ("on the right of", "under"):
            a, relation, b = b, OPPOSITE[relation], a
        return f"{' '.join(a)}|{relation}|{' '.join(b)}"


def parse_caption(caption: str) -> World2Scene:
    """The related pair (no positions, bystanders or sentence form) of a caption of this module;
    ValueError if it is not one."""
    sizes, colours, shapes = ("|".join(words) for words in (SIZES, COLOURS, SHAPES))
    thing = rf"an? ({sizes}) ({colours}) ({shapes})"
    match = re.search(rf"\b{thing} (?:is )?({'|'.join(RELATIONS)}) {thing}\b", caption)
    if match is None:
        raise ValueError(f"not a world2 caption: {caption!r} (expected 'a SIZE COLOUR SHAPE "
                         f"RELATION a SIZE COLOUR SHAPE', optionally after 'there is')")
    s_size, s_colour, s_shape, relation, r_size, r_colour, r_shape = match.groups()
    return World2Scene(Thing(s_shape, s_colour, s_size), relation, Thing(r_shape, r_colour, r_size))


def split_of(composition: str) -> str:
    """train/val/test (80/10/10 by hash); a pair and its mirror image share a split."""
    a, relation, b = composition.split("|")
    key = "world2|" + "|".join(sorted((a, b))) + "|" + RELATIONS[relation]
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def _rng(seed: int, split: str, kind: str, index: int) -> random.Random:
    return random.Random(f"world2/{seed}/{split}/{kind}/{index}")


def _overlaps(x: float, y: float, r: float, placed: list[tuple[float, float, float]]) -> bool:
    return any(math.hypot(x - px, y - py) < r + pr + 0.03 for px, py, pr in placed)


def _place_pair(rng: random.Random, subject_r: float, reference_r: float, relation: str
                ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres making `relation` unambiguous: apart along its axis, near-aligned across it."""
    horizontal = RELATIONS[relation] == "horizontal"
    first_r, second_r = subject_r, reference_r  # first = left/top object
    swapped = relation in ("on the right of", "under")
    if swapped:
        first_r, second_r = reference_r, subject_r
    for _ in range(1000):
        a = rng.uniform(first_r, 1 - first_r)
        b = rng.uniform(second_r, 1 - second_r)
        if b - a < first_r + second_r + 0.06:
            continue
        across = rng.uniform(max(first_r, second_r), 1 - max(first_r, second_r))
        a_across = min(max(across + rng.uniform(-0.05, 0.05), first_r), 1 - first_r)
        b_across = min(max(across + rng.uniform(-0.05, 0.05), second_r), 1 - second_r)
        first = (a, a_across) if horizontal else (a_across, a)
        second = (b, b_across) if horizontal else (b_across, b)
        return (second, first) if swapped else (first, second)
    raise RuntimeError(f"could not place objects of radii {subject_r}, {reference_r}")


def _identity(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))


def sample_scene(rng: random.Random, split: str = "train") -> World2Scene:
    """A random scene whose related pair's composition belongs to `split`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    while True:
        first, second = _identity(rng), _identity(rng)
        relation = rng.choice(list(RELATIONS))
        scene = World2Scene(Thing(*first), relation, Thing(*second), form=rng.randrange(len(FORMS)))
        if first == second or split_of(scene.composition()) != split:
            continue
        (sx, sy), (rx, ry) = _place_pair(rng, SIZES[first[2]], SIZES[second[2]], relation)
        placed = [(sx, sy, SIZES[first[2]]), (rx, ry, SIZES[second[2]])]
        # bystanders: one shape and colour that neither related object has (no ambiguity)
        shape = rng.choice([s for s in SHAPES if s not in (first[0], second[0])])
        colour = rng.choice([c for c in COLOURS if c not in (first[1], second[1])])
        bystanders = []
        for _ in range(rng.choice((0, 1, 1, 2))):
            size = rng.choice(list(SIZES))
            r = SIZES[size]
            for _ in range(200):
                x, y = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
                if not _overlaps(x, y, r, placed):
                    placed.append((x, y, r))
                    bystanders.append(Thing(shape, colour, size, x, y))
                    break
        return replace(scene, subject=replace(scene.subject, x=sx, y=sy),
                       reference=replace(scene.reference, x=rx, y=ry), bystanders=tuple(bystanders))


def _polygon(cx: float, cy: float, r: float, points: int, inner: float | None = None,
             turn: float = -math.pi / 2) -> list[tuple[float, float]]:
    """A regular polygon (or a star when `inner` is the inner radius share)."""
    corners = points * (2 if inner else 1)
    out = []
    for i in range(corners):
        radius = r * (inner if inner and i % 2 else 1)
        angle = turn + 2 * math.pi * i / corners
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, side: int) -> None:
    cx, cy, r = thing.x * side, thing.y * side, SIZES[thing.size] * side
    fill, outline, width = COLOURS[thing.colour], (255, 255, 255), max(1, side // 64)
    if thing.shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, inner=0.45), fill=fill, outline=outline, width=width)
    elif thing.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r * 0.45)))
    elif thing.shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif thing.shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4), fill=fill, outline=outline, width=width)
    elif thing.shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, turn=0.0), fill=fill, outline=outline, width=width)
    else:
        raise ValueError(f"unknown shape {thing.shape!r}; expected one of {', '.join(SHAPES)}")


def render(scene: World2Scene, image_size: int = 64, tint: tuple[int, int, int] = (215, 215, 215)
           ) -> Image.Image:
    """Draw supersampled on a pale tinted background, then downsample (anti-aliased)."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), tint)
    draw = ImageDraw.Draw(image)
    for thing in (*scene.bystanders, scene.subject, scene.reference):
        _draw(draw, thing, side)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _tint(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(170, 235) for _ in range(3))  # type: ignore[return-value]


def sample(index: int, seed: int = 0, split: str = "train", image_size: int = 64
           ) -> tuple[Image.Image, str]:
    """Sample `index` of the stream (seed, split): its image and caption."""
    rng = _rng(seed, split, "sample", index)
    scene = sample_scene(rng, split)
    return render(scene, image_size, _tint(rng)), scene.caption


def write_shards(out_dir: str, num_samples: int, samples_per_shard: int = 1000, seed: int = 0,
                 image_size: int = 64, split: str = "train") -> list[str]:
    """Webdataset shards (`{key}.png`, `{key}.txt`) and OpenCLIP's `sizes.json`; returns the
    shard paths (`scenes.shards_spec` makes a `--train-data` value of them)."""
    if num_samples < 1 or samples_per_shard < 1:
        raise ValueError(f"num_samples and samples_per_shard must be >= 1, got "
                         f"{num_samples} and {samples_per_shard}")
    paths, sizes = [], {}
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        members = []
        for index in range(start, min(start + samples_per_shard, num_samples)):
            image, caption = sample(index, seed, split, image_size)
            members += [(f"{index:08d}.png", _png(image)), (f"{index:08d}.txt", caption.encode())]
        name = f"shard-{shard:05d}.tar"
        paths.append(os.path.join(out_dir, name))
        atomic_write_bytes(paths[-1], _tar_bytes(members))
        sizes[name] = len(members) // 2
    atomic_write_json(os.path.join(out_dir, "sizes.json"), sizes, indent=1)
    return paths


def exchange(scene: World2Scene, attribute: str) -> World2Scene:
    """The scene with the related pair's `attribute` (shape, colour or size) traded between them:
    a swap negative's scene."""
    s, r = scene.subject, scene.reference
    return replace(scene, subject=replace(s, **{attribute: getattr(r, attribute)}),
                   reference=replace(r, **{attribute: getattr(s, attribute)}))


def negative_caption(scene: World2Scene, kind: str, rng: random.Random) -> str | None:
    """The caption made false in the way `kind` names (on the related pair), or None."""
    s, r = scene.subject, scene.reference
    taken_shapes = {s.shape, r.shape} | {b.shape for b in scene.bystanders}
    taken_colours = {s.colour, r.colour} | {b.colour for b in scene.bystanders}
    if kind == "swap_attributes":
        options = [a for a in ("colour", "size") if getattr(s, a) != getattr(r, a)]
        if not options:
            return None
        new = exchange(scene, rng.choice(options))
    elif kind == "swap_objects":
        if s.shape == r.shape:
            return None
        new = exchange(scene, "shape")
    elif kind == "replace_relation":
        new = replace(scene, relation=OPPOSITE[scene.relation])
    elif kind == "replace_attribute":
        target = rng.choice(("subject", "reference"))
        colour = rng.choice([c for c in COLOURS if c not in taken_colours])
        new = replace(scene, **{target: replace(getattr(scene, target), colour=colour)})
    elif kind == "replace_object":
        target = rng.choice(("subject", "reference"))
        shape = rng.choice([c for c in SHAPES if c not in taken_shapes])
        new = replace(scene, **{target: replace(getattr(scene, target), shape=shape)})
    else:
        raise ValueError(f"unknown compositional type {kind!r}; expected one of "
                         f"{', '.join(COMPOSITIONAL_TYPES)}")
    return new.caption


def write_test_sets(out_dir: str, num_items: int = 1000, seed: int = 1, image_size: int = 64,
                    split: str = "test", num_retrieval: int = 300) -> dict[str, str]:
    """SugarCrepe-layout sets of the compositions of `split` and a retrieval folder (module
    docstring); returns {set name: path}."""
    if num_items < 1 or num_retrieval < 1:
        raise ValueError(f"num_items and num_retrieval must be >= 1, got {num_items} and "
                         f"{num_retrieval}")
    written: dict[str, str] = {}
    for kind in COMPOSITIONAL_TYPES:
        items: dict[str, dict[str, str]] = {}
        index = 0
        while len(items) < num_items:
            rng = _rng(seed, split, kind, index)
            index += 1
            scene = sample_scene(rng, split)
            negative = negative_caption(scene, kind, rng)
            if negative is None:
                continue
            filename = f"{kind}-{len(items):05d}.png"
            atomic_write_bytes(os.path.join(out_dir, "images", filename),
                               _png(render(scene, image_size, _tint(rng))))
            items[str(len(items))] = {"filename": filename, "caption": scene.caption,
                                      "negative_caption": negative}
        written[kind] = os.path.join(out_dir, f"{kind}.json")
        atomic_write_json(written[kind], items, indent=1)
    retrieval = os.path.join(out_dir, "retrieval")
    seen: set[str] = set()
    index = 0
    while len(seen) < num_retrieval:
        rng = _rng(seed, split, "retrieval", index)
        index += 1
        if index > 100 * num_retrieval:
            raise ValueError(f"split {split!r} has fewer than {num_retrieval} distinct "
                             "compositions; lower num_retrieval")
        scene = sample_scene(rng, split)
        if scene.composition() in seen:
            continue
        key = f"{len(seen):05d}"
        seen.add(scene.composition())
        atomic_write_bytes(os.path.join(retrieval, f"{key}.png"),
                           _png(render(scene, image_size, _tint(rng))))
        atomic_write_bytes(os.path.join(retrieval, f"{key}.txt"), scene.caption.encode())
    written["retrieval"] = retrieval
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_hn.world2",
        description="Render the second procedural world: training shards and held-apart sets.")
    add = parser.add_argument
    add("--output-dir", required=True, help="Folder to write into.")
    add("--train-samples", type=non_negative_int, default=20000, help="Training samples (0: none). Default: 20000.")
    add("--samples-per-shard", type=positive_int, default=2500, help="Default: 2500.")
    add("--test-items", type=non_negative_int, default=1000, help="Items per compositional type (0: none). "
                                                      "Default: 1000.")
    add("--test-split", choices=("val", "test"), default="test", help="Default: test.")
    add("--image-size", type=positive_int, default=64, help="Default: 64 (at least 16).")
    add("--seed", type=int, default=0, help="Default: 0.")
    args = parser.parse_args(argv)
    if args.image_size < MIN_IMAGE_SIZE:
        parser.error(f"--image-size {args.image_size}: scenes are drawn at {MIN_IMAGE_SIZE} pixels "
                     "or more")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output-dir {args.output_dir} is a file; pass a folder (made when missing)")
    if args.train_samples:
        paths = write_shards(os.path.join(args.output_dir, "train"), args.train_samples,
                             args.samples_per_shard, args.seed, args.image_size)
        print(f"wrote {len(paths)} shards: {shards_spec(paths)}")
    if args.test_items:
        out = os.path.join(args.output_dir, args.test_split)
        write_test_sets(out, args.test_items, args.seed + 1, args.image_size, args.test_split)
        print(f"wrote compositional sets to {out}")


if __name__ == "__main__":
    main()
