"""Which tower keeps the mirror term at chance? Flip sensitivity of each tower, per checkpoint.

The mirror term (`--hn-mirror`) gets a gradient only as far as the image tower tells an image from
its flip *and* the text tower tells a caption from its mirrored caption: its loss sits at ln 2
per choice while either is blind. For the items of a compositional set whose caption names a
left/right or above/below relation (e.g. a `replace_relation.json`), this prints, per checkpoint,
the mean cosine between each image and its flip, between each caption and its mirrored caption,
and the share of the mirror term's two-way choices the model wins (what training logs as
`Hn_mirror_acc`). A cosine near 1 on one side is the tower to look at.

    python benchmarks/mirror_probe.py --set recipe-worlds/data-world2/test/replace_relation.json \\
        --model-config open_clip_hn/model_configs/hn-vit4-64.json \\
        pretrained=recipe-worlds/runs/world2-vit/pretrain/checkpoints/epoch_1.pt
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from open_clip_hn import demo
from open_clip_hn import eval as hn_eval
from open_clip_hn.losses import mirror_choice_accuracy
from open_clip_hn.mirror import AXIS_TO_ID, MIRROR_AXES, flip_images, mirror_caption


@torch.no_grad()
def flip_sensitivity(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                     items: Sequence[tuple[str, tuple | None, str]], device: str = "cpu",
                     batch_size: int = 250) -> dict[str, float]:
    """Over (image path, box, caption) items whose caption names a relation along an axis:
    mean cos(image, its flip), mean cos(caption, its mirrored caption), mirror choices won."""
    mirrored = [(path, box, caption, *found) for path, box, caption in items
                if (found := mirror_caption(caption, MIRROR_AXES)) is not None]
    if not mirrored:
        raise ValueError("no item's caption names a left/right or above/below relation; give a set "
                         "of relation captions, e.g. replace_relation.json")
    image, flipped, text, mirror_text = [], [], [], []
    for start in range(0, len(mirrored), batch_size):
        chunk = mirrored[start:start + batch_size]
        pixels = torch.stack([preprocess(hn_eval._load_image(path, box)) for path, box, *_ in chunk])
        axes = torch.tensor([AXIS_TO_ID[axis] for *_, axis in chunk])
        for out, batch in ((image, pixels), (flipped, flip_images(pixels, axes))):
            out.append(F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu())
        for out, texts in ((text, [c for _, _, c, _, _ in chunk]), (mirror_text, [m for *_, m, _ in chunk])):
            out.append(F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1).cpu())
    image, flipped, text, mirror_text = (torch.cat(x) for x in (image, flipped, text, mirror_text))
    every = torch.ones(len(mirrored), dtype=torch.bool)
    return {"pairs": float(len(mirrored)),
            "image_flip_cos": (image * flipped).sum(-1).mean().item(),
            "caption_mirror_cos": (text * mirror_text).sum(-1).mean().item(),
            "mirror_acc": mirror_choice_accuracy(image, text, flipped, mirror_text, every).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", required=True,
                        help="A SugarCrepe-layout choice set of relation captions (replace_relation.json).")
    parser.add_argument("--model-config", default=demo.MODEL_CONFIG,
                        help="The checkpoints' model config. Default: the demo's.")
    parser.add_argument("--items", type=int, default=1000, help="At most this many items. Default: 1000.")
    parser.add_argument("--device", default="cpu")
    hn_eval.add_labelled_checkpoints(parser)
    args = parser.parse_args()
    runs = hn_eval.labelled_checkpoints(parser, args.checkpoints)
    choice_set = hn_eval.load_choice_set(args.set)
    items = [(path, box, options[0]) for path, box, options in choice_set.items[:args.items]]
    print(f"{'checkpoint':24s} {'pairs':>6s} {'cos(image, flip)':>17s} {'cos(caption, mirror)':>21s} "
          f"{'mirror acc':>11s}")
    for label, path in runs.items():
        model, preprocess, tokenizer = hn_eval.load_model(demo.model_name(args.model_config), path,
                                                          args.device, [args.model_config])
        model.eval()
        r = flip_sensitivity(model, preprocess, tokenizer, items, args.device)
        print(f"{label[:24]:24s} {int(r['pairs']):6d} {r['image_flip_cos']:17.5f} "
              f"{r['caption_mirror_cos']:21.5f} {r['mirror_acc']:11.3f}")


if __name__ == "__main__":
    main()
