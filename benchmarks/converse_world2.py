"""Issue 21 diagnosis: does a text-only converse term lift world2's mirror term off ln 2?

On world2 the text tower barely tells a caption from its mirrored caption
(`benchmarks/mirror_probe.py`: cosine 0.9998), so the mirror term's gradient into the image tower,
proportional to that difference, vanishes, and more mirror weight does not help. The converse
of "A on the left of B" is "B on the right of A": the same scene. A term that makes each caption
pick its converse over its mirrored caption (and over the mirrored caption's converse) can only
be met by a text tower that binds the relation to its two objects, which is what the mirror term
needs. Not a plugin term (yet): this is its own loop, OpenCLIP's ClipLoss + the plugin's
`mirror_loss` (+ the converse choice), continuing a pretrained world2 checkpoint on world2's
shards, then scored on world2's test sets (captions of world2's grammar only).

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
import re
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image

from open_clip_hn import demo
from open_clip_hn import eval as hn_eval
from open_clip_hn.losses import mirror_choice_accuracy, mirror_loss
from open_clip_hn.mirror import AXIS_TO_ID, MIRROR_AXES, flip_images, mirror_caption
from open_clip_hn.neighbors import IMAGE_EXTS, read_member, scan_shard
from open_clip_hn.world2 import OPPOSITE, RELATIONS

_CAPTION = re.compile(r"^(there is )?(a \w+ \w+ \w+)( is)? (" + "|".join(RELATIONS) + r") (a \w+ \w+ \w+)(,.*)?$")


def converse(caption: str) -> str:
    """world2's caption with its two related objects exchanged and the relation reversed."""
    found = _CAPTION.match(caption)
    if not found:
        raise ValueError(f"not a world2 caption: {caption!r}")
    there, a, is_, relation, b, tail = found.groups()
    return f"{there or ''}{b}{is_ or ''} {OPPOSITE[relation]} {a}{tail or ''}"


def shard_samples(train: str, preprocess) -> Iterator[tuple[torch.Tensor, str]]:
    """(preprocessed image, caption) of world2's training shards, in stream order."""
    for shard in sorted(glob.glob(os.path.join(train, "*.tar"))):
        for _, members in scan_shard(shard):
            image_ext = next(ext for ext in IMAGE_EXTS if ext in members)
            image = Image.open(io.BytesIO(read_member(shard, *members[image_ext]))).convert("RGB")
            yield preprocess(image), read_member(shard, *members["txt"]).decode()


def converse_loss(text: torch.Tensor, text_converse: torch.Tensor, mirror_text: torch.Tensor,
                  mirror_converse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each caption (and each mirrored caption) picks its converse over the other scene's two."""
    def pick(anchor, positive, *negatives):
        logits = scale * torch.stack([(anchor * c).sum(-1) for c in (positive, *negatives)], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long))

    return (pick(text, text_converse, mirror_text, mirror_converse)
            + pick(mirror_text, mirror_converse, text, text_converse)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--data", required=True, help="world2's data folder (train/*.tar and test/).")
    add("--model-config", required=True, help="The checkpoint's model config (JSON).")
    add("--pretrained", required=True, help="The checkpoint to continue.")
    add("--output", required=True, help="Where the continued checkpoint is written.")
    add("--converse-weight", type=float, default=1.0, help="0 runs the control. Default: 1.")
    add("--mirror-weight", type=float, default=5.0, help="Default: 5 (the recipe's).")
    add("--steps", type=int, default=250, help="Default: 250.")
    add("--batch-size", type=int, default=128, help="Default: 128.")
    add("--lr", type=float, default=5e-4, help="AdamW, 15 warmup steps, then constant. Default: 5e-4.")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, preprocess, tokenizer = hn_eval.load_model(demo.model_name(args.model_config), args.pretrained,
                                                      "cpu", [args.model_config])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    clip, samples, n = ClipLoss(), shard_samples(os.path.join(args.data, "train"), preprocess), args.batch_size
    every = torch.ones(n, dtype=torch.bool)
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
        texts = captions + mirror_captions + [converse(c) for c in captions + mirror_captions]
        image = F.normalize(model.encode_image(torch.cat([pixels, flip_images(pixels, axes)])), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        scale = model.logit_scale.exp()
        i0, i1 = image[:n], image[n:]
        t0, t1, c0, c1 = text.split(n)
        losses = {"clip": clip(i0, t0, scale), "mirror": mirror_loss(i0, t0, i1, t1, every, scale),
                  "converse": converse_loss(t0, c0, t1, c1, scale)}
        total = losses["clip"] + args.mirror_weight * losses["mirror"] + args.converse_weight * losses["converse"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if step % 10 == 0 or step == args.steps - 1:
            accuracy = mirror_choice_accuracy(i0.detach(), t0.detach(), i1.detach(), t1.detach(), every)
            print(f"{time.strftime('%H:%M:%S')} step {step} "
                  + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                  + f" mirror_acc {accuracy.item():.3f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, args.output)
    result = demo.evaluate_checkpoints({"run": args.output}, {"test": os.path.join(args.data, "test")},
                                       "cpu", model_config=args.model_config)["run"]["test"]
    print({kind: round(result[kind]["acc"], 3) for kind in ("replace_relation", "swap_attributes",
                                                            "swap_objects", "replace_object")},
          "image->text R@1", round(result["retrieval"]["image_to_text_R@1"], 3))


if __name__ == "__main__":
    main()
