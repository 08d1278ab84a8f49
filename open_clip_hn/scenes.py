"""Procedural two-object scenes with captions: the offline data of the tests, benchmarks and demo.

A scene holds two distinct objects (shape x colour x size) in a spatial relation, e.g. "a small red
cube to the left of a large blue sphere". Everything is a pure function of (seed, split, index), so
shards and test sets are reproducible and can be written in any order.

Compositions (the two objects and their relation, whichever way the caption words it) are split by
a hash into train / val / test, so the compositional sets are held apart from the training shards:
no test scene's composition is ever seen in training, not even mirrored (a composition and its
mirror image share a split). The swap negatives hold the caption's exact
words, and every relation is worded both ways in training ("A left of B" = "B right of A"), so a
model that ignores word order and binding scores swap and relation negatives at chance.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, replace
from typing import Iterable

from PIL import Image, ImageDraw

from .argtypes import non_negative_int, positive_int
from .files import atomic_write_bytes, atomic_write_json

MIN_IMAGE_SIZE = 16  # the smallest canvas the renderers draw every shape and size on

SHAPES: tuple[str, ...] = ("cube", "sphere", "cone", "cylinder")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "white": (240, 240, 240),
}
SIZES: dict[str, float] = {"small": 0.11, "large": 0.19}  # radius as a share of the image side
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
OPPOSITE: dict[str, str] = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
SPLITS: dict[str, tuple[int, int]] = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
COMPOSITIONAL_TYPES: tuple[str, ...] = (
    "swap_attributes",
    "swap_objects",
    "replace_relation",
    "replace_attribute",
    "replace_object",
)
IMAGE_PAIR_SETS: tuple[str, ...] = ("relation_pairs", "attribute_pairs")
_SUPERSAMPLE = 4
RENDER_VERSION = 1  # bump when the images change, so cached data (the demo's) is rendered anew


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float = 0.5  # centre, as a share of the image side
    y: float = 0.5

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.size)


@dataclass(frozen=True)
class Scene:
    """`subject` stands in `relation` to `reference`; the caption is worded in that order."""

    subject: SceneObject
    relation: str
    reference: SceneObject

    @property
    def caption(self) -> str:
        return f"{self.subject.phrase} {self.relation} {self.reference.phrase}"

    def composition(self) -> str:
        """The scene's meaning independent of wording ("A left of B" == "B right of A")."""
        if self.relation in ("to the right of", "below"):
            return describe(self.reference.identity, OPPOSITE[self.relation], self.subject.identity)
        return describe(self.subject.identity, self.relation, self.reference.identity)


def describe(a: tuple[str, ...], relation: str, b: tuple[str, ...]) -> str:
    return f"{' '.join(a)}|{relation}|{' '.join(b)}"


def parse_caption(caption: str) -> Scene:
    """The scene (without positions) that a caption of this module describes; ValueError if not."""
    for relation in RELATIONS:
        left, sep, right = caption.partition(f" {relation} ")
        if sep:
            parts = [left.split(), right.split()]
            if all(len(p) == 4 and p[0] == "a" and p[1] in SIZES and p[2] in COLOURS
                   and p[3] in SHAPES for p in parts):
                (_, s_size, s_colour, s_shape), (_, r_size, r_colour, r_shape) = parts
                return Scene(SceneObject(s_shape, s_colour, s_size), relation,
                             SceneObject(r_shape, r_colour, r_size))
    raise ValueError(f"not a scene caption: {caption!r} (expected 'a SIZE COLOUR SHAPE "
                     f"RELATION a SIZE COLOUR SHAPE')")


def split_of(composition: str) -> str:
    """Deterministic train/val/test assignment (80/10/10 by hash) of a composition.

    A composition and its mirror image ("A left of B" and "B left of A") share a split, so a
    flipped training image (`--hn-mirror`) never shows a held-out composition.
    """
    a, relation, b = composition.split("|")
    axis = "horizontal" if relation in ("to the left of", "to the right of") else "vertical"
    key = "|".join(sorted((a, b))) + "|" + axis
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def _place(rng: random.Random, subject_r: float, reference_r: float, relation: str
           ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres for subject and reference that make `relation` unambiguous: separated along its
    axis with a gap, nearly aligned on the other axis."""
    gap = 0.04
    for _ in range(1000):
        first_r, second_r = (subject_r, reference_r)
        if relation in ("to the right of", "below"):
            first_r, second_r = reference_r, subject_r  # the left/top object comes first
        a = rng.uniform(first_r, 1 - first_r)
        b = rng.uniform(second_r, 1 - second_r)
        if b - a < first_r + second_r + gap:
            continue
        cross = rng.uniform(max(first_r, second_r), 1 - max(first_r, second_r))
        a_cross = min(max(cross + rng.uniform(-0.06, 0.06), first_r), 1 - first_r)
        b_cross = min(max(cross + rng.uniform(-0.06, 0.06), second_r), 1 - second_r)
        horizontal = relation in ("to the left of", "to the right of")
        first = (a, a_cross) if horizontal else (a_cross, a)
        second = (b, b_cross) if horizontal else (b_cross, b)
        if relation in ("to the right of", "below"):
            return second, first
        return first, second
    raise RuntimeError(f"could not place objects of radii {subject_r}, {reference_r}")


def _random_identity(rng: random.Random) -> tuple[str, str, str]:
    return (rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))


def sample_scene(rng: random.Random, split: str = "train") -> Scene:
    """A random scene whose composition belongs to `split`, with two distinct objects."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    while True:
        first, second = _random_identity(rng), _random_identity(rng)
        relation = rng.choice(RELATIONS)
        if first == second or split_of(
                Scene(SceneObject(*first), relation, SceneObject(*second)).composition()) != split:
            continue
        (sx, sy), (rx, ry) = _place(rng, SIZES[first[2]], SIZES[second[2]], relation)
        return Scene(SceneObject(*first, x=sx, y=sy), relation, SceneObject(*second, x=rx, y=ry))


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy, r = obj.x * side, obj.y * side, SIZES[obj.size] * side
    fill = COLOURS[obj.colour]
    if obj.shape == "cube":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "sphere":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "cone":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif obj.shape == "cylinder":
        w = r * 0.45
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {', '.join(SHAPES)}")


def render(scene: Scene, image_size: int = 32, background: int = 64) -> Image.Image:
    """Draw the scene supersampled, then downsample (anti-aliased edges at tiny sizes)."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), (background,) * 3)
    draw = ImageDraw.Draw(image)
    for obj in (scene.subject, scene.reference):
        _draw_object(draw, obj, side)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _rng(seed: int, split: str, kind: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{split}/{kind}/{index}")


def scene_sample(index: int, seed: int = 0, split: str = "train", image_size: int = 32
                 ) -> tuple[Image.Image, str]:
    """Sample `index` of the stream (seed, split): its image and caption."""
    rng = _rng(seed, split, "sample", index)
    scene = sample_scene(rng, split)
    return render(scene, image_size, background=rng.randint(40, 100)), scene.caption


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_scene_shards(out_dir: str, num_samples: int, samples_per_shard: int = 1000,
                       seed: int = 0, image_size: int = 32, split: str = "train") -> list[str]:
    """Write webdataset shards (`{key}.png`, `{key}.txt`) and OpenCLIP's `sizes.json`.

    Returns the shard paths; `shards_spec(paths)` turns them into a `--train-data` value.
    """
    if num_samples < 1 or samples_per_shard < 1:
        raise ValueError(f"num_samples and samples_per_shard must be >= 1, got "
                         f"{num_samples} and {samples_per_shard}")
    paths, sizes = [], {}
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        members = []
        for index in range(start, min(start + samples_per_shard, num_samples)):
            image, caption = scene_sample(index, seed, split, image_size)
            key = f"{index:08d}"
            members += [(f"{key}.png", _png(image)), (f"{key}.txt", caption.encode())]
        name = f"shard-{shard:05d}.tar"
        path = os.path.join(out_dir, name)
        atomic_write_bytes(path, _tar_bytes(members))
        paths.append(path)
        sizes[name] = len(members) // 2
    atomic_write_json(os.path.join(out_dir, "sizes.json"), sizes, indent=1)
    return paths


def shards_spec(paths: list[str]) -> str:
    """A `--train-data` / `--val-data` value for OpenCLIP naming exactly these shards."""
    return "::".join(paths)


def negative_caption(scene: Scene, kind: str, rng: random.Random) -> str | None:
    """The caption of `scene` made false in the way `kind` names, or None when impossible
    (e.g. swapping the shapes of two cubes)."""
    s, r = scene.subject, scene.reference
    if kind == "swap_attributes":
        options = [a for a in ("colour", "size") if getattr(s, a) != getattr(r, a)]
        if not options:
            return None
        attr = rng.choice(options)
        new = replace(scene, subject=replace(s, **{attr: getattr(r, attr)}),
                      reference=replace(r, **{attr: getattr(s, attr)}))
    elif kind == "swap_objects":
        if s.shape == r.shape:
            return None
        new = replace(scene, subject=replace(s, shape=r.shape), reference=replace(r, shape=s.shape))
    elif kind == "replace_relation":
        new = replace(scene, relation=OPPOSITE[scene.relation])
    elif kind == "replace_attribute":
        target = rng.choice(("subject", "reference"))
        colour = rng.choice([c for c in COLOURS if c not in (s.colour, r.colour)])
        new = replace(scene, **{target: replace(getattr(scene, target), colour=colour)})
    elif kind == "replace_object":
        target = rng.choice(("subject", "reference"))
        shape = rng.choice([c for c in SHAPES if c not in (s.shape, r.shape)])
        new = replace(scene, **{target: replace(getattr(scene, target), shape=shape)})
    else:
        raise ValueError(f"unknown compositional type {kind!r}; expected one of "
                         f"{', '.join(COMPOSITIONAL_TYPES)}")
    return new.caption


def _mirror(scene: Scene) -> Scene:
    """The same two objects with their positions exchanged (the relation now reads the other way)."""
    s, r = scene.subject, scene.reference
    return replace(scene, subject=replace(s, x=r.x, y=r.y), reference=replace(r, x=s.x, y=s.y))


def write_compositional_sets(out_dir: str, num_items: int = 1000, seed: int = 1,
                             image_size: int = 32, split: str = "test",
                             types: tuple[str, ...] = COMPOSITIONAL_TYPES,
                             num_pairs: int | None = None, num_retrieval: int = 256
                             ) -> dict[str, str]:
    """Write held-apart test sets from compositions of `split` (never in the training shards).

    Layout (what `open_clip_hn.eval` reads):
      {type}.json             SugarCrepe layout {id: {"filename", "caption", "negative_caption"}}
      images/                 the images those files name
      {name}.jsonl            Winoground-style image pairs, one {"id", "image_0", "image_1",
                              "caption_0", "caption_1"} per line (relation_pairs: the objects
                              trade places; attribute_pairs: they trade colours)
      retrieval/              `{key}.png` + `{key}.txt` pairs with distinct compositions
    Returns {set name: path}.
    """
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    images_dir = os.path.join(out_dir, "images")
    written: dict[str, str] = {}
    for kind in types:
        items = {}
        index = 0
        while len(items) < num_items:
            rng = _rng(seed, split, kind, index)
            index += 1
            scene = sample_scene(rng, split)
            negative = negative_caption(scene, kind, rng)
            if negative is None:
                continue
            filename = f"{kind}-{len(items):05d}.png"
            atomic_write_bytes(os.path.join(images_dir, filename),
                               _png(render(scene, image_size, background=rng.randint(40, 100))))
            items[str(len(items))] = {"filename": filename, "caption": scene.caption,
                                      "negative_caption": negative}
        written[kind] = os.path.join(out_dir, f"{kind}.json")
        atomic_write_json(written[kind], items, indent=1)
    for name in IMAGE_PAIR_SETS:
        written[name] = _write_pair_set(out_dir, name, num_pairs or num_items // 2 or 1,
                                        seed, image_size, split)
    written["retrieval"] = _write_retrieval(os.path.join(out_dir, "retrieval"), num_retrieval,
                                            seed, image_size, split)
    return written


def _write_pair_set(out_dir: str, name: str, count: int, seed: int, image_size: int, split: str
                    ) -> str:
    lines = []
    for i in range(count):
        rng = _rng(seed, split, name, i)
        while True:
            scene = sample_scene(rng, split)
            if name == "relation_pairs":
                other = _mirror(scene)
                break
            s, r = scene.subject, scene.reference
            if s.colour != r.colour:
                other = replace(scene, subject=replace(s, colour=r.colour),
                                reference=replace(r, colour=s.colour))
                break
        background = rng.randint(40, 100)
        names = [f"{name}-{i:05d}-{j}.png" for j in (0, 1)]
        for filename, picture in zip(names, (scene, other)):
            atomic_write_bytes(os.path.join(out_dir, "images", filename),
                               _png(render(picture, image_size, background)))
        # caption_1 describes image_1 with caption_0's words in another order or binding
        caption_1 = (replace(scene, relation=OPPOSITE[scene.relation]).caption
                     if name == "relation_pairs" else other.caption)
        lines.append(json.dumps({"id": i, "image_0": names[0], "image_1": names[1],
                                 "caption_0": scene.caption, "caption_1": caption_1}))
    path = os.path.join(out_dir, f"{name}.jsonl")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def _write_retrieval(out_dir: str, count: int, seed: int, image_size: int, split: str) -> str:
    seen: set[str] = set()
    index = 0
    while len(seen) < count:
        rng = _rng(seed, split, "retrieval", index)
        index += 1
        if index > 100 * count:
            raise ValueError(f"split {split!r} has fewer than {count} distinct compositions; "
                             f"lower num_retrieval")
        scene = sample_scene(rng, split)
        if scene.composition() in seen:
            continue
        key = f"{len(seen):05d}"
        seen.add(scene.composition())
        atomic_write_bytes(os.path.join(out_dir, f"{key}.png"),
                           _png(render(scene, image_size, background=rng.randint(40, 100))))
        atomic_write_bytes(os.path.join(out_dir, f"{key}.txt"), scene.caption.encode())
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_hn.scenes",
        description="Render procedural scenes: training shards and held-apart compositional sets.")
    parser.add_argument("--output-dir", required=True, help="Folder to write into.")
    parser.add_argument("--train-samples", type=non_negative_int, default=20000,
                        help="Training samples (0: no shards). Default: 20000.")
    parser.add_argument("--samples-per-shard", type=positive_int, default=2500, help="Default: 2500.")
    parser.add_argument("--test-items", type=non_negative_int, default=1000,
                        help="Items per compositional type (0: no sets). Default: 1000.")
    parser.add_argument("--test-split", choices=("val", "test"), default="test",
                        help="Composition split of the compositional sets. Default: test.")
    parser.add_argument("--image-size", type=positive_int, default=32, help="Default: 32 (at least 16).")
    parser.add_argument("--seed", type=int, default=0, help="Default: 0.")
    args = parser.parse_args(argv)
    if args.image_size < MIN_IMAGE_SIZE:
        parser.error(f"--image-size {args.image_size}: scenes are drawn at {MIN_IMAGE_SIZE} pixels "
                     "or more")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output-dir {args.output_dir} is a file; pass a folder (made when missing)")
    if args.train_samples:
        paths = write_scene_shards(os.path.join(args.output_dir, "train"), args.train_samples,
                                   args.samples_per_shard, args.seed, args.image_size)
        print(f"wrote {len(paths)} shards to {os.path.join(args.output_dir, 'train')}")
    if args.test_items:
        out = os.path.join(args.output_dir, args.test_split)
        write_compositional_sets(out, args.test_items, args.seed + 1, args.image_size,
                                 args.test_split)
        print(f"wrote compositional sets to {out}")


if __name__ == "__main__":
    main()
