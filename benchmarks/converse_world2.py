"""Issue 21 diagnosis: does a text-only converse term lift world2's mirror term off ln 2?

On world2 the text tower barely tells a caption from its mirrored caption
(`benchmarks/mirror_probe.py`: cosine 0.9998), so the mirror term's gradient into the image tower,
proportional to that difference, vanishes, and more mirror weight does not help. The converse
of "A on the left of B" is "B on the right of A": the same scene. A term that makes each caption
pick its converse over its mirrored caption (and over the mirrored caption's converse) can only
be met by a text tower that binds the relation to its two objects, which is what the mirror term
needs. The plugin's `converse` term (`--hn-converse-weight`) is this choice; this loop is the
quick way to try it and what keeps retrieval beside it (`--distill-weight`, `--converse-steps`):
OpenCLIP's ClipLoss + the plugin's `mirror_loss` and `converse_loss` (+ `distill_loss`), continuing
a pretrained world2 checkpoint on world2's shards, then scored on world2's test sets. The converse
captions come from the plugin's parser (`NegativeGenerator.exchange_related_objects`).

    python benchmarks/converse_world2.py --data recipe-worlds/data-world2 \\
        --model-config open_clip_hn/model_configs/hn-vit4-64.json \\
        --pretrained recipe-worlds/runs/world2-vit/pretrain/checkpoints/epoch_1.pt \\
        --converse-weight 1 --output converse/vit-c1.pt
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image

from open_clip_hn import demo
from open_clip_hn import eval as hn_eval
from open_clip_hn.losses import (converse_accuracy, converse_loss, distill_loss, mirror_choice_accuracy,
                                 mirror_loss)
from open_clip_hn.mirror import AXIS_TO_ID, MIRROR_AXES, converse_captions, flip_images, mirror_caption
from open_clip_hn.negatives import NegativeGenerator
from open_clip_hn.neighbors import IMAGE_EXTS, read_member, scan_shard


def shard_samples(train: str, preprocess) -> Iterator[tuple[torch.Tensor, str]]:
    """(preprocessed image, caption) of world2's training shards, in stream order."""
    for shard in sorted(glob.glob(os.path.join(train, "*.tar"))):
        for _, members in scan_shard(shard):
            image_ext = next(ext for ext in IMAGE_EXTS if ext in members)
            image = Image.open(io.BytesIO(read_member(shard, *members[image_ext]))).convert("RGB")
            yield preprocess(image), read_member(shard, *members["txt"]).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--data", required=True, help="world2's data folder (train/*.tar and test/).")
    add("--model-config", required=True, help="The checkpoint's model config (JSON).")
    add("--pretrained", required=True, help="The checkpoint to continue.")
    add("--output", required=True, help="Where the continued checkpoint is written.")
    add("--converse-weight", type=float, default=1.0, help="0 runs the control. Default: 1.")
    add("--mirror-weight", type=float, default=5.0, help="Default: 5 (the recipe's).")
    add("--converse-steps", type=int, default=None,
        help="Apply the converse term for the first N steps only (then ClipLoss + mirror keep "
             "what it broke). Default: every step.")
    add("--distill-weight", type=float, default=0.0,
        help="Weight of the plugin's distill term toward the frozen pretrained model (the "
             "ordinary batch's similarity distributions). Default: 0 (off).")
    add("--converse-margin", type=float, default=0.0,
        help="As --hn-converse-margin: a hinge with this cosine margin instead of the "
             "cross-entropy. Default: 0 (cross-entropy).")
    add("--steps", type=int, default=250, help="Default: 250.")
    add("--batch-size", type=int, default=128, help="Default: 128.")
    add("--lr", type=float, default=5e-4, help="AdamW, 15 warmup steps, then constant. Default: 5e-4.")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, preprocess, tokenizer = hn_eval.load_model(demo.model_name(args.model_config), args.pretrained,
                                                      "cpu", [args.model_config])
    teacher = None
    if args.distill_weight:
        teacher = hn_eval.load_model(demo.model_name(args.model_config), args.pretrained, "cpu",
                                     [args.model_config])[0].eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    clip, samples, n = ClipLoss(), shard_samples(os.path.join(args.data, "train"), preprocess), args.batch_size
    every, parser = torch.ones(n, dtype=torch.bool), NegativeGenerator()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 15)
        batch = [next(samples) for _ in range(n)]
        captions = [caption for _, caption in batch]
        mirrored = [mirror_caption(caption, MIRROR_AXES) for caption in captions]
        pixels = torch.stack([pixels for pixels, _ in batch])
        axes = torch.tensor([AXIS_TO_ID[axis] for _, axis in mirrored])
        mirror_captions = [caption for caption, _ in mirrored]
        converses = [converse_captions(c, m, parser) or ("", "") for c, m in zip(captions, mirrored)]
        has_converse = torch.tensor([pair != ("", "") for pair in converses])
        texts = captions + mirror_captions + [pair[0] for pair in converses] + [pair[1] for pair in converses]
        image = F.normalize(model.encode_image(torch.cat([pixels, flip_images(pixels, axes)])), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        scale = model.logit_scale.exp()
        i0, i1 = image[:n], image[n:]
        t0, t1, c0, c1 = text.split(n)
        losses = {"clip": clip(i0, t0, scale), "mirror": mirror_loss(i0, t0, i1, t1, every, scale),
                  "converse": converse_loss(t0, t1, torch.stack([c0, c1], dim=1), has_converse, scale,
                                            args.converse_margin)}
        converse_weight = args.converse_weight if step < (args.converse_steps or args.steps) else 0.0
        total = losses["clip"] + args.mirror_weight * losses["mirror"] + converse_weight * losses["converse"]
        if teacher is not None:
            with torch.no_grad():
                ti = F.normalize(teacher.encode_image(pixels), dim=-1)
                tt = F.normalize(teacher.encode_text(tokenizer(captions)), dim=-1)
            losses["distill"] = distill_loss(i0, t0, i0, t0, ti, tt, ti, tt, scale, teacher.logit_scale.exp())
            total = total + args.distill_weight * losses["distill"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if step % 10 == 0 or step == args.steps - 1:
            accuracy = mirror_choice_accuracy(i0.detach(), t0.detach(), i1.detach(), t1.detach(), every)
            converse_acc = converse_accuracy(t0.detach(), t1.detach(),
                                             torch.stack([c0, c1], dim=1).detach(), has_converse)
            print(f"{time.strftime('%H:%M:%S')} step {step} "
                  + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                  + f" mirror_acc {accuracy.item():.3f} converse_acc {converse_acc.item():.3f}"
                  + f" converse_rows {int(has_converse.sum())}/{n}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, args.output)
    result = demo.evaluate_checkpoints({"run": args.output}, {"test": os.path.join(args.data, "test")},
                                       "cpu", model_config=args.model_config)["run"]["test"]
    print({kind: round(result[kind]["acc"], 3) for kind in ("replace_relation", "swap_attributes",
                                                            "swap_objects", "replace_object")},
          "image->text R@1", round(result["retrieval"]["image_to_text_R@1"], 3))


if __name__ == "__main__":
    main()
