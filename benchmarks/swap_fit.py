"""Does a model fit its own training swaps? Image- and text-side scores of the recipe's negatives.

A swap error that does not fall can mean the negatives teach the wrong thing, or that the model
cannot learn what they teach. This scores checkpoints on training captions with the negatives
the recipe makes for them (types, K, seed, and the training captions' vocabulary and
plausibility filter, as `--hn-vocabulary train-data --hn-plausibility train-data` do), split by
what a swap does: `rebind` (the objects keep their places, attributes or nouns move between
them: what the swap test sets ask) or `reorder` (whole noun phrases trade places: a relation
negative in effect). Per checkpoint it prints the share of negatives the image rejects
(cos(image, caption) > cos(image, negative)) and the text tower's mean cos(caption, negative).
With --test-sets it also splits the swap test sets' errors by item kind (size words exchanged or
other attributes; with or without a bystander) and by whether the negative's composition was
seen in training (`negative_split`), and scores them once more with each image embedding
centred on the set's mean image: a caption-only prior (a negative pushed away from every image,
as a caption seen only as a negative could be) lies along that mean and drops out there, so a
centred error well below the plain one would point to such a prior.

    python benchmarks/swap_fit.py --train-data 'recipe-worlds/data-world2/train/shard-{00000..00015}.tar' \\
        --model-config open_clip_hn/model_configs/hn-vit4-64.json \\
        --test-sets recipe-worlds/data-world2/test \\
        vanilla=recipe-worlds/runs/world2-vit/vanilla/checkpoints/epoch_3.pt \\
        recommended=recipe-worlds/runs/world2-vit/recommended-yaml/checkpoints/epoch_3.pt
"""

from __future__ import annotations

import argparse
import io
import os
from collections import defaultdict

import torch
from PIL import Image

from open_clip_hn import demo, scenes, world2
from open_clip_hn import eval as hn_eval
from open_clip_hn.files import expand_shards
from open_clip_hn.negatives import NegativeGenerator
from open_clip_hn.negatives.generator import noun_phrases
from open_clip_hn.negatives.lexicon import load_resources
from open_clip_hn.negatives.plausibility import from_captions
from open_clip_hn.negatives.shards import shard_captions, word_counts
from open_clip_hn.neighbors import IMAGE_EXTS, read_member, scan_shard

SWAP_SETS = ("swap_attributes", "swap_objects")
NEGATIVE_SPLITS = {"train": "seen in training", "val": "held out (val)", "test": "held out (test)"}


def first_samples(shard: str, count: int) -> list[tuple[str, bytes]]:
    """(caption, image bytes) of the first `count` samples of a webdataset shard (read by offset:
    the rest of the shard is not loaded)."""
    samples = []
    for _, members in scan_shard(shard)[:count]:
        image_ext = next(ext for ext in IMAGE_EXTS if ext in members)
        samples.append((read_member(shard, *members["txt"]).decode("utf-8").strip(),
                        read_member(shard, *members[image_ext])))
    return samples


def swap_kind(generator: NegativeGenerator, caption_phrases: list[str], negative: str) -> str:
    """`reorder` when the negative holds the caption's noun phrases in another order (the
    generator's own test, as `--hn-swap-reorders drop` applies it), else `rebind`."""
    return "reorder" if generator.reorders(caption_phrases, negative) else "rebind"


def test_item_kind(name: str, caption: str, negative: str, categories: dict[str, str]) -> str:
    """swap_attributes: `size` when only size words differ, else `other attributes`;
    swap_objects: `with bystander` when the caption names more than the related pair."""
    if name == "swap_objects":
        return "with bystander" if "beside" in caption.split() else "pair only"
    changed = {w for a, b in zip(caption.split(), negative.split()) if a != b for w in (a, b)}
    return "size" if changed and all(categories.get(w.strip(",")) == "size" for w in changed) \
        else "other attributes"


def negative_split(negative: str) -> str:
    """The split (train/val/test) whose compositions hold the negative's scene, for a caption of
    the demo's world or world2; `-` for other captions. Every test item's positive is a held-out
    (test) composition, but its negative is a training composition in about 70-80% of the items:
    those a model can reject from what it saw that composition look like, while an item whose
    negative is held out too asks for binding on two unseen compositions."""
    for world in (scenes, world2):
        try:
            return world.split_of(world.parse_caption(negative).composition())
        except ValueError:
            continue
    return "-"


def centred_choice(images: torch.Tensor, options: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`choice_correct` with each image [N, D] centred on the images' mean, each item's caption
    prior <mean image, caption - negative> [N] (options [N, 2, D]), and that mean [D]. A score
    shared by every image (a caption-only prior) lies along the mean and cancels in the centred
    choice."""
    mean = images.mean(dim=0)
    return hn_eval.choice_correct(images - mean, options), (options[:, 0] - options[:, 1]) @ mean, mean


def score_training_negatives(model, preprocess, tokenizer, rows, device: str):
    """{(type, kind): (image rejects negative [n], cos(caption, negative) [n])}."""
    out: dict[tuple[str, str], list[tuple[bool, float]]] = defaultdict(list)
    with torch.no_grad():
        for caption, image, negatives in rows:
            pixels = preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None].to(device)
            image_features = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)[0]
            texts = tokenizer([caption] + [n["text"] for n in negatives]).to(device)
            text_features = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
            to_image, to_caption = text_features @ image_features, text_features[1:] @ text_features[0]
            for i, negative in enumerate(negatives):
                out[(negative["type"], negative["kind"])].append(
                    (bool(to_image[0] > to_image[i + 1]), float(to_caption[i])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-data", required=True, help="The training shards (brace or :: list).")
    parser.add_argument("--captions", type=int, default=300, help="Training samples scored (from the "
                        "first shard). Default: 300.")
    parser.add_argument("--types", default="replace_object,swap_objects,swap_attributes",
                        help="Negative types (recommended.yaml's by default).")
    parser.add_argument("--num-negatives", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-sets", default=None, help="A folder with swap_attributes.json and "
                        "swap_objects.json (SugarCrepe layout) to split by item kind.")
    parser.add_argument("--model-config", default=demo.MODEL_CONFIG)
    parser.add_argument("--device", default="cpu")
    hn_eval.add_labelled_checkpoints(parser)
    args = parser.parse_args()
    runs = hn_eval.labelled_checkpoints(parser, args.checkpoints)
    shards = expand_shards(args.train_data)
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        parser.error(f"--train-data: {missing[0]} is not a local file")

    captions = [c for shard in shards for c in shard_captions(shard, "txt")]
    generator = NegativeGenerator(types=args.types, seed=args.seed,
                                  vocabulary=frozenset(word_counts(captions)[0]),
                                  plausibility=from_captions(captions, source=args.train_data))
    rows = []
    for caption, image in first_samples(shards[0], args.captions):
        negatives, parse = generator.generate(caption, args.num_negatives), generator.parse(caption)
        caption_phrases = noun_phrases(parse) if parse else []
        for negative in negatives:
            negative["kind"] = swap_kind(generator, caption_phrases, negative["text"]) \
                if negative["type"].startswith("swap_") else "-"
        rows.append((caption, image, negatives))

    categories = load_resources().attr_category
    test_sets = {name: hn_eval.load_choice_set(os.path.join(args.test_sets, f"{name}.json"))
                 for name in SWAP_SETS} if args.test_sets else {}
    for label, path in runs.items():
        model, preprocess, tokenizer = hn_eval.load_model(demo.model_name(args.model_config), path,
                                                          args.device, [args.model_config])
        scores = score_training_negatives(model, preprocess, tokenizer, rows, args.device)
        print(f"\n== {label}: {len(rows)} training captions, the recipe's negatives ==")
        print(f"{'type':18s} {'kind':8s} {'count':>5s} {'image rejects':>14s} {'cos(caption, neg)':>18s}")
        for (kind_type, kind), values in sorted(scores.items()):
            rejects = sum(v[0] for v in values) / len(values)
            cosine = sum(v[1] for v in values) / len(values)
            print(f"{kind_type:18s} {kind:8s} {len(values):5d} {rejects:14.3f} {cosine:18.3f}")
        for name, choice_set in test_sets.items():
            items = choice_set.items
            images, options = hn_eval.encode_choice_set(model, preprocess, tokenizer, choice_set,
                                                        args.device, 256)
            correct = hn_eval.choice_correct(images, options)
            centred, prior_gap, mean_image = centred_choice(images, options)
            errors: dict[str, list[bool]] = defaultdict(list)
            by_split: dict[str, list[bool]] = defaultdict(list)
            for (_, _, pair), right in zip(items, correct.tolist()):
                errors[test_item_kind(name, *pair, categories)].append(not right)
                by_split[negative_split(pair[1])].append(not right)
            print(f"  test {name}: " + ", ".join(
                f"{kind} error {sum(v) / len(v):.3f} ({len(v)})" for kind, v in sorted(errors.items())))
            print(f"  test {name}, by the negative's composition: " + ", ".join(
                f"{NEGATIVE_SPLITS.get(kind, kind)} error {sum(v) / len(v):.3f} ({len(v)})"
                for kind, v in sorted(by_split.items())))
            print(f"  test {name}, images centred: error {1 - centred.float().mean():.3f} (plain "
                  f"{1 - correct.float().mean():.3f}); mean image norm {mean_image.norm():.3f}, "
                  f"caption prior <mean image, caption - negative> {prior_gap.mean():+.4f}")


if __name__ == "__main__":
    main()
