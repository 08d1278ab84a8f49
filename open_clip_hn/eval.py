"""Compositional evaluation of any OpenCLIP model: per negative type, in the loop and after.

Set layouts read from one folder (each file is one set, named by its stem):
  SugarCrepe   `{name}.json` = {id: {"filename", "caption", "negative_caption"}}; images under
               `images/` (or beside the JSON). Accuracy: the image scores caption > negative.
  ARO          `{name}.json` = [{"image_path", "true_caption", "false_caption", optional
               "bbox_x", "bbox_y", "bbox_w", "bbox_h"}, ...] (VG-Relation, VG-Attribution); the
               image is cropped to the box as ARO does. Accuracy as above; with ARO's
               "relation_name" or "attributes" fields, `acc` is ARO's macro accuracy (per
               relation without its symmetric ones, or per attribute pair with 25+ items) and
               `item_acc` the per-item one.
  image pairs  `{name}.jsonl`, one {"image_0", "image_1", "caption_0", "caption_1"} per line
               (Winoground; InpaintCOCO converts to it): text, image and group scores.
Retrieval reads a folder of `{key}.{png,jpg,jpeg,webp}` + `{key}.txt` pairs (one caption per
line, several allowed): R@1/R@5 both ways, as CLIP_benchmark defines them.
Results print as a table (or in SugarCrepe's grouping, formats.py) and save as one JSON document
or as CLIP_benchmark's per-set files. A checkpoint trained with the plugin carries a record of
its --model (provenance.py); a different --model is refused before anything is loaded.

The scoring functions are pure (features in, numbers out); loading and encoding sit around them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import zipfile
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from PIL import Image

from .argtypes import overwritten_input, positive_int, torch_device, writable_output
from .eval_sets import first_few, layout_error, read_choice_records, read_pair_records
from .files import atomic_open, atomic_write_json, unknown_model_hint
from .formats import SUGARCREPE_SPLITS, clip_benchmark_records, file_slug, format_sugarcrepe_table
from .provenance import model_mismatch, read_record

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# counts beside the metrics of a set's results (`options`: captions per item of a choice set)
COUNT_KEYS = ("n", "skipped", "groups_averaged", "options")
# what a scorer without information gets on an image pair: Winoground's text and image scores
# each need two independent comparisons right, its group score the two matched pairs on top of 4
PAIR_CHANCE = {"text": 1 / 4, "image": 1 / 4, "group": 1 / 6}
RETRIEVAL = "retrieval"  # the retrieval results' name, and the subfolder read with a set folder
# ARO's macro accuracies (Yuksekgonul et al., ICLR 2023; the repository's notebook
# "Replicate ARO! VG-Relation, VG-Attribution"): VG-Relation averages over relations, leaving out
# those whose two arguments can be exchanged without making the caption false; VG-Attribution
# averages over attribute pairs with at least 25 items.
ARO_SYMMETRIC_RELATIONS = frozenset((
    "adjusting", "attached to", "between", "bigger than", "biting", "boarding", "brushing",
    "chewing", "cleaning", "climbing", "close to", "coming from", "coming out of", "contain",
    "crossing", "dragging", "draped over", "drinking", "drinking from", "driving", "driving down",
    "driving on", "eating from", "eating in", "enclosing", "exiting", "facing", "filled with",
    "floating in", "floating on", "flying", "flying above", "flying in", "flying over",
    "flying through", "full of", "going down", "going into", "going through", "grazing in",
    "growing in", "growing on", "guiding", "hanging from", "hanging in", "hanging off",
    "hanging over", "higher than", "holding onto", "hugging", "in between", "jumping off",
    "jumping on", "jumping over", "kept in", "larger than", "leading", "leaning over", "leaving",
    "licking", "longer than", "looking in", "looking into", "looking out", "looking over",
    "looking through", "lying next to", "lying on top of", "making", "mixed with", "mounted on",
    "moving", "on the back of", "on the edge of", "on the front of", "on the other side of",
    "opening", "painted on", "parked at", "parked beside", "parked by", "parked in",
    "parked in front of", "parked near", "parked next to", "perched on", "petting", "piled on",
    "playing", "playing in", "playing on", "playing with", "pouring", "reaching for", "reading",
    "reflected on", "riding on", "running in", "running on", "running through", "seen through",
    "sitting behind", "sitting beside", "sitting by", "sitting in front of", "sitting near",
    "sitting next to", "sitting under", "skiing down", "skiing on", "sleeping in", "sleeping on",
    "smiling at", "sniffing", "splashing", "sprinkled on", "stacked on", "standing against",
    "standing around", "standing behind", "standing beside", "standing in front of",
    "standing near", "standing next to", "staring at", "stuck in", "surrounding", "swimming in",
    "swinging", "talking to", "topped with", "touching", "traveling down", "traveling on",
    "tying", "typing on", "underneath", "wading in", "waiting for", "walking across",
    "walking by", "walking down", "walking next to", "walking through", "working in",
    "working on", "worn on", "wrapped around", "wrapped in", "by", "of", "near", "next to",
    "with", "beside", "on the side of", "around"))
ARO_MIN_ATTRIBUTE_ITEMS = 25
# what PIL raises for a file that is not a readable image (truncated, wrong format, bomb)
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------- pure scoring

def choice_correct(image_features: torch.Tensor, option_features: torch.Tensor) -> torch.Tensor:
    """Items whose image scores option 0 (the true caption) strictly above every other option.

    image_features [N, D], option_features [N, C, D] (L2-normalised) -> bool [N]. Ties and NaN
    count as wrong, so a model that cannot tell the captions apart (or diverged) scores 0.
    """
    scores = torch.einsum("nd,ncd->nc", image_features, option_features)
    return scores[:, 0] > scores[:, 1:].max(dim=1).values


def aro_macro_accuracy(correct: torch.Tensor, groups: Sequence[str], kind: str
                       ) -> tuple[float, int] | None:
    """(ARO's macro accuracy, groups averaged) of per-item results `correct` [N] (bool) with
    each item's relation or attribute pair; None when no group qualifies."""
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    if kind == "relation":
        kept = [rows for group, rows in members.items() if group not in ARO_SYMMETRIC_RELATIONS]
    else:
        kept = [rows for rows in members.values() if len(rows) >= ARO_MIN_ATTRIBUTE_ITEMS]
    if not kept:
        return None
    return sum(correct[rows].float().mean().item() for rows in kept) / len(kept), len(kept)


def pair_scores(scores: torch.Tensor) -> dict[str, float]:
    """Winoground's text, image and group scores from scores[n, caption i, image j] ([N, 2, 2]).

    Comparisons are strict, so ties and NaN (a diverged model) count as wrong."""
    s = scores
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {"text": text.float().mean().item(), "image": image.float().mean().item(),
            "group": (text & image).float().mean().item()}


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor,
                     ks: Sequence[int] = (1, 5), *, text_image: torch.Tensor | None = None
                     ) -> dict[str, float]:
    """R@k of image->text and text->image (CLIP_benchmark's definitions).

    `text_image[t]` is the image of caption t (default: caption i is image i's only one). An
    image is a hit at k when one of its captions ranks within the top k captions; a caption when
    its image ranks within the top k images. A tie with a wrong candidate counts against the
    true one, and a NaN score misses, so a collapsed or diverged model scores at most chance."""
    if text_image is None:
        text_image = torch.arange(text_features.shape[0])
    text_image = text_image.to(image_features.device)
    similarity = image_features @ text_features.T  # [I, T]
    own = text_image.unsqueeze(0) == torch.arange(similarity.shape[0], device=similarity.device).unsqueeze(1)
    # image -> text: its best caption against every caption of another image
    best = similarity.masked_fill(~own, float("-inf")).max(dim=1).values
    image_rank = torch.where(own, False, ~(similarity < best.unsqueeze(1))).sum(dim=1)
    image_hit = torch.isfinite(best)
    # text -> image: its image against every other image
    per_text = similarity.T  # [T, I]
    true = per_text.gather(1, text_image.unsqueeze(1))
    text_rank = torch.where(own.T, False, ~(per_text < true)).sum(dim=1)
    text_hit = torch.isfinite(true[:, 0])
    results = {}
    for direction, rank, finite in (("image_to_text", image_rank, image_hit),
                                    ("text_to_image", text_rank, text_hit)):
        for k in ks:
            results[f"{direction}_R@{k}"] = ((rank < k) & finite).float().mean().item()
    return results


# ----------------------------------------------------------------------------- loading

@dataclass
class ChoiceSet:
    """Items of (image path, crop box or None, [true caption, negatives...]); an ARO set also
    names each item's group (its relation, or its attribute pair) for ARO's macro accuracy."""

    name: str
    path: str
    items: list[tuple[str, tuple[float, float, float, float] | None, list[str]]]
    skipped: int = 0  # items with a missing image or an empty box
    empty_boxes: int = 0  # of those, ARO boxes under a pixel wide or high
    groups: list[str] | None = None
    group_kind: str | None = None  # "relation" (VG-Relation) or "attributes" (VG-Attribution)
    missing: list[str] = field(default_factory=list)  # the images not found, as the set names them


@dataclass
class PairSet:
    name: str
    path: str
    items: list[tuple[str, str, str, str]]  # image_0, image_1, caption_0, caption_1
    skipped: int = 0
    missing: list[str] = field(default_factory=list)  # the images not found, as the set names them


@dataclass
class RetrievalSet:
    path: str
    items: list[tuple[str, list[str]]] = field(default_factory=list)  # image path, its captions
    skipped: int = 0  # images without a caption file, caption files without an image
    unpaired: list[str] = field(default_factory=list)  # their keys


def _find_image(root: str, name: str) -> str | None:
    for candidate in (os.path.join(root, "images", name), os.path.join(root, name)):
        if os.path.isfile(candidate):
            return candidate
    return None


def load_choice_set(path: str) -> ChoiceSet:
    """Read one SugarCrepe- or ARO-layout JSON; missing images, and ARO boxes less than a pixel
    wide or high (nothing to crop), are skipped and counted."""
    root, name = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
    records, keys = read_choice_records(path)
    result = ChoiceSet(name, path, [])
    groups, empty_boxes = [], []
    for label, record in records:
        image = _find_image(root, record[keys[0]])
        if image is None:
            result.missing.append(record[keys[0]])
            continue
        box = None
        if all(k in record for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")):
            try:
                x, y, w, h = (float(record[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
            except (TypeError, ValueError):
                raise layout_error(path, f"{label}: bbox_x/y/w/h must be numbers") from None
            if not (w >= 1 and h >= 1):
                empty_boxes.append(label)
                continue
            box = (x, y, x + w, y + h)
        result.items.append((image, box, [record[keys[1]], record[keys[2]]]))
        groups.append(_aro_group(record))
    result.empty_boxes = len(empty_boxes)
    result.skipped = len(result.missing) + result.empty_boxes
    if empty_boxes:
        logging.warning(f"eval set {path}: {len(empty_boxes)} item(s) whose box is less than a "
                        f"pixel wide or high will be skipped ({first_few(empty_boxes)})")
    if not result.items:
        raise FileNotFoundError(f"{path}: none of its {len(records)} items has a usable image "
                                f"({len(result.missing)} not found under "
                                f"{os.path.join(root, 'images')} or {root}, {len(empty_boxes)} "
                                "with a box under a pixel)")
    kinds = {kind for kind, _ in groups}
    if len(kinds) == 1 and None not in kinds:
        result.group_kind, result.groups = kinds.pop(), [group for _, group in groups]
    return result


def _aro_group(record: dict) -> tuple[str | None, str]:
    """(kind, group) of an ARO record: its relation (VG-Relation) or its two attributes
    (VG-Attribution, joined as ARO joins them); (None, "") for other layouts."""
    if isinstance(record.get("relation_name"), str):
        return "relation", record["relation_name"]
    attributes = record.get("attributes")
    if isinstance(attributes, list) and len(attributes) == 2:
        return "attributes", f"{attributes[0]}_{attributes[1]}"
    return None, ""


def load_pair_set(path: str) -> PairSet:
    """Read a Winoground-style JSONL of image pairs; pairs with a missing image are skipped."""
    root, name = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
    result = PairSet(name, path, [])
    for record in read_pair_records(path):
        images = [_find_image(root, record[k]) or _find_image(root, record[k] + ".png")
                  for k in ("image_0", "image_1")]
        if None in images:
            result.skipped += 1
            result.missing += [record[k] for k, image in zip(("image_0", "image_1"), images)
                               if image is None]
            continue
        result.items.append((images[0], images[1], record["caption_0"], record["caption_1"]))
    if not result.items:
        raise FileNotFoundError(f"{path}: none of its images were found under {root}/images")
    return result


def load_retrieval_set(folder: str) -> RetrievalSet:
    """Pair every image in `folder` with the `.txt` of the same stem, one caption per non-empty
    line (COCO's five captions of an image on five lines). An image without a caption file, or
    a caption file without an image, is counted as skipped and named in a warning."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"retrieval folder {folder} does not exist")
    images: dict[str, str] = {}
    captions: set[str] = set()
    for filename in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(filename)
        if ext.lower() in IMAGE_EXTENSIONS:
            if stem in images:
                raise layout_error(folder, f"{images[stem]} and {filename} share the caption file "
                                           f"{stem}.txt; give each image its own key")
            images[stem] = filename
        elif ext == ".txt":
            captions.add(stem)
    result = RetrievalSet(folder)
    kept = set()
    for stem in sorted(images.keys() & captions):
        with open(os.path.join(folder, stem + ".txt"), encoding="utf-8-sig", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        if lines:
            result.items.append((os.path.join(folder, images[stem]), lines))
            kept.add(stem)
    unpaired = sorted((images.keys() | captions) - kept)
    result.skipped, result.unpaired = len(unpaired), unpaired
    if len(result.items) < 2:
        raise ValueError(f"retrieval folder {folder} holds {len(result.items)} image+caption "
                         f"pairs; expected at least 2 pairs named KEY.png (or .jpg) + KEY.txt")
    if unpaired:
        logging.warning(f"retrieval folder {folder}: {len(unpaired)} key(s) without both an image "
                        f"and a non-empty caption file ({first_few(unpaired)}) are skipped")
    return result


def retrieval_folder(root: str) -> str | None:
    """The retrieval folder read with a compositional folder's sets: `root/retrieval/`, if any."""
    folder = os.path.join(root, RETRIEVAL)
    return folder if os.path.isdir(folder) else None


def retrieval_beside(root: str) -> RetrievalSet | None:
    """`retrieval_folder(root)` loaded, if there is one."""
    folder = retrieval_folder(root)
    return None if folder is None else load_retrieval_set(folder)


def discover_sets(root: str) -> tuple[list[ChoiceSet], list[PairSet]]:
    """Every `*.json` (choice) and `*.jsonl` (image-pair) set directly inside `root` (none where
    `root` holds only a `retrieval/` folder)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"compositional folder {root} does not exist")
    names = sorted(os.listdir(root))
    stems = [os.path.splitext(n)[0] for n in names if n.endswith((".json", ".jsonl"))]
    if RETRIEVAL in stems:
        raise layout_error(root, f"a set named {RETRIEVAL} would share the retrieval results' name; "
                                 "rename it")
    twice = sorted({stem for stem in stems if stems.count(stem) > 1})
    if twice:
        raise layout_error(root, f"{twice[0]}.json and {twice[0]}.jsonl would share the results' "
                                 "name; rename one of them")
    choice = [load_choice_set(os.path.join(root, n)) for n in names if n.endswith(".json")]
    pairs = [load_pair_set(os.path.join(root, n)) for n in names if n.endswith(".jsonl")]
    if not choice and not pairs and retrieval_folder(root) is None:  # retrieval alone is a set too
        raise ValueError(f"compositional folder {root} holds no *.json or *.jsonl sets and no "
                         f"{RETRIEVAL}/ folder")
    return choice, pairs


def check_compositional_sets(root: str) -> dict[str, dict[str, int]]:
    """Validate an evaluation folder fully, before any training: `--hn-eval-compositional`.

    Reads every set the in-loop evaluation reads (layouts: a malformed file or record raises
    ValueError naming the file and the item) and decodes every image once. Returns
    {set: {"items": usable, "missing": ..., "unreadable": ...}}; missing or unreadable images
    are skipped by the evaluation, so they are logged here as one counted warning per set, and
    a set left with no usable item raises (its scores would be meaningless).
    """
    choice_sets, pair_sets = discover_sets(root)
    retrieval = retrieval_beside(root)
    return check_sets(choice_sets, pair_sets, retrieval)


def check_sets(choice_sets: Sequence[ChoiceSet], pair_sets: Sequence[PairSet] = (),
               retrieval: RetrievalSet | None = None) -> dict[str, dict[str, int]]:
    """Decode every image of loaded sets once, so a set without one readable item fails before
    any model is loaded (see `check_compositional_sets`, which reads the sets from a folder)."""
    sizes: dict[str, tuple[int, int] | None] = {}  # None: unreadable

    def ok(path: str) -> bool:
        if path not in sizes:
            try:
                with Image.open(path) as image:
                    image.load()
                    sizes[path] = image.size
            except IMAGE_ERRORS:
                sizes[path] = None
        return sizes[path] is not None

    def missing_images(names: Sequence[str], what: str = "with a missing image") -> str:
        return f"{what} ({first_few(names)})" if names else what

    groups = [(s.name, s.path, [[p] for p, _, _ in s.items], s.skipped - s.empty_boxes,
               missing_images(s.missing)) for s in choice_sets]
    groups += [(s.name, s.path, [[i0, i1] for i0, i1, *_ in s.items], s.skipped,
                missing_images(s.missing)) for s in pair_sets]
    if retrieval:
        groups.append(("retrieval", retrieval.path, [[p] for p, _ in retrieval.items],
                       retrieval.skipped, missing_images(retrieval.unpaired, "without both an image "
                                                         "and a non-empty caption file")))
    summary = {}
    for name, path, items, missing, lacking in groups:
        bad = [item for item in items if not all(ok(p) for p in item)]
        summary[name] = {"items": len(items) - len(bad), "missing": missing, "unreadable": len(bad)}
        unreadable = list(dict.fromkeys(p for item in bad for p in item if not ok(p)))
        if bad and len(bad) == len(items):
            raise _undecodable(path, len(items), unreadable[0])
        if missing or bad:
            logging.warning(f"eval set {path}: {missing} item(s) {lacking}"
                            + (f", {len(bad)} with an unreadable one ({first_few(unreadable)})"
                               if bad else "")
                            + f" will be skipped; {len(items) - len(bad)} usable")
    for s in choice_sets:
        outside = [p for p, box, _ in s.items if box and ok(p) and not _box_meets(box, sizes[p])]
        if outside:
            logging.warning(f"eval set {s.path}: {len(outside)} item(s) whose box lies outside "
                            f"its image (e.g. {outside[0]}) are scored on an empty crop, as ARO "
                            "crops them; check the set's bbox_x/y/w/h")
    return summary


def _box_meets(box: tuple[float, float, float, float], size: tuple[int, int]) -> bool:
    """An (x0, y0, x1, y1) box overlaps a (width, height) image by a pixel or more each way."""
    x0, y0, x1, y1 = box
    return min(x1, size[0]) - max(x0, 0) >= 1 and min(y1, size[1]) - max(y0, 0) >= 1


# ----------------------------------------------------------------------------- encoding

def _load_image(path: str, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    image = _eight_bit(Image.open(path)).convert("RGB")
    return image.crop(box) if box else image


def _eight_bit(image: Image.Image) -> Image.Image:
    """`image` with 8-bit samples where PIL's `convert("RGB")` would clip wider ones to 0..255
    (a 16-bit PNG was scored as an all-white image). 16-bit grey (modes I;16, I;16B, I;16L) is
    divided by 257, so 65535 is 255, as an 8-bit export of it stores it. 32-bit integer (I)
    and float (F) images do not say where their white is (an I image may hold 8- or 16-bit
    values, an F image 0..1 or 0..255), so their own range is spread over 0..255: the lowest
    value black, the highest white (one value throughout: black). Other modes are left to
    `convert`."""
    if image.mode.startswith("I;16"):
        values, low, scale = np.asarray(image, dtype=np.float64), 0.0, 1 / 257
    elif image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        scale = 255 / (high - low) if high > low else 0.0
    else:
        return image
    return Image.fromarray(np.rint((values - low) * scale).astype(np.uint8))


@torch.no_grad()
def _encode_batches(count: int, batch_size: int, make_batch: Callable[[int, int], torch.Tensor],
                    encode: Callable[[torch.Tensor], torch.Tensor],
                    autocast: Callable[[], ContextManager], progress: Callable | None
                    ) -> torch.Tensor:
    """L2-normalised features [count, D] (fp32, CPU) of `encode(make_batch(start, stop))`."""
    out = []
    for start in range(0, count, batch_size):
        batch = make_batch(start, min(start + batch_size, count))
        with autocast():
            features = encode(batch)
        out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        if progress:
            progress(len(batch))
    return torch.cat(out)


def _image_or_blank(entry: tuple, index: int, unreadable: dict[int, str] | None) -> Image.Image:
    """The image of (path, box); a file PIL cannot read becomes a blank image and is recorded in
    `unreadable` (index -> path), so the caller drops its item like one with a missing image."""
    if unreadable is None:
        return _load_image(*entry)
    try:
        return _load_image(*entry)
    except IMAGE_ERRORS:
        unreadable[index] = entry[0]
        return Image.new("RGB", (32, 32))


def encode_images(model: torch.nn.Module, preprocess: Callable, images: Sequence[tuple],
                  device: torch.device | str, batch_size: int, autocast: Callable[[], ContextManager],
                  progress: Callable | None = None, input_dtype: torch.dtype | None = None,
                  unreadable: dict[int, str] | None = None) -> torch.Tensor:
    """L2-normalised image features [N, D] (fp32) of (path, box) entries, in batches.

    `input_dtype` casts the images like OpenCLIP's own evaluation (`get_input_dtype`), which
    models trained with pure_bf16 / fp16 precision need. With `unreadable` (a dict), a
    corrupt image does not raise: its index and path are added and its row is meaningless.
    """
    def make_batch(start: int, stop: int) -> torch.Tensor:
        return torch.stack([preprocess(_image_or_blank(images[i], i, unreadable))
                            for i in range(start, stop)]).to(device, input_dtype)

    return _encode_batches(len(images), batch_size, make_batch, model.encode_image, autocast,
                           progress)


def encode_texts(model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str],
                 device: torch.device | str, batch_size: int, autocast: Callable[[], ContextManager],
                 progress: Callable | None = None) -> torch.Tensor:
    """L2-normalised text features [N, D] (fp32), in batches."""
    def make_batch(start: int, stop: int) -> torch.Tensor:
        return tokenizer(list(texts[start:stop])).to(device)

    return _encode_batches(len(texts), batch_size, make_batch, model.encode_text, autocast,
                           progress)


def encode_choice_set(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                      choice_set: ChoiceSet, device: torch.device | str, batch_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features [N, D], option features [N, C, D]: each item's caption, then its negatives)
    of a loaded choice set, for diagnostics that look at items one by one (fp32, no autocast)."""
    items = choice_set.items
    images = encode_images(model, preprocess, [(path, box) for path, box, _ in items], device,
                           batch_size, contextlib.nullcontext)
    options = encode_texts(model, tokenizer, [text for *_, texts in items for text in texts], device,
                           batch_size, contextlib.nullcontext)
    return images, options.view(len(items), len(items[0][2]), -1)


class EvaluationStopped(Exception):
    """`evaluate_sets` ended early because its `stop()` said so."""


def evaluate_sets(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                  choice_sets: Sequence[ChoiceSet], pair_sets: Sequence[PairSet] = (),
                  retrieval: RetrievalSet | None = None, device: torch.device | str = "cpu",
                  batch_size: int = 256, autocast: Callable[[], ContextManager] | None = None,
                  show_progress: bool = False, input_dtype: torch.dtype | None = None,
                  stop: Callable[[], bool] | None = None) -> dict[str, dict[str, float]]:
    """{set name: {metric: value, "n": items scored, "skipped": items with a missing or
    unreadable image or an empty box}} for loaded sets. A corrupt image is skipped and counted, never raised;
    a set with no item left raises a ValueError naming it. `stop() -> True` ends it after the
    batch in flight with `EvaluationStopped` (in training: a stop signal, which must not wait
    for a long evaluation before the epoch's checkpoint)."""
    from tqdm import tqdm

    autocast = autocast or contextlib.nullcontext
    model = getattr(model, "module", model)  # DDP
    was_training = model.training
    model.eval()
    total = sum(len(s.items) * (1 + len(s.items[0][2])) for s in choice_sets)
    total += sum(len(s.items) * 4 for s in pair_sets)
    total += sum(1 + len(captions) for _, captions in retrieval.items) if retrieval else 0
    bar = tqdm(total=total, desc="eval", unit="enc", disable=not show_progress)

    def progress(encoded: int) -> None:
        bar.update(encoded)
        if stop is not None and stop():
            raise EvaluationStopped

    encode = dict(device=device, batch_size=batch_size, autocast=autocast, progress=progress)
    results: dict[str, dict[str, float]] = {}
    unreadable: dict[str, dict[int, str]] = {}
    try:
        for s in choice_sets:
            bad = unreadable.setdefault(s.name, {})
            images = encode_images(model, preprocess, [(p, b) for p, b, _ in s.items],
                                   input_dtype=input_dtype, unreadable=bad, **encode)
            options = len(s.items[0][2])
            texts = encode_texts(model, tokenizer, [c for *_, caps in s.items for c in caps],
                                 **encode).view(len(s.items), options, -1)
            keep = _kept(s.path or s.name, len(s.items), bad, per_item=1)
            correct = choice_correct(images[keep], texts[keep])
            results[s.name] = {**_choice_metrics(s, correct, keep), "n": len(keep),
                               "skipped": s.skipped + len(bad), "options": options}
        for s in pair_sets:
            bad = unreadable.setdefault(s.name, {})
            images = encode_images(model, preprocess,
                                   [(p, None) for i0, i1, *_ in s.items for p in (i0, i1)],
                                   input_dtype=input_dtype, unreadable=bad,
                                   **encode).view(len(s.items), 2, -1)
            texts = encode_texts(model, tokenizer, [c for *_, c0, c1 in s.items for c in (c0, c1)],
                                 **encode).view(len(s.items), 2, -1)
            keep = _kept(s.path or s.name, len(s.items), bad, per_item=2)
            scores = torch.einsum("nid,njd->nij", texts[keep], images[keep])
            results[s.name] = {**pair_scores(scores), "n": len(keep),
                               "skipped": s.skipped + len(s.items) - len(keep)}
        if retrieval:
            bad = unreadable.setdefault("retrieval", {})
            images = encode_images(model, preprocess, [(p, None) for p, _ in retrieval.items],
                                   input_dtype=input_dtype, unreadable=bad, **encode)
            texts = encode_texts(model, tokenizer, [c for _, caps in retrieval.items for c in caps],
                                 **encode)
            keep = _kept(retrieval.path, len(retrieval.items), bad, per_item=1)
            owner = torch.tensor([i for i, (_, caps) in enumerate(retrieval.items) for _ in caps])
            new_index = torch.full((len(retrieval.items),), -1, dtype=torch.long)
            new_index[keep] = torch.arange(len(keep))
            kept_texts = new_index[owner] >= 0
            results["retrieval"] = {**retrieval_recall(images[keep], texts[kept_texts],
                                                       text_image=new_index[owner][kept_texts]),
                                    "n": len(keep), "skipped": retrieval.skipped + len(bad)}
    finally:
        bar.close()
        model.train(was_training)
    empty_boxes = {s.name: s.empty_boxes for s in choice_sets}
    for name, metrics in results.items():
        if metrics["skipped"]:
            bad = unreadable.get(name, {})
            detail = (f"; {len(bad)} unreadable image(s), e.g. {next(iter(bad.values()))}"
                      if bad else "")
            boxes = empty_boxes.get(name, 0)
            detail += f"; {boxes} with a box under a pixel" if boxes else ""
            logging.warning(f"eval: {name}: skipped {metrics['skipped']} item(s) with a missing "
                            f"or unreadable image or an empty box{detail}; scored {metrics['n']}")
    return results


def _choice_metrics(s: ChoiceSet, correct: torch.Tensor, keep: list[int]) -> dict[str, float]:
    """A choice set's accuracy: per item, or for an ARO set ARO's macro accuracy (`acc`) beside
    the per-item one (`item_acc`) and the number of groups averaged."""
    accuracy = correct.float().mean().item()
    if s.groups is None:
        return {"acc": accuracy}
    macro = aro_macro_accuracy(correct, [s.groups[i] for i in keep], s.group_kind)
    if macro is None:
        logging.warning(f"eval set {s.path}: no {s.group_kind} group qualifies for ARO's macro "
                        f"accuracy (relations outside ARO's symmetric list; attribute pairs with "
                        f"{ARO_MIN_ATTRIBUTE_ITEMS}+ items); its acc is the per-item accuracy")
        return {"acc": accuracy}
    return {"acc": macro[0], "item_acc": accuracy, "groups_averaged": macro[1]}


def _kept(path: str, count: int, unreadable: dict[int, str], per_item: int) -> list[int]:
    """Items (of `count`, each with `per_item` images in order) whose images all loaded; none
    raises, naming the set at `path`: the mean of no scores is NaN, not an accuracy."""
    dropped = {index // per_item for index in unreadable}
    kept = [i for i in range(count) if i not in dropped]
    if not kept:
        raise _undecodable(path, count, next(iter(unreadable.values())))
    return kept


def _undecodable(path: str, count: int, example: str) -> ValueError:
    return ValueError(f"{path}: none of its {count} items has images that can be decoded (e.g. "
                      f"{example}); fix or replace the images")


def flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"compositional/{set}/{metric}" or "retrieval/{metric}": value}, without the counts."""
    flat = {}
    for name, metrics in results.items():
        prefix = "retrieval" if name == "retrieval" else f"compositional/{name}"
        flat.update({f"{prefix}/{k}": v for k, v in metrics.items() if k not in COUNT_KEYS})
    return flat


def evaluate_compositional(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                           root: str, device: torch.device | str = "cpu", batch_size: int = 256,
                           autocast: Callable[[], ContextManager] | None = None,
                           input_dtype: torch.dtype | None = None,
                           stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """The in-loop evaluation: every set in `root` (and `root/retrieval` when present).

    Returns flat metric names ready for OpenCLIP's logging, e.g.
    "compositional/replace_relation/acc", "compositional/relation_pairs/group",
    "retrieval/image_to_text_R@1". Restores the model's train/eval mode. `stop`: as in
    `evaluate_sets`.
    """
    choice_sets, pair_sets = discover_sets(root)
    retrieval = retrieval_beside(root)
    return flatten(evaluate_sets(model, preprocess, tokenizer, choice_sets, pair_sets, retrieval,
                                 device, batch_size, autocast, input_dtype=input_dtype, stop=stop))


# ----------------------------------------------------------------------------- models

def log_metrics(metrics: dict[str, float], epoch: int, *, results_dir: str | None = None,
                tb_writer=None, use_wandb: bool = False, step: int | None = None) -> None:
    """Log in-loop evaluation metrics where OpenCLIP logs its own: the console, `results.jsonl`
    in `results_dir` (OpenCLIP's checkpoint folder, with --save-logs), tensorboard (at the
    epoch, as OpenCLIP's val/ metrics), wandb (at `step`, the run's optimizer steps so far, as
    OpenCLIP's evaluation logs there: without it wandb put them on the last training step)."""
    logging.info(f"Eval Epoch: {epoch} " + "\t".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    if results_dir is not None:
        with open(os.path.join(results_dir, "results.jsonl"), "a+") as f:
            f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
        if tb_writer is not None:
            for name, value in metrics.items():
                tb_writer.add_scalar(f"val/{name}", value, epoch)
    if use_wandb:
        import wandb

        wandb.log({f"val/{name}": value for name, value in metrics.items()} | {"epoch": epoch}, step=step)


def _unloadable(path: str, err: BaseException) -> ValueError:
    return ValueError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: "
                      f"{str(err)[:300]}); is it complete (not cut by an interrupted write) and "
                      "an OpenCLIP checkpoint?")


def _looks_like_path(pretrained: str | None) -> bool:
    """A checkpoint file rather than a pretrained tag: an existing file, or a name written as
    a path or with a checkpoint's ending."""
    return bool(pretrained) and (os.path.isfile(pretrained) or os.path.sep in pretrained
                                 or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))


def check_model(name: str, pretrained: str | None, model_configs: Sequence[str] = ()) -> None:
    """What `load_model` checks before loading: the model name, a checkpoint path, a pretrained
    tag. Cheap, so a command checks every model it will load before it scores anything; a
    mistyped tag would otherwise be open_clip's bare RuntimeError, raised once loading began."""
    import open_clip

    for config in model_configs:
        if not os.path.isfile(config):
            raise FileNotFoundError(f"--model-config {config} does not exist")
        open_clip.add_model_config(config)
    if name not in open_clip.list_models():
        raise ValueError(f"--model {name!r} is not an OpenCLIP model; {unknown_model_hint(name)}")
    if not pretrained or os.path.isfile(pretrained):
        return
    if _looks_like_path(pretrained):
        raise FileNotFoundError(f"checkpoint {pretrained} does not exist")
    if not open_clip.get_pretrained_cfg(name, pretrained):  # open_clip's test: a tag, else a file
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ValueError(f"--pretrained {pretrained!r} is neither a pretrained tag of --model "
                         f"{name} (its tags: {tags}) nor a checkpoint file; pass one of those")


def open_checkpoint(path: str) -> Any:
    """A checkpoint file's contents without reading its tensors, opened as OpenCLIP will load it
    (weights only; memory-mapped), so a damaged file among several stops the command before the
    first is scored; a safetensors or big_vision (.npz) file's header or zip directory only
    (contents: {}). ValueError names the file."""
    suffix = os.path.splitext(path)[1]
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt"):
                return {}
        if suffix == ".npz":
            zipfile.ZipFile(path).close()
            return {}
        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path),
                          weights_only=True)
    except Exception as err:  # a truncated or foreign file fails anywhere inside the readers
        raise _unloadable(path, err) from None


def fetch_pretrained(name: str, pretrained: str | None) -> None:
    """Download (or find in the cache) the weights of a pretrained tag now, before anything is
    scored: offline, an uncached tag otherwise failed with open_clip's traceback after the
    checkpoints before it had been evaluated. A checkpoint file or no weights: nothing to do."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    if not pretrained or _looks_like_path(pretrained):
        return
    try:
        download_pretrained(get_pretrained_cfg(name, pretrained))
    except (OSError, RuntimeError) as err:  # no network and no cached copy, or a bad download
        raise ValueError(f"--pretrained {pretrained!r} of --model {name}: its weights cannot be "
                         f"fetched ({str(err).splitlines()[0]}); connect to the internet once to "
                         "cache them, or pass a checkpoint file") from None


def load_model(name: str, pretrained: str | None, device: torch.device | str = "cpu",
               model_configs: Sequence[str] = ()):
    """(model, preprocess, tokenizer) for an OpenCLIP model name and checkpoint or pretrained tag.

    Plugin checkpoints are plain OpenCLIP checkpoints, so both load the same way; a checkpoint
    of another architecture raises a ValueError naming both, and a bad name, path or tag one
    naming the flag (`check_model`).
    """
    import open_clip

    check_model(name, pretrained, model_configs)
    looks_like_path = _looks_like_path(pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device)
    except (RuntimeError, AssertionError) as err:
        # load_state_dict's mismatch, or resize_pos_embed's assertion ("text pos_embed width
        # changed!"): weights of another architecture, not a damaged file
        if isinstance(err, AssertionError) or any(
                text in str(err) for text in ("size mismatch", "Missing key", "Unexpected key")):
            detail = str(err) if len(str(err)) <= 600 else str(err)[:600] + " ..."
            raise ValueError(f"checkpoint {pretrained} does not fit model {name!r} (another "
                             f"architecture?); pass the --model it was trained with.\n{detail}") from None
        if not looks_like_path:
            raise
        raise _unloadable(pretrained, err) from None
    except Exception as err:  # a truncated or foreign file fails anywhere inside torch.load
        if not looks_like_path:
            raise
        raise _unloadable(pretrained, err) from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def add_labelled_checkpoints(parser: argparse.ArgumentParser) -> None:
    """The LABEL=CHECKPOINT positionals of the diagnostic scripts in benchmarks/."""
    parser.add_argument("checkpoints", nargs="+", metavar="LABEL=CHECKPOINT",
                        help="Checkpoints to compare, each with the label its column gets.")


def labelled_checkpoints(parser: argparse.ArgumentParser, values: Sequence[str]) -> dict[str, str]:
    """{label: path} of LABEL=CHECKPOINT values; a value without a label, or a repeated label,
    stops with the usage."""
    runs = dict(v.split("=", 1) for v in values if "=" in v)
    if len(runs) != len(values):
        parser.error("give checkpoints as LABEL=PATH, each with its own label")
    return runs


def trained_as_problems(models: Sequence[str], checkpoints: Sequence[str],
                        model_configs: Sequence[str] = ()) -> list[str]:
    """Checkpoints whose record (provenance.py) names another model than the --model given.

    Runs before any model is built or set is read, so a wrong --model stops in a second.
    """
    import open_clip

    for config in model_configs:
        if os.path.isfile(config):
            open_clip.add_model_config(config)
    problems = []
    for model, checkpoint in zip(models, checkpoints):
        record = read_record(checkpoint) if os.path.isfile(checkpoint) else None
        problem = record and model_mismatch(record, model, open_clip.get_model_config(model))
        if problem:
            problems.append(f"checkpoint {checkpoint}: {problem}")
    return problems


# ----------------------------------------------------------------------------- reporting

def metric_rows(runs: Sequence[dict[str, dict[str, float]]]) -> list[tuple[str, str]]:
    """(set, metric) rows in first-seen order across runs, without the counts."""
    rows: dict[tuple[str, str], None] = {}
    for results in runs:
        for name, metrics in results.items():
            rows.update({(name, k): None for k in metrics if k not in COUNT_KEYS})
    return list(rows)


def percent(value: float, decimals: int = 1) -> Decimal:
    """A fraction in percent, halves rounded up as papers print them and as SugarCrepe's table
    does (formats.py): 0.5625 is 56.3, where Python's format of the binary value gives 56.2."""
    return Decimal(repr(100 * value)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def format_table(labels: Sequence[str], runs: Sequence[dict[str, dict[str, float]]]) -> str:
    """A text table: one row per (set, metric), one column per run, then Δ vs the first run.

    Δ is the difference of the printed values, so each row reads as its own subtraction (the
    JSON document's `differences_vs_first` keep the unrounded ones)."""
    rows = metric_rows(runs)
    header = ["set", "metric", *labels] + [f"Δ {label}" for label in labels[1:]]
    body = []
    for name, metric in rows:
        values = [r.get(name, {}).get(metric) for r in runs]
        shown = [None if v is None else percent(v) for v in values]
        cells = ["-" if v is None else str(v) for v in shown]
        base = shown[0]
        cells += ["-" if v is None or base is None else f"{v - base:+}" for v in shown[1:]]
        body.append([name, metric, *cells])
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body)])


def format_tables(table: str, labels: Sequence[str], runs: Sequence[dict[str, dict[str, float]]]
                  ) -> str:
    """What the console shows for `--table`: the sets table, or SugarCrepe's table followed by
    the sets table of every set it has no row for (pair sets, retrieval, other choice sets), so
    no result is only in --output."""
    if table == "sets":
        return format_table(labels, runs)
    rest = [{name: metrics for name, metrics in r.items() if name not in SUGARCREPE_SPLITS}
            for r in runs]
    tables = [format_sugarcrepe_table(labels, runs)]
    if any(rest):
        tables.append(format_table(labels, rest))
    return "\n\n".join(tables)


def chance_level(metrics: dict[str, float], metric: str) -> float | None:
    """A random scorer's expected `metric` on a set with these results; None where it depends
    on the set's size (retrieval). Results written before `options` was recorded count as 2-way."""
    if metric in PAIR_CHANCE:
        return PAIR_CHANCE[metric]
    if metric in ("acc", "item_acc"):
        return 1 / metrics.get("options", 2)
    return None


def plot_results(path: str, labels: Sequence[str], runs: Sequence[dict[str, dict[str, float]]],
                 title: str = "Compositional evaluation") -> None:
    """Grouped bar plot (one bar per run) of every metric, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metric_rows(runs)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.2))
    for i, (label, results) in enumerate(zip(labels, runs)):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(rows))]
        values = [results.get(n, {}).get(m) for n, m in rows]
        heights = [float("nan") if v is None else 100 * v for v in values]
        bars = ax.bar(xs, heights, width, label=label)
        ax.bar_label(bars, labels=["" if v is None else str(percent(v, 0)) for v in values],
                     fontsize=7)
    for j, (name, metric) in enumerate(rows):
        chance = chance_level(next(r[name] for r in runs if name in r), metric)
        if chance is not None:
            ax.hlines(100 * chance, j - 0.45, j + 0.45, colors="gray", linestyles="dotted", linewidth=1)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{n}\n{m}" for n, m in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("score (%)  ·  dotted: chance")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, dpi=130, format="png")
    finally:
        plt.close(fig)


def report(labels: Sequence[str], runs: Sequence[dict[str, dict[str, float]]],
           meta: Sequence[dict] | None = None) -> dict:
    """The JSON document: each run's results, and differences to the first run."""
    meta = meta or [{} for _ in runs]
    document = {"runs": [{"label": label, **m, "results": r}
                         for label, m, r in zip(labels, meta, runs)]}
    if len(runs) > 1:
        document["differences_vs_first"] = {
            label: {f"{n}/{k}": r[n][k] - runs[0][n][k] for n, k in metric_rows(runs)
                    if n in r and k in r[n] and n in runs[0] and k in runs[0][n]}
            for label, r in zip(labels[1:], runs[1:])}
    return document


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_hn.eval",
        description="Score OpenCLIP checkpoints on compositional sets (SugarCrepe, ARO, "
                    "Winoground-style pairs) and image-text retrieval; with several "
                    "checkpoints, print them side by side with differences.")
    parser.add_argument("--model", nargs="+", required=True,
                        help="OpenCLIP model name(s): one for all checkpoints, or one each.")
    parser.add_argument("--model-config", nargs="*", default=[], metavar="CFG.json",
                        help="Model config file(s) to register first (custom or tiny models).")
    parser.add_argument("--pretrained", nargs="+", required=True,
                        help="Checkpoint path(s) or OpenCLIP pretrained tag(s).")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="Column names, one per checkpoint. Default: file names.")
    parser.add_argument("--compositional", required=True, metavar="DIR",
                        help="Folder of sets: *.json (SugarCrepe or ARO layout, images in "
                             "DIR/images) and *.jsonl (Winoground-style image pairs).")
    parser.add_argument("--retrieval", default=None, metavar="DIR",
                        help="Folder of KEY.png + KEY.txt pairs (one caption per line) for "
                             "R@1/R@5 both ways, or none (a folder named none: ./none). Default: "
                             "--compositional's retrieval/ subfolder when it has one (as the "
                             "in-loop evaluation reads it).")
    parser.add_argument("--output", default=None, metavar="results.json|DIR",
                        help="JSON output: a file with --format json, a folder with --format "
                             "clip_benchmark.")
    parser.add_argument("--format", default="json", choices=("json", "clip_benchmark"),
                        help="json: one document with every run and the differences (--output "
                             "FILE); clip_benchmark: one CLIP_benchmark-compatible JSON per "
                             "checkpoint and set, in the folder --output DIR. Default: json.")
    parser.add_argument("--table", default="sets", choices=("sets", "sugarcrepe"),
                        help="sets: one row per set and metric with differences to the first "
                             "run; sugarcrepe: SugarCrepe's Replace/Swap/Add splits beside "
                             "vl_compo's published ViT-B/32 baselines. Default: sets.")
    parser.add_argument("--allow-model-mismatch", action="store_true",
                        help="Evaluate even when a checkpoint's record (CHECKPOINT.json, written "
                             "by runs with --hn-* flags) names another --model; warn instead.")
    parser.add_argument("--plot", default=None, metavar="results.png", help="Bar plot output.")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="Default: 256.")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Default: cuda when available, else cpu.")
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except (ValueError, OSError) as err:  # bad sets, checkpoints or paths: named in the message
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    if len(args.model) not in (1, len(args.pretrained)):
        parser.error(f"give one --model or one per --pretrained ({len(args.pretrained)})")
    if args.labels and len(args.labels) != len(args.pretrained):
        parser.error(f"give one --labels entry per --pretrained ({len(args.pretrained)})")
    models = args.model * len(args.pretrained) if len(args.model) == 1 else args.model
    labels = args.labels or [os.path.basename(p) for p in args.pretrained]
    if len({file_slug(label) for label in labels}) < len(labels):  # also one file name each
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    if args.retrieval == "none":
        args.retrieval = None
    elif args.retrieval is None:  # as the in-loop evaluation reads the folder
        args.retrieval = retrieval_folder(args.compositional)
    if args.format == "clip_benchmark" and not args.output:
        parser.error("--format clip_benchmark writes one file per checkpoint and set: give the "
                     "folder as --output DIR")
    for problem in trained_as_problems(models, args.pretrained, args.model_config):
        if not args.allow_model_mismatch:
            parser.error(f"{problem}; pass the --model it was trained as (or "
                         "--allow-model-mismatch to evaluate anyway)")
        logging.warning("eval: %s (evaluating anyway: --allow-model-mismatch)", problem)
    for name, pretrained in zip(models, args.pretrained):  # a typo in the last before scoring the first
        check_model(name, pretrained, args.model_config)
    for name, pretrained in zip(models, args.pretrained):  # then the downloads, once all are named right
        fetch_pretrained(name, pretrained)

    if args.output and args.output == args.plot:
        parser.error(f"--output and --plot name the same file {args.output}")
    inputs = [*args.pretrained, *args.model_config]
    for folder in (args.compositional, args.retrieval):
        if folder and os.path.isdir(folder):
            inputs += [os.path.join(folder, n) for n in os.listdir(folder)]
    clash = overwritten_input([args.output, args.plot], inputs)
    if clash:
        parser.error(f"output {clash} is one of the inputs; write the results elsewhere")
    for flag, path in (("--output", args.output), ("--plot", args.plot)):
        for folder in (args.compositional, args.retrieval):
            if path and folder and _inside(path, folder):  # read as a set by the next evaluation
                parser.error(f"{flag} {path} is inside the evaluation folder {folder}; write it "
                             "elsewhere")
    folder_output = args.format == "clip_benchmark"  # --output is then a folder of files
    outputs = (("--output", args.output, "results.json"), ("--plot", args.plot, "results.png"))
    for flag, path, example in outputs:
        problem = writable_output(path)  # before any model is loaded and scored
        if problem:
            parser.error(f"{flag} {path}: cannot be written ({problem}); pass a path in a folder you can write")
        if path and os.path.isdir(path) and not (folder_output and flag == "--output"):
            parser.error(f"{flag} {path} is a folder; pass a file name (e.g. {os.path.join(path, example)})")
    if folder_output and os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(f"--output {args.output} is a file; --format clip_benchmark writes a folder of "
                     "files: pass a folder (made when missing)")
    choice_sets, pair_sets = discover_sets(args.compositional)
    if args.table == "sugarcrepe" and not any(s.name in SUGARCREPE_SPLITS for s in choice_sets):
        parser.error(f"--table sugarcrepe: {args.compositional} has no SugarCrepe split; it needs "
                     f"sets named after SugarCrepe's files ({', '.join(SUGARCREPE_SPLITS)}.json)")
    for pretrained in args.pretrained:  # a damaged last checkpoint before the first is scored
        if os.path.isfile(pretrained):
            open_checkpoint(pretrained)
    retrieval = load_retrieval_set(args.retrieval) if args.retrieval else None
    check_sets(choice_sets, pair_sets, retrieval)  # unreadable sets fail before any model loads
    runs = []
    for name, pretrained in zip(models, args.pretrained):
        model, preprocess, tokenizer = load_model(name, pretrained, args.device, args.model_config)
        print(f"evaluating {name} @ {pretrained} on {args.device}")
        runs.append(evaluate_sets(model, preprocess, tokenizer, choice_sets, pair_sets, retrieval,
                                  args.device, args.batch_size, show_progress=True))
    print(format_tables(args.table, labels, runs))
    document = report(labels, runs, [{"model": m, "pretrained": p}
                                     for m, p in zip(models, args.pretrained)])
    if args.output and args.format == "clip_benchmark":
        retrieval_name = os.path.basename(os.path.normpath(args.retrieval or "retrieval"))
        for name, pretrained, label, results in zip(models, args.pretrained, labels, runs):
            for file_name, record in clip_benchmark_records(name, pretrained, label, results,
                                                            retrieval_name):
                atomic_write_json(os.path.join(args.output, file_name), record)
        print(f"wrote CLIP_benchmark JSON files to {args.output}")
    elif args.output:
        atomic_write_json(args.output, document, indent=2)
        print(f"wrote {args.output}")
    if args.plot:
        plot_results(args.plot, labels, runs)
        print(f"wrote {args.plot}")
    return document


def cli() -> None:
    """`python -m open_clip_hn.eval`: Ctrl-C ends with one line, not a traceback (the outputs are
    written whole at the end, so an interrupted run left none)."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: no --output or --plot was written (they are written whole once every "
              "checkpoint is scored); rerun the command", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
