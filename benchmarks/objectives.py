"""Train-step time of each hard-negative objective vs vanilla OpenCLIP, measured in one run.

The reference ("vanilla, same texts") runs the same model on the same batch and encodes the same
B*(1+K) texts, then applies OpenCLIP's `ClipLoss` to the positives only; so the ratio isolates the
HN machinery (gathering, masks, curriculum, extra logits, bank, mining, the distillation
teacher's no-grad forward and EMA update, the local term's token hooks and token-level scores)
from the K extra text forwards. The mirror rows
(recommended.yaml's `mirror` and `converse` terms) also encode B flipped images and one or three
more captions per sample; their reference is a vanilla step encoding those same inputs. A plain
vanilla step (B texts) is printed too. Steps of all variants are interleaved round by round so
drift hits them alike; the table reports medians.

    python benchmarks/objectives.py                       # hn-tiny-vit, ~1-2 minutes on 2 CPU cores
    python benchmarks/objectives.py --model ViT-B-32 --batch-size 32 --rounds 5
    python benchmarks/objectives.py --device cuda --model ViT-B-32 --batch-size 256
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import open_clip
import torch
from open_clip.loss import ClipLoss

from open_clip_hn.config import HNConfig
from open_clip_hn.mirror import MirrorPairs
from open_clip_hn.objective import HardNegativeLoss
from open_clip_hn.packing import PackedOutputs
from open_clip_hn.recolour import COLOUR_TO_ID, PAIR_BASE, exchange_colours
from open_clip_hn.teacher import Teacher
from open_clip_hn.token_features import attach_token_hooks

TINY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "open_clip_hn", "model_configs", "hn-tiny-vit.json")
OBJECTIVES = {
    "itc": dict(loss=("itc",)),
    "choice": dict(loss=("itc", "choice")),
    "intra": dict(loss=("itc", "intra")),
    "rank": dict(loss=("itc", "rank")),
    "importance": dict(loss=("importance",)),
    "mined": dict(loss=("itc", "mined")),
    "all": dict(loss=("importance", "choice", "intra", "rank", "mined")),
    # the step includes the EMA teacher's forward (B images, B captions) and its update
    "distill (ema)": dict(loss=("itc", "choice"), distill="ema"),
    # FSC-CLIP's local term: the step keeps the towers' token features (a hooked copy of the model)
    "local": dict(loss=("clip", "choice", "local")),
    # recommended.yaml's terms: the step also encodes B flipped images and B mirrored captions
    # (+ 2B converse captions), so these rows are timed against a vanilla step on the same inputs
    "mirror": dict(loss=("clip", "choice"), mirror=("horizontal",), mirror_weight=1.0),
    "mirror + converse": dict(loss=("clip", "choice"), mirror=("horizontal",), mirror_weight=1.0,
                              converse_weight=10.0, converse_margin=0.02),
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
    """Images, B*(1+K) packed texts, 3B more texts (a mirrored and two converse captions per
    sample), the negatives' mask and types."""
    size = model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    context = model.context_length if hasattr(model, "context_length") else 77
    images = torch.randn(batch, 3, *size, device=device)
    texts = torch.randint(1, 1000, (batch * (1 + k), context), device=device)
    mirror_texts = torch.randint(1, 1000, (batch * 3, context), device=device)
    mask = torch.rand(batch, k, device=device) > 0.2
    types = torch.randint(0, 9, (batch, k), device=device).masked_fill(~mask, -1)
    return images, texts, mirror_texts, mask, types


def extra_text_rows(config: HNConfig) -> int:
    """Texts per sample the mirror hooks add: the mirrored caption, and with the converse term
    its two converse captions."""
    return 0 if not config.mirror else (3 if config.converse_weight > 0 else 1)


def model_inputs(images, texts, mirror_texts, rows: int):
    """What the model encodes in one forward: with mirrors, the flipped images and `rows` extra
    captions per sample after the originals (as the plugin's hook does)."""
    if not rows:
        return images, texts
    return torch.cat([images, images.flip(-1)]), torch.cat([texts, mirror_texts[:len(images) * rows]])


def split_features(image_all, text_all, batch: int, texts: int, rows: int):
    """(image [B, D], text [texts, D], MirrorPairs or None) of one forward's features."""
    image, text = image_all[:batch], text_all[:texts]
    if not rows:
        return image, text, None
    extra = text_all[texts:texts + batch * rows]
    every = torch.ones(batch, dtype=torch.bool, device=image_all.device)
    converse = extra[batch:].view(batch, 2, -1) if rows == 3 else None
    return image, text, MirrorPairs(image_all[batch:], extra[:batch], every, converse,
                                    every if converse is not None else None)


def print_loss_only(args, variants, model, token_model, images, texts, mirror_texts, mask, types,
                    references: dict[str, float], device: torch.device) -> None:
    """Loss forward+backward on fixed features: the machinery cost without the model's noise,
    as a share of the vanilla step on the same inputs."""
    with torch.no_grad():
        out = model(*model_inputs(images, texts, mirror_texts, 3))
        tokens = PackedOutputs.read(token_model(*model_inputs(images, texts, mirror_texts, 0)))
    b, k = args.batch_size, args.num_negatives
    image_all, text_all, scale = out["image_features"], out["text_features"], out["logit_scale"]
    fixed_teacher = dict(teacher_image=image_all[:b].flip(0), teacher_text=text_all[:len(texts):1 + k].flip(0),
                         teacher_logit_scale=scale.detach().reshape(1).expand(b))
    timings = {}
    for name, (loss_fn, _, hn, rows, _) in variants.items():
        if name.startswith("vanilla") and name != "vanilla (same texts)":
            continue
        samples = []
        for rep in range(args.loss_reps + 3):
            i, t = image_all.clone().requires_grad_(), text_all.clone().requires_grad_()
            image, text, mirrors = split_features(i, t, b, len(texts), rows)
            synchronize(device)
            start = time.perf_counter()
            if hn:
                extra = dict(fixed_teacher) if loss_fn.config.distill != "none" else {}
                if loss_fn.config.uses_tokens:
                    extra.update(image_tokens=tokens.image_tokens.clone().requires_grad_(),
                                 text_tokens=tokens.text_tokens.clone().requires_grad_(),
                                 text_token_mask=tokens.text_token_mask)
                losses = loss_fn(image, text, scale, PackedOutputs(mask, types, mirrors=mirrors, **extra),
                                 output_dict=True)
            else:
                losses = loss_fn(image, text.view(b, 1 + k, -1)[:, 0], scale, output_dict=True)
            sum(losses.values()).backward()
            synchronize(device)
            if rep >= 3:
                samples.append(time.perf_counter() - start)
        timings[name] = statistics.median(samples)
    base = timings.pop("vanilla (same texts)")
    print(f"\nloss only (forward+backward on fixed features), ClipLoss {1000 * base:.2f} ms")
    print(f"{'objective':<22}{'ms':>10}{'extra ms':>10}{'% of step':>11}")
    for name, value in timings.items():
        reference = references[variants[name][4]]
        print(f"{name:<22}{1000 * value:>10.2f}{1000 * (value - base):>10.2f}"
              f"{100 * (value - base) / reference:>10.1f}%")


VANILLA_OF_ROWS = {0: "vanilla (same texts)", 1: "vanilla (mirror inputs)",
                   3: "vanilla (mirror + converse inputs)"}


def time_colour_exchange(images: torch.Tensor, rounds: int, device: torch.device) -> float:
    """Median seconds of the model hook's colour exchange (`--hn-mirror colour`) on every image
    of the batch (the most a step does; a caption mix gives each axis a share)."""
    pairs = torch.full((len(images),), COLOUR_TO_ID["red"] * PAIR_BASE + COLOUR_TO_ID["blue"],
                       device=device)
    elapsed = []
    for round_index in range(rounds + 2):
        synchronize(device)
        start = time.perf_counter()
        exchange_colours(images, pairs, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
        synchronize(device)
        if round_index >= 2:
            elapsed.append(time.perf_counter() - start)
    return statistics.median(elapsed)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    open_clip.add_model_config(TINY_CONFIG)
    model = open_clip.create_model(args.model, device=device, output_dict=True)
    model.train()
    b, k = args.batch_size, args.num_negatives
    images, texts, mirror_texts, mask, types = make_batch(model, b, k, device)
    token_model = copy.deepcopy(model)  # the local row's: the other rows' steps keep no tokens
    # the mark packing's own hook leaves on a packed training forward: token_features adds the
    # tokens to such outputs only (this benchmark packs its texts itself)
    token_model.register_forward_hook(lambda module, args, output: PackedOutputs(neg_mask=mask).write(output))
    attach_token_hooks(token_model, k)
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (model, token_model)}

    def step(loss_fn, texts_in, hn: bool, rows: int) -> float:
        net = token_model if hn and loss_fn.config.uses_tokens else model
        synchronize(device)
        start = time.perf_counter()
        optimizers[id(net)].zero_grad(set_to_none=True)
        out = net(*model_inputs(images, texts_in, mirror_texts, rows))
        image, text, mirrors = split_features(out["image_features"], out["text_features"], b,
                                              len(texts_in), rows)
        if hn:
            distill = {}
            if loss_fn.config.distill != "none":  # what teacher.attach_teacher's hook adds
                teacher_image, teacher_text, teacher_scale = teachers[loss_fn.config.distill].features(
                    images, texts_in[::1 + k])
                distill = dict(teacher_image=teacher_image, teacher_text=teacher_text,
                               teacher_logit_scale=teacher_scale.reshape(1).expand(b))
            tokens = PackedOutputs.read(out)  # what token_features' hooks added, if any
            losses = loss_fn(image, text, out["logit_scale"],
                             PackedOutputs(mask, types, mirrors=mirrors, **distill,
                                           image_tokens=tokens.image_tokens, text_tokens=tokens.text_tokens,
                                           text_token_mask=tokens.text_token_mask), output_dict=True)
        else:
            losses = loss_fn(image, text.view(b, -1, text.shape[-1])[:, 0], out["logit_scale"],
                             output_dict=True)
        sum(losses.values()).backward()
        optimizers[id(net)].step()
        synchronize(device)
        return time.perf_counter() - start

    teachers = {"ema": Teacher(model, "ema")}
    clip = ClipLoss()
    # name -> (loss, texts, hard-negative loss?, extra text rows per sample, reference row)
    variants = {"vanilla (B texts)": (clip, texts[::1 + k], False, 0, "vanilla (same texts)")}
    for rows, name in VANILLA_OF_ROWS.items():
        variants[name] = (clip, texts, False, rows, name)
    for name, extra in OBJECTIVES.items():
        config = HNConfig(negatives="online", num_negatives=k, memory_bank_size=args.bank_size,
                          mined_k=args.mined_k, curriculum="const", **extra)
        on_step_end = teachers[config.distill].update if config.distill != "none" else None
        hn_loss = HardNegativeLoss(config, total_steps=10_000, on_step_end=on_step_end)
        rows = extra_text_rows(config)
        variants[name] = (hn_loss, texts, True, rows, VANILLA_OF_ROWS[rows])

    times = {name: [] for name in variants}
    for round_index in range(args.rounds + 2):
        for name, (loss_fn, texts_in, hn, rows, _) in variants.items():
            elapsed = step(loss_fn, texts_in, hn, rows)
            if round_index >= 2:
                times[name].append(elapsed)

    medians = {name: statistics.median(values) for name, values in times.items()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nmodel {args.model} ({params:.1f}M params), batch {b}, K {k}, bank {args.bank_size}, "
          f"mined-k {args.mined_k}, device {device}, {args.rounds} timed rounds (median)")
    print(f"{'variant':<36}{'ms/step':>10}{'ratio':>9}{'overhead':>10}  against")
    for name, median in medians.items():
        reference = variants[name][4]
        ratio = median / medians[reference]
        print(f"{name:<36}{1000 * median:>10.2f}{ratio:>9.3f}{100 * (ratio - 1):>9.1f}%  {reference}")
    print_loss_only(args, variants, model, token_model, images, texts, mirror_texts, mask, types, medians, device)
    colour = time_colour_exchange(images, args.rounds, device)
    print(f"colour exchange of all {b} images (--hn-mirror colour, in the model hook): "
          f"{1000 * colour:.2f} ms, {100 * colour / medians['mirror + converse']:.1f}% of the "
          f"mirror + converse step")
    bank = variants["all"][0].bank
    print(f"memory bank: {len(bank)} of {bank.size} rows, {bank.nbytes() / 2**20:.2f} MiB")
    print("ratio/overhead are against the vanilla step on the same inputs: the K extra text forwards "
          "(and, for the mirror rows, the flipped images and extra captions) are excluded.")


if __name__ == "__main__":
    main()
