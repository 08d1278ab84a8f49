"""Where the demo's shape errors lie: swap-object and replace-object accuracy per shape pair.

The compositional sets score a whole type at once; this splits the two shape types by which
shapes are involved, for each checkpoint side by side, to tell a shape the tiny model cannot see
from a binding it does not learn.

    python benchmarks/shape_errors.py --sets demo/data/test \\
        pretrain=demo/runs/pretrain/checkpoints/epoch_1.pt \\
        vanilla=demo/runs/vanilla/checkpoints/epoch_3.pt \\
        hard-negatives=demo/runs/hard-negatives/checkpoints/epoch_3.pt
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from contextlib import nullcontext

import torch

from open_clip_hn import demo
from open_clip_hn import eval as hn_eval
from open_clip_hn import scenes


def shape_group(kind: str, caption: str, negative: str) -> str:
    """swap_objects: the two shapes ("cube+sphere"); replace_object: shown -> named shape."""
    shown, named = scenes.parse_caption(caption), scenes.parse_caption(negative)
    if kind == "swap_objects":
        return "+".join(sorted((shown.subject.shape, shown.reference.shape)))
    changed = [(a.shape, b.shape) for a, b in ((shown.subject, named.subject),
                                               (shown.reference, named.reference)) if a.shape != b.shape]
    return " -> ".join(changed[0])


KINDS = ("swap_objects", "replace_object")


def correct_per_item(checkpoint: str, choice_sets: dict[str, hn_eval.ChoiceSet], device: str,
                     model_config: str) -> dict[str, torch.Tensor]:
    """{kind: bool [items]}: which items the checkpoint gets right (the model is loaded once)."""
    model, preprocess, tokenizer = hn_eval.load_model(demo.model_name(model_config), checkpoint,
                                                      device, [model_config])
    correct = {}
    for kind, choice_set in choice_sets.items():
        items = choice_set.items
        images = hn_eval.encode_images(model, preprocess, [(path, box) for path, box, _ in items],
                                       device, 500, nullcontext)
        texts = hn_eval.encode_texts(model, tokenizer, [t for _, _, pair in items for t in pair],
                                     device, 500, nullcontext)
        correct[kind] = hn_eval.choice_correct(images, texts.view(len(items), 2, -1))
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", required=True, help="A folder of the demo's compositional sets.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-config", default=demo.MODEL_CONFIG,
                        help="The checkpoints' model config. Default: the demo's.")
    hn_eval.add_labelled_checkpoints(parser)
    args = parser.parse_args()
    runs = hn_eval.labelled_checkpoints(parser, args.checkpoints)
    choice_sets = {kind: hn_eval.load_choice_set(os.path.join(args.sets, f"{kind}.json"))
                   for kind in KINDS}
    correct = {label: correct_per_item(path, choice_sets, args.device, args.model_config)
               for label, path in runs.items()}
    for kind, choice_set in choice_sets.items():
        groups = [shape_group(kind, *pair) for _, _, pair in choice_set.items]
        rows: dict[str, list[int]] = defaultdict(list)
        for i, group in enumerate(groups):
            rows[group].append(i)
        print(f"\n== {kind} ({len(groups)} items): accuracy per shape group ==")
        print(f"{'shapes':22s} {'items':>5s} " + " ".join(f"{label[:14]:>14s}" for label in runs))
        for group in sorted(rows) + ["all"]:
            index = torch.tensor(rows[group] if group != "all" else range(len(groups)))
            print(f"{group:22s} {len(index):5d} " + " ".join(
                f"{correct[label][kind][index].float().mean().item():14.3f}" for label in runs))


if __name__ == "__main__":
    main()
