"""Train-step time of each hard-negative objective vs vanilla OpenCLIP, measured in one run.

The reference ("vanilla, same texts") runs the same model on the same batch and encodes the same
B*(1+K) texts, then applies OpenCLIP's `ClipLoss` to the positives only; so the ratio isolates the
HN machinery (gathering, masks, curriculum, extra logits, bank, mining, the distillation
teacher's no-grad forward and EMA update) from the K extra text forwards. A plain vanilla step (B texts) is printed too. Steps of all variants are interleaved
round by round so drift hits them alike; the table reports medians.

    python benchmarks/objectives.py                       # hn-tiny-vit, ~1-2 minutes on 2 CPU cores
    python benchmarks/objectives.py --model ViT-B-32 --batch-size 32 --rounds 5
    python benchmarks/objectives.py --device cuda --model ViT-B-32 --batch-size 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import open_clip
import torch
from open_clip.loss import ClipLoss

from open_clip_hn.config import HNConfig
from open_clip_hn.objective import HardNegativeLoss
from open_clip_hn.packing import PackedOutputs
from open_clip_hn.teacher import Teacher

TINY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "open_clip_hn", "model_configs", "hn-tiny-vit.json")
OBJECTIVES = {
    "itc": dict(loss=("itc",)),
    "choice": dict(loss=("itc", "choice")),
    "intra": dict(loss=("itc", "intra")),
    "rank": dict(loss=("itc", "rank")),
    "importance": dict(loss=("importance",)),
    "mined": dict(loss=("itc", "mined")),
    "all": dict(loss=("itc", "choice", "intra", "rank", "importance", "mined")),
    # the step includes the EMA teacher's forward (B images, B captions) and its update
    "distill (ema)": dict(loss=("itc", "choice"), distill="ema"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hn-tiny-vit", help="OpenCLIP model name (random weights).")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-negatives", type=int, default=4, help="K text hard negatives per caption.")
    p.add_argument("--bank-size", type=int, default=4096, help="Memory bank rows for 'mined'/'all'.")
    p.add_argument("--mined-k", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6, help="Timed steps per variant (after 2 warmup rounds).")
    p.add_argument("--loss-reps", type=int, default=30, help="Timed loss-only calls per variant.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU).")
    return p.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(model, batch: int, k: int, device: torch.device):
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    context = model.context_length if hasattr(model, "context_length") else 77
    images = torch.randn(batch, 3, *size, device=device)
    texts = torch.randint(1, 1000, (batch * (1 + k), context), device=device)
    mask = torch.rand(batch, k, device=device) > 0.2
    types = torch.randint(0, 9, (batch, k), device=device).masked_fill(~mask, -1)
    return images, texts, mask, types


def print_loss_only(args, variants, model, images, texts, mask, types, reference: float,
                    device: torch.device) -> None:
    """Loss forward+backward on fixed features: the machinery cost without the model's noise,
    as a share of the vanilla (same texts) step."""
    with torch.no_grad():
        out = model(images, texts)
    b, k = args.batch_size, args.num_negatives
    image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
    fixed_teacher = dict(teacher_image=image.flip(0), teacher_text=text[::1 + k].flip(0),
                         teacher_logit_scale=scale.detach().reshape(1).expand(b))
    timings = {}
    for name, (loss_fn, _, hn) in variants.items():
        if name == "vanilla (B texts)":
            continue
        samples = []
        for rep in range(args.loss_reps + 3):
            i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
            synchronize(device)
            start = time.perf_counter()
            if hn:
                distill = fixed_teacher if loss_fn.config.distill != "none" else {}
                losses = loss_fn(i, t, scale, PackedOutputs(mask, types, **distill), output_dict=True)
            else:
                losses = loss_fn(i, t.view(b, 1 + k, -1)[:, 0], scale, output_dict=True)
            sum(losses.values()).backward()
            synchronize(device)
            if rep >= 3:
                samples.append(time.perf_counter() - start)
        timings[name] = statistics.median(samples)
    base = timings.pop("vanilla (same texts)")
    print(f"\nloss only (forward+backward on fixed features), ClipLoss {1000 * base:.2f} ms")
    print(f"{'objective':<22}{'ms':>10}{'extra ms':>10}{'% of step':>11}")
    for name, value in timings.items():
        print(f"{name:<22}{1000 * value:>10.2f}{1000 * (value - base):>10.2f}"
              f"{100 * (value - base) / reference:>10.1f}%")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    open_clip.add_model_config(TINY_CONFIG)
    model = open_clip.create_model(args.model, device=device, output_dict=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    b, k = args.batch_size, args.num_negatives
    images, texts, mask, types = make_batch(model, b, k, device)

    def step(loss_fn, texts_in, hn: bool) -> float:
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = model(images, texts_in)
        if hn:
            distill = {}
            if loss_fn.config.distill != "none":  # what teacher.attach_teacher's hook adds
                teacher_image, teacher_text, teacher_scale = teachers[loss_fn.config.distill].features(
                    images, texts_in[::1 + k])
                distill = dict(teacher_image=teacher_image, teacher_text=teacher_text,
                               teacher_logit_scale=teacher_scale.reshape(1).expand(b))
            losses = loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                             PackedOutputs(mask, types, **distill), output_dict=True)
        else:
            text_features = out["text_features"].view(b, -1, out["text_features"].shape[-1])[:, 0]
            losses = loss_fn(out["image_features"], text_features, out["logit_scale"], output_dict=True)
        sum(losses.values()).backward()
        optimizer.step()
        synchronize(device)
        return time.perf_counter() - start

    teachers = {"ema": Teacher(model, "ema")}
    clip = ClipLoss()
    variants = {"vanilla (B texts)": (clip, texts[::1 + k], False),
                "vanilla (same texts)": (clip, texts, False)}
    for name, extra in OBJECTIVES.items():
        config = HNConfig(negatives="online", num_negatives=k, memory_bank_size=args.bank_size,
                          mined_k=args.mined_k, curriculum="const", **extra)
        on_step_end = teachers[config.distill].update if config.distill != "none" else None
        hn_loss = HardNegativeLoss(config, total_steps=10_000, on_step_end=on_step_end)
        variants[name] = (hn_loss, texts, True)

    times = {name: [] for name in variants}
    for round_index in range(args.rounds + 2):
        for name, (loss_fn, texts_in, hn) in variants.items():
            elapsed = step(loss_fn, texts_in, hn)
            if round_index >= 2:
                times[name].append(elapsed)

    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians["vanilla (same texts)"]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nmodel {args.model} ({params:.1f}M params), batch {b}, K {k}, bank {args.bank_size}, "
          f"mined-k {args.mined_k}, device {device}, {args.rounds} timed rounds (median)")
    print(f"{'variant':<22}{'ms/step':>10}{'ratio':>9}{'overhead':>10}")
    for name, median in medians.items():
        ratio = median / reference
        print(f"{name:<22}{1000 * median:>10.2f}{ratio:>9.3f}{100 * (ratio - 1):>9.1f}%")
    print_loss_only(args, variants, model, images, texts, mask, types, reference, device)
    bank = variants["all"][0].bank
    print(f"memory bank: {len(bank)} of {bank.size} rows, {bank.nbytes() / 2**20:.2f} MiB")
    print("ratio/overhead are against 'vanilla (same texts)': the K extra text forwards are excluded.")


if __name__ == "__main__":
    main()
