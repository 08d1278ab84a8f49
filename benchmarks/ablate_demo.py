"""Ablation of the hard-negative recipe on the demo's data: what each objective and setting adds.

Every row continues the same vanilla-pretrained tiny CLIP (2 epochs of 10k scenes, batch 128,
lr 2e-3) with the same samples, seed, batch size (64) and learning rate (1e-3) as the vanilla row
of the same budget, then is scored on the demo's sets (val compositions) and on the unseen sets
(test compositions). Prints one table per benchmark with differences to that vanilla row.
`--from-scratch` trains vanilla, the recommended recipe and its mirrors-from-step-0 variant
("mirror w5") from random weights instead (the no-collapse check; README reports it at the
default 3 epochs and with `--epochs 9`). "mirror w5" is `recommended.yaml` without its 117-step
warmup, the recipe that the rows built on it were measured against. The rows
aimed at swap objects were measured on the demo's own defaults (`--samples 20000
--pretrain-epochs 1`: the same data, pretrained model and continuation as
`python -m open_clip_hn.demo`); the image-neighbour row builds its kNN index of the training
shards with the pretrained model first, the partner rows an index of each scene's swap-object
twins (`neighbors.write_given`).

    python benchmarks/ablate_demo.py --output-dir ablate [--only "vanilla;recommended.yaml"]

The data are rendered on first use; runs and scores are cached in the output folder, each row
under its command line, recipe contents and starting checkpoint (a change re-runs the row).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np

from open_clip_hn import demo
from open_clip_hn import neighbors, scenes
from open_clip_hn.files import atomic_write_json

MIRROR = ["--hn-mirror", "horizontal,vertical", "--hn-mirror-weight", "5"]
RECOMMENDED = ["--hn-config", demo.RECOMMENDED]
SHAPE_NEGATIVES = ["--hn-negatives", "online", "--hn-types", "replace_object,swap_objects",
                   "--hn-num-negatives", "4"]
NEIGHBORS = "{neighbors}"  # replaced by an index of the training shards built with the pretrained model
PARTNERS = "{partners}"  # replaced by an index pairing each training scene with its swap-object twins
# name -> flags; rows without --hn-* flags are plain OpenCLIP
ABLATIONS: dict[str, list[str]] = {
    "vanilla": [],
    "recommended.yaml": RECOMMENDED,
    "mirror w5, horizontal+vertical": MIRROR,
    "mirror w1, horizontal+vertical": ["--hn-mirror", "horizontal,vertical",
                                       "--hn-mirror-weight", "1"],
    "mirror w5, horizontal only": ["--hn-mirror", "horizontal", "--hn-mirror-weight", "5"],
    "mirror w5 + choice w1 (swap/replace objects, K2)": MIRROR + [
        "--hn-negatives", "online", "--hn-num-negatives", "2", "--hn-loss", "itc,choice",
        "--hn-types", "swap_objects,replace_object"],
    # twice and three times the steps: the same budget for vanilla and hard negatives
    "vanilla, 6 ep": ["--epochs", "6"],
    "mirror w5, 6 ep": MIRROR + ["--epochs", "6"],
    "mirror w5, cosine curriculum 1 -> 0, 6 ep": MIRROR + [
        "--hn-curriculum", "cosine", "--hn-curriculum-start", "1", "--hn-curriculum-end", "0",
        "--epochs", "6"],
    "mirror w5 + choice w2 (swap objects/attributes, K2), 6 ep": MIRROR + [
        "--hn-negatives", "online", "--hn-num-negatives", "2", "--hn-loss", "itc,choice",
        "--hn-types", "swap_objects,swap_attributes", "--hn-choice-weight", "2", "--epochs", "6"],
    # from scratch (--from-scratch): mirrored pairs only after the first epoch (78 steps; the
    # recipe waits 117), or a share of mirrored pairs rising from 0 to 1 over the run
    "mirror w5, warmup 78 steps": MIRROR + ["--hn-curriculum-warmup", "78"],
    "mirror w5, linear curriculum 0 -> 1": MIRROR + [
        "--hn-curriculum", "linear", "--hn-curriculum-start", "0"],
    # aimed at swap objects (run with --samples 20000 --pretrain-epochs 1: the demo's defaults);
    # measured on top of mirror w5 from step 0, the recipe before its warmup
    "mirror w5 + shape negatives in itc (K4)": MIRROR + SHAPE_NEGATIVES,
    "mirror w5 + shape negatives, choice w5": MIRROR + SHAPE_NEGATIVES + [
        "--hn-loss", "itc,choice", "--hn-choice-weight", "5"],
    "shape negatives, choice w5 (no mirror)": SHAPE_NEGATIVES + [
        "--hn-loss", "itc,choice", "--hn-choice-weight", "5"],
    "mirror w5 + shape negatives, intra": MIRROR + SHAPE_NEGATIVES + ["--hn-loss", "itc,intra"],
    "mirror w5 + image neighbours (1 per sample)": MIRROR + [
        "--hn-image-neighbors", NEIGHBORS, "--hn-image-neighbors-per-sample", "1"],
    "mirror w5 + mined (bank 4096, k 16)": MIRROR + [
        "--hn-loss", "itc,mined", "--hn-memory-bank-size", "4096", "--hn-mined-k", "16"],
    "mirror w5 + importance (HCL, beta 0.5)": MIRROR + ["--hn-loss", "itc,importance"],
    "mirror w3, horizontal+vertical": ["--hn-mirror", "horizontal,vertical", "--hn-mirror-weight", "3"],
    "vanilla + swap-object partners (1 per sample)": [
        "--hn-image-neighbors", PARTNERS, "--hn-image-neighbors-per-sample", "1"],
    "mirror w5 + swap-object partners (1 per sample)": MIRROR + [
        "--hn-image-neighbors", PARTNERS, "--hn-image-neighbors-per-sample", "1"],
    "recommended.yaml + swap-object partners (1 per sample)": RECOMMENDED + [
        "--hn-image-neighbors", PARTNERS, "--hn-image-neighbors-per-sample", "1"],
    "vanilla, 9 ep": ["--epochs", "9"],
    "mirror w5, 9 ep": MIRROR + ["--epochs", "9"],
}
KEYS = [("replace_relation", "acc"), ("swap_attributes", "acc"), ("swap_objects", "acc"),
        ("replace_object", "acc"), ("replace_attribute", "acc"), ("relation_pairs", "group"),
        ("retrieval", "image_to_text_R@1")]


def _budget(flags: list[str]) -> tuple[str | None, ...]:
    """The training budget a row sets (learning rate, epochs): rows compare at equal budget."""
    return tuple(flags[flags.index(f) + 1] if f in flags else None for f in ("--lr", "--epochs"))


def _baseline(run: str) -> str | None:
    """The vanilla row trained with the same budget as `run`."""
    budget = _budget(ABLATIONS.get(run, []))
    return next((name for name, flags in ABLATIONS.items()
                 if not any(f.startswith("--hn-") for f in flags) and _budget(flags) == budget),
                None)


def neighbor_index(data: demo.DemoData, pretrained: str | None, output: str) -> str:
    """The kNN index of the training shards under the model that is continued. `build` resumes
    a finished index from its cached embeddings and refuses one made with another model."""
    neighbors.build(data.train, "hn-tiny-vit", output, pretrained=pretrained,
                    model_config=demo.MODEL_CONFIG, device="cpu")
    return output


def partner_index(data: demo.DemoData, output: str, k: int = 4) -> str:
    """Each training scene's neighbours are up to k training scenes that show its swap-objects
    negative (the same scene with the two shapes exchanged, however the caption words it): the
    image-side twin of that text negative, placed in the same batch."""
    def twins(captions: list[str]) -> np.ndarray:
        parsed = [scenes.parse_caption(c) for c in captions]
        by_composition: dict[str, list[int]] = {}
        for i, scene in enumerate(parsed):
            by_composition.setdefault(scene.composition(), []).append(i)
        rng = random.Random(0)
        ids = np.full((len(parsed), k), -1)
        for i, scene in enumerate(parsed):
            negative = scenes.negative_caption(scene, "swap_objects", rng)
            if negative is None:
                continue  # two objects of one shape
            found = list(by_composition.get(scenes.parse_caption(negative).composition(), []))
            rng.shuffle(found)
            ids[i, :len(found[:k])] = found[:k]
        return ids

    neighbors.write_given(data.train, output, twins, "swap-object twins")
    return output


def table(rows: dict[str, dict[str, dict]], bench: str) -> str:
    """Key metrics per row, with differences to the vanilla row of the same budget."""
    header = ["run"] + [f"{name[:16]}/{metric[:9]}" for name, metric in KEYS] + ["Δrel", "Δi2t"]
    lines = [header]
    for run, results in rows.items():
        r = results[bench]
        base = rows[_baseline(run)][bench] if _baseline(run) in rows else None
        cells = [run] + [f"{100 * r[n][m]:.1f}" for n, m in KEYS]
        if base:
            cells += [f"{100 * (r['replace_relation']['acc'] - base['replace_relation']['acc']):+.1f}",
                      f"{100 * (r['retrieval']['image_to_text_R@1'] - base['retrieval']['image_to_text_R@1']):+.1f}"]
        lines.append(cells + [""] * (len(header) - len(cells)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))) for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="ablate")
    parser.add_argument("--samples", type=int, default=10000, help="Training scenes. Default: 10000.")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--pretrained", default=None, help="Skip pretraining: use this checkpoint.")
    parser.add_argument("--epochs", type=int, default=3, help="Default: 3.")
    parser.add_argument("--batch-size", type=int, default=64, help="Default: 64.")
    parser.add_argument("--lr", type=float, default=1e-3, help="Default: 1e-3.")
    parser.add_argument("--test-items", type=int, default=1000)
    parser.add_argument("--from-scratch", action="store_true",
                        help="Train from random weights (lr 2e-3, batch 128) instead of continuing "
                             "the pretrained model; default rows: vanilla, recommended.yaml and "
                             "mirror w5 (the recipe without its warmup).")
    parser.add_argument("--only", default=None, help="Semicolon list of ablation names to run.")
    args = parser.parse_args()

    out = os.path.abspath(args.output_dir)
    logs = os.path.join(out, "runs")
    data = demo.prepare_data(os.path.join(out, "data"), args.samples, args.test_items)
    common = dict(device="cpu", workers=1, seed=0)
    steps_per_epoch = args.samples // args.batch_size
    pretrained = args.pretrained
    if args.from_scratch:
        pretrained, lr, batch_size, tag = None, 2e-3, 128, "scratch-"
        names = (args.only.split(";") if args.only
                 else ["vanilla", "recommended.yaml", "mirror w5, horizontal+vertical"])
    else:
        lr, batch_size, tag = args.lr, args.batch_size, ""
        names = args.only.split(";") if args.only else list(ABLATIONS)
        if pretrained is None:
            pretrained = demo.run_training(
                demo.train_argv(data, logs, "pretrain", args.pretrain_epochs, batch_size=128,
                                lr=2e-3, warmup=min(100, args.samples // 128), **common),
                logs, "pretrain", args.pretrain_epochs)
    rows: dict[str, dict] = {}
    results_path = os.path.join(out, f"{tag}ablation.json")
    if os.path.isfile(results_path):
        rows = json.load(open(results_path))
    index_dirs = {NEIGHBORS: os.path.join(out, "neighbors"), PARTNERS: os.path.join(out, "partners")}
    for name in names:
        flags = [index_dirs.get(f, f) for f in ABLATIONS[name]]
        epochs = int(flags[flags.index("--epochs") + 1]) if "--epochs" in flags else args.epochs
        slug = tag + "".join(c if c.isalnum() else "-" for c in name)
        argv = demo.train_argv(data, logs, slug, epochs, batch_size=batch_size, lr=lr,
                               warmup=max(1, steps_per_epoch // 10), pretrained=pretrained,
                               extra=flags, **common)
        stamp = demo.run_stamp(argv)
        if rows.get(name, {}).get("stamp") == stamp:
            continue  # scored before with the same command line, recipe and starting checkpoint
        if NEIGHBORS in ABLATIONS[name]:
            neighbor_index(data, pretrained, index_dirs[NEIGHBORS])
        if PARTNERS in ABLATIONS[name]:
            partner_index(data, index_dirs[PARTNERS])
        start = time.time()
        checkpoint = demo.run_training(argv, logs, slug, epochs, quiet=True)
        rows[name] = demo.evaluate_checkpoints({name: checkpoint},
                                               {"val": data.val, "test": data.test}, "cpu")[name]
        rows[name]["stamp"] = stamp
        rows[name]["seconds"] = time.time() - start
        atomic_write_json(results_path, rows, indent=2)
        print(f"{name}: {time.time() - start:.0f}s")
    rows = {k: v for k, v in rows.items() if k in names or k == "vanilla"}
    for bench in ("val", "test"):
        print(f"\n== {bench} compositions (percent; Δ vs vanilla at the same budget) ==")
        print(table(rows, bench))


if __name__ == "__main__":
    main()
