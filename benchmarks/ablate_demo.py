"""Ablation of the hard-negative recipe on the demo's data: what each objective and setting adds.

Every row continues the same vanilla-pretrained tiny CLIP for the same samples, seed and learning
rate as the vanilla row, then is scored on the demo's sets (val compositions) and on the unseen
sets (test compositions). Prints one table per benchmark with differences to the vanilla row of the same budget
(learning rate, epochs).

    python benchmarks/ablate_demo.py --output-dir ablate [--samples 5000] [--only "vanilla;itc+choice"]

The data and the pretrained checkpoint are the demo's (`open_clip_hn.demo`), built on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from open_clip_hn import demo
from open_clip_hn import eval as hn_eval

BOW_TYPES = "swap_attributes,swap_objects,replace_relation,shuffle_order"
# name -> plugin flags; "vanilla" is plain OpenCLIP
ABLATIONS: dict[str, list[str]] = {
    "vanilla": [],
    "itc (NegCLIP)": ["--hn-negatives", "online", "--hn-loss", "itc"],
    "itc+choice": ["--hn-negatives", "online", "--hn-loss", "itc,choice"],
    "itc+choice+rank": ["--hn-negatives", "online", "--hn-loss", "itc,choice,rank"],
    "itc+choice, bow types": ["--hn-negatives", "online", "--hn-loss", "itc,choice",
                              "--hn-types", BOW_TYPES],
    "itc+choice w2, bow types": ["--hn-negatives", "online", "--hn-loss", "itc,choice",
                                 "--hn-types", BOW_TYPES, "--hn-choice-weight", "2"],
    "itc+choice, bow types, K8": ["--hn-negatives", "online", "--hn-loss", "itc,choice",
                                  "--hn-types", BOW_TYPES, "--hn-num-negatives", "8"],
    "itc+choice+rank, bow types": ["--hn-negatives", "online", "--hn-loss", "itc,choice,rank",
                                   "--hn-types", BOW_TYPES],
    "recommended.yaml": ["--hn-config", demo.RECOMMENDED],
    # longer and faster continuation: the same budget for vanilla and hard negatives
    "vanilla, lr 1e-3, 2 ep": ["--lr", "1e-3", "--epochs", "2"],
    # K=2 bag-of-words types: every scene caption has a relation and a shuffle negative, so no
    # slot is ever masked (masked slots currently end in NaN, see the report)
    "itc+choice w2, bow K2, lr 1e-3, 2 ep": [
        "--hn-negatives", "online", "--hn-loss", "itc,choice", "--hn-types", BOW_TYPES,
        "--hn-num-negatives", "2", "--hn-choice-weight", "2", "--lr", "1e-3", "--epochs", "2"],
    "itc+choice+rank w2, bow K2, lr 1e-3, 2 ep": [
        "--hn-negatives", "online", "--hn-loss", "itc,choice,rank", "--hn-types", BOW_TYPES,
        "--hn-num-negatives", "2", "--hn-choice-weight", "2", "--hn-rank-weight", "2",
        "--lr", "1e-3", "--epochs", "2"],
}
KEYS = [("replace_relation", "acc"), ("swap_attributes", "acc"), ("swap_objects", "acc"),
        ("replace_attribute", "acc"), ("relation_pairs", "group"),
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
    parser.add_argument("--samples", type=int, default=5000, help="Continued-training samples.")
    parser.add_argument("--pretrain-samples", type=int, default=20000)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--pretrained", default=None, help="Skip pretraining: use this checkpoint.")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--test-items", type=int, default=500)
    parser.add_argument("--only", default=None, help="Semicolon list of ablation names to run.")
    parser.add_argument("--extra", default="", help="Flags added to every hard-negative row.")
    args = parser.parse_args()

    out = os.path.abspath(args.output_dir)
    logs = os.path.join(out, "runs")
    data = demo.prepare_data(os.path.join(out, "data"), args.samples, args.test_items, seed=1)
    common = dict(batch_size=128, device="cpu", workers=1, seed=0)
    pretrained = args.pretrained
    if pretrained is None:
        pre_data = demo.prepare_data(os.path.join(out, "pretrain-data"), args.pretrain_samples,
                                     args.test_items)
        pretrained = demo.run_training(
            demo.train_argv(pre_data, logs, "pretrain", args.pretrain_epochs, lr=2e-3,
                            warmup=100, **common), logs, "pretrain", args.pretrain_epochs)
    names = args.only.split(";") if args.only else list(ABLATIONS)
    rows: dict[str, dict] = {}
    results_path = os.path.join(out, "ablation.json")
    if os.path.isfile(results_path):
        rows = json.load(open(results_path))
    for name in names:
        if name in rows:
            continue
        flags = ABLATIONS[name]
        extra = flags + (args.extra.split() if "--hn-negatives" in flags else [])
        epochs = int(flags[flags.index("--epochs") + 1]) if "--epochs" in flags else args.epochs
        slug = "".join(c if c.isalnum() else "-" for c in name)
        start = time.time()
        checkpoint = demo.run_training(
            demo.train_argv(data, logs, slug, epochs, lr=args.lr,
                            warmup=max(1, args.samples // 1280), pretrained=pretrained,
                            extra=extra, **common), logs, slug, epochs, quiet=True)
        rows[name] = demo.evaluate_checkpoints({name: checkpoint},
                                               {"val": data.val, "test": data.test}, "cpu")[name]
        rows[name]["seconds"] = time.time() - start
        hn_eval.write_json(results_path, rows)
        print(f"{name}: {time.time() - start:.0f}s")
    rows = {k: v for k, v in rows.items() if k in names or k == "vanilla"}
    for bench in ("val", "test"):
        print(f"\n== {bench} compositions (percent; Δ vs vanilla at the same budget) ==")
        print(table(rows, bench))


if __name__ == "__main__":
    main()
