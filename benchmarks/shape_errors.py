"""Where a model's shape errors lie: choice-set errors and text gaps per pair of words changed.

The compositional sets score a whole type at once; this splits each by the words its negative
changes ("cube+sphere" for a swap between those shapes, "cube -> sphere" for a replacement,
"big+huge" for a size swap) and prints, per checkpoint side by side, the error and the text gap:
the mean distance |t(caption) - t(negative)| between the two unit text embeddings. An image
that cannot see a difference shows as a high error; a text tower that embeds the two words
nearly alike, so that no image can choose, as a small gap. Captions of the demo's world, world2
or any set whose negatives change one word or exchange two.

    python benchmarks/shape_errors.py --sets demo/data/test \\
        pretrain=demo/runs/pretrain/checkpoints/epoch_1.pt \\
        vanilla=demo/runs/vanilla/checkpoints/epoch_3.pt \\
        hard-negatives=demo/runs/hard-negatives/checkpoints/epoch_3.pt
    python benchmarks/shape_errors.py --sets recipe-worlds/data-world2/test \\
        --kinds swap_objects,swap_attributes,replace_object \\
        --model-config open_clip_hn/model_configs/hn-vit4-64.json \\
        vanilla=recipe-worlds/runs/world2-vit/vanilla/checkpoints/epoch_3.pt
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch

from open_clip_hn import demo
from open_clip_hn import eval as hn_eval

KINDS = ("swap_objects", "replace_object")
OTHER = "(other)"
PUNCTUATION = ".;:!?\"'"


def _words(text: str) -> list[str]:
    return [w.strip(PUNCTUATION) for w in text.lower().replace(",", " ").split()]


def word_group(caption: str, negative: str, directed: bool = True) -> str:
    """The words the negative changes: 'a+b' where it exchanges two words (a for b in one place,
    b for a in another), 'a -> b' where it replaces one ('a/b' without `directed`), `OTHER` for
    any other change. Case and punctuation are ignored."""
    words, other = _words(caption), _words(negative)
    changes = [(a, b) for a, b in zip(words, other) if a != b]
    if len(words) != len(other) or not changes:
        return OTHER
    if len(changes) == 1:
        return " -> ".join(changes[0]) if directed else "/".join(sorted(changes[0]))
    if len(changes) == 2 and changes[0] == changes[1][::-1]:
        return "+".join(sorted(changes[0]))
    return OTHER


def group_rows(groups: list[str], wrong: torch.Tensor, gaps: torch.Tensor, min_items: int
               ) -> dict[str, tuple[int, float, float]]:
    """{group: (items, error, mean text gap)} for groups of at least `min_items` items, in name
    order, then 'all'."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    rows = {group: members[group] for group in sorted(members) if len(members[group]) >= min_items}
    rows["all"] = list(range(len(groups)))
    return {group: (len(index), wrong[index].float().mean().item(), gaps[index].mean().item())
            for group, index in rows.items()}


def score_items(checkpoint: str, choice_sets: dict[str, hn_eval.ChoiceSet], device: str,
                model_config: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{kind: (wrong [items], text gap [items])} for one checkpoint (the model is loaded once)."""
    model, preprocess, tokenizer = hn_eval.load_model(demo.model_name(model_config), checkpoint,
                                                      device, [model_config])
    scored = {}
    for kind, choice_set in choice_sets.items():
        images, options = hn_eval.encode_choice_set(model, preprocess, tokenizer, choice_set, device,
                                                    500)
        scored[kind] = (~hn_eval.choice_correct(images, options),
                        (options[:, 0] - options[:, 1]).norm(dim=-1))
    return scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", required=True, help="A folder of compositional sets (SugarCrepe "
                        "layout: swap_objects.json, ...).")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"Comma list of the sets to split. Default: {','.join(KINDS)}.")
    parser.add_argument("--undirected", action="store_true",
                        help="Count a replacement a -> b with b -> a (one row 'a/b' per pair).")
    parser.add_argument("--min-items", type=int, default=15,
                        help="Leave out word groups with fewer items (they still count in 'all'). "
                             "Default: 15.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-config", default=demo.MODEL_CONFIG,
                        help="The checkpoints' model config. Default: the demo's.")
    hn_eval.add_labelled_checkpoints(parser)
    args = parser.parse_args()
    runs = hn_eval.labelled_checkpoints(parser, args.checkpoints)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if not kinds:
        parser.error(f"--kinds {args.kinds!r}: name at least one set, e.g. {','.join(KINDS)}")
    missing = [k for k in kinds if not os.path.isfile(os.path.join(args.sets, f"{k}.json"))]
    if missing:
        parser.error(f"--sets {args.sets}: no {missing[0]}.json there (--kinds names the sets "
                     "to read)")
    choice_sets = {kind: hn_eval.load_choice_set(os.path.join(args.sets, f"{kind}.json"))
                   for kind in kinds}
    scored = {label: score_items(path, choice_sets, args.device, args.model_config)
              for label, path in runs.items()}
    for kind, choice_set in choice_sets.items():
        groups = [word_group(caption, negative, directed=not args.undirected)
                  for _, _, (caption, negative) in choice_set.items]
        tables = {label: group_rows(groups, *scored[label][kind], args.min_items) for label in runs}
        print(f"\n== {kind} ({len(groups)} items): error and text gap |t(caption) - t(negative)| "
              "per words changed ==")
        print("| words | items | " + " | ".join(f"{label} error | {label} gap" for label in runs)
              + " |")
        print("| --- | ---: | " + " | ".join("---: | ---:" for _ in runs) + " |")
        for group, (count, _, _) in tables[next(iter(runs))].items():
            cells = [f"{tables[label][group][1]:.3f} | {tables[label][group][2]:.3f}" for label in runs]
            print(f"| {group} | {count} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
