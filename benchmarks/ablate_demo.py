"""Ablation of the hard-negative recipe on the demo's data: what each objective and setting adds.

Every row continues the same vanilla-pretrained tiny CLIP (the demo's: 1 epoch of 20k scenes,
batch 128, lr 2e-3, `demo.MODEL_CONFIG` or `--model-config`) with the same samples, seed, batch size (64) and
learning rate (1e-3) as the vanilla row, then is scored on the demo's sets (val compositions) and
on the unseen sets (test compositions). Prints one table per benchmark with differences to the
vanilla row. The rows take one part of the shipped `recommended` recipe away or change one setting.
`--from-scratch` trains vanilla, the recommended recipe and its no-warmup variant from random
weights instead (the no-collapse check; benchmarks/RESULTS.md reports it at the default 3 epochs of 10k scenes
and with `--epochs 9`). `--recipes` compares every shipped recipe (`--hn-config NAME`) under the
same protocol instead: the command line's learning rate and warmup replace the recipes' own,
which are set for fine-tuning a web-pretrained CLIP; a recipe the model cannot run (`local`
needs a ViT) is skipped with the reason.

    python benchmarks/ablate_demo.py --output-dir ablate [--only "vanilla;recommended.yaml"]
    python benchmarks/ablate_demo.py --output-dir scratch --from-scratch --samples 10000
    python benchmarks/ablate_demo.py --output-dir ablate --recipes

The data are rendered on first use; runs and scores are cached in the output folder, each row
under its command line, recipe contents and starting checkpoint (a change re-runs the row).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from open_clip_hn import demo
from open_clip_hn.files import atomic_write_json
from open_clip_hn.recipes import load_recipe, recipe_names, resolve_recipe
from open_clip_hn.token_features import check_token_model_config

RECOMMENDED = ["--hn-config", demo.RECOMMENDED]  # by name: found from an installed wheel too
NO_TEXT_NEGATIVES = ["--hn-negatives", "none", "--hn-vocabulary", "none", "--hn-plausibility", "none",
                     "--hn-loss", "clip"]
NO_CONVERSE = ["--hn-converse-weight", "0", "--hn-converse-margin", "0"]
NO_MIRRORS = ["--hn-mirror", "none", *NO_CONVERSE]  # the converse term needs the mirrored pairs
# name -> flags; rows without --hn-* flags are plain OpenCLIP
ABLATIONS: dict[str, list[str]] = {
    "vanilla": [],
    "recommended.yaml": RECOMMENDED,
    "without text negatives (mirrors only)": RECOMMENDED + NO_TEXT_NEGATIVES,
    "without mirrors (text negatives only)": RECOMMENDED + NO_MIRRORS,
    "without the converse term (mirror weight 1)": RECOMMENDED + NO_CONVERSE,
    "without the converse term, mirror weight 5 (sessions 10-12's recipe)": RECOMMENDED + NO_CONVERSE + [
        "--hn-mirror-weight", "5"],
    "text negatives from the full lexicons (no vocabulary)": RECOMMENDED + ["--hn-vocabulary", "none"],
    "without the plausibility filter": RECOMMENDED + ["--hn-plausibility", "none"],
    "without swap-attribute negatives": RECOMMENDED + ["--hn-types", "replace_object,swap_objects"],
    "text negatives inside the contrastive loss (itc)": RECOMMENDED + ["--hn-loss", "itc,choice"],
    "choice weight 5 instead of 2": RECOMMENDED + ["--hn-choice-weight", "5"],
    "no warmup (hard negatives from step 0)": RECOMMENDED + ["--hn-curriculum-warmup", "0"],
}


def shipped_recipes(model_config: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({"recipe NAME": flags} for every shipped recipe the model can run, {name: why not})."""
    rows, skipped = {}, {}
    config = json.load(open(model_config))
    for name in recipe_names():
        terms = load_recipe(resolve_recipe(name)).get("hn-loss", [])
        if "local" in (terms.split(",") if isinstance(terms, str) else terms):
            try:
                check_token_model_config(config)
            except ValueError as error:
                skipped[name] = str(error)
                continue
        rows[f"recipe {name}"] = ["--hn-config", name]
    return rows, skipped


KEYS = [("replace_relation", "acc"), ("swap_attributes", "acc"), ("swap_objects", "acc"),
        ("replace_object", "acc"), ("replace_attribute", "acc"), ("relation_pairs", "group"),
        ("retrieval", "image_to_text_R@1")]
COLUMNS = ["relations", "swap-att", "swap-obj", "repl-obj", "repl-att", "pairs group", "i2t R@1"]


def table(rows: dict[str, dict[str, dict]], bench: str) -> str:
    """Key metrics per row, with differences to the vanilla row."""
    header = ["run"] + COLUMNS + ["Δrel", "Δi2t"]
    lines = [header]
    for run, results in rows.items():
        r = results[bench]
        base = rows["vanilla"][bench] if "vanilla" in rows else None
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
    parser.add_argument("--samples", type=int, default=20000,
                        help="Training scenes. Default: 20000 (the demo's).")
    parser.add_argument("--pretrain-epochs", type=int, default=1, help="Default: 1 (the demo's).")
    parser.add_argument("--pretrained", default=None, help="Skip pretraining: use this checkpoint.")
    parser.add_argument("--epochs", type=int, default=3, help="Default: 3.")
    parser.add_argument("--batch-size", type=int, default=64, help="Default: 64.")
    parser.add_argument("--lr", type=float, default=1e-3, help="Default: 1e-3.")
    parser.add_argument("--test-items", type=int, default=1000)
    parser.add_argument("--model-config", default=demo.MODEL_CONFIG,
                        help="OpenCLIP model config of the tiny CLIP. Default: the demo's.")
    parser.add_argument("--from-scratch", action="store_true",
                        help="Train from random weights (lr 2e-3, batch 128) instead of continuing "
                             "the pretrained model; default rows: vanilla, recommended.yaml and "
                             "its no-warmup variant.")
    parser.add_argument("--recipes", action="store_true",
                        help="Rows: vanilla and every shipped recipe (--hn-config NAME) the model can "
                             "run, at this protocol's learning rate and warmup, instead of the "
                             "ablation of the recommended recipe.")
    parser.add_argument("--only", default=None, help="Semicolon list of ablation names to run.")
    parser.add_argument("--recipe-warmup-share", type=float, default=None, metavar="SHARE",
                        help="Set the rows' --hn-curriculum-warmup (where a row does not set it) to "
                             "this share of the continued run's steps (recommended.yaml's 117 steps "
                             "are 0.125 of the demo's 937): for --samples far below the demo's, "
                             "where 117 steps would be the whole run. Default: the recipes' own.")
    args = parser.parse_args()
    if args.recipes and args.from_scratch:
        parser.error("--recipes continues the pretrained model: leave out --from-scratch")
    rows_by_name = dict(ABLATIONS)
    if args.recipes:
        recipe_rows, skipped = shipped_recipes(args.model_config)
        rows_by_name = {"vanilla": [], **recipe_rows}
        for name, why in skipped.items():
            print(f"recipe {name}: skipped, {why}")

    if args.from_scratch:
        names = (args.only.split(";") if args.only
                 else ["vanilla", "recommended.yaml", "no warmup (hard negatives from step 0)"])
    else:
        names = args.only.split(";") if args.only else list(rows_by_name)
    unknown = [name for name in names if name not in rows_by_name]
    if unknown:  # before any scene is rendered
        parser.error(f"--only: unknown row(s) {unknown}; rows: {'; '.join(rows_by_name)}")
    if "vanilla" not in names:  # the row every Δ column is taken against (reused when scored)
        names = ["vanilla", *names]

    out = os.path.abspath(args.output_dir)
    logs = os.path.join(out, "runs")
    data = demo.prepare_data(os.path.join(out, "data"), args.samples, args.test_items)
    common = dict(device="cpu", workers=1, seed=0, model_config=os.path.abspath(args.model_config))
    steps_per_epoch = args.samples // args.batch_size
    pretrained = args.pretrained
    if args.from_scratch:
        pretrained, lr, batch_size, tag = None, 2e-3, 128, "scratch-"
    else:
        lr, batch_size, tag = args.lr, args.batch_size, ""
        if pretrained is None:
            pretrained = demo.run_training(
                demo.train_argv(data, logs, "pretrain", args.pretrain_epochs, batch_size=128,
                                lr=2e-3, warmup=min(100, args.samples // 128), **common),
                logs, "pretrain", args.pretrain_epochs)
    rows: dict[str, dict] = {}
    results_path = os.path.join(out, f"{tag}ablation.json")
    if os.path.isfile(results_path):
        rows = json.load(open(results_path))
    for name in names:
        flags = rows_by_name[name]
        if flags and args.recipe_warmup_share is not None and "--hn-curriculum-warmup" not in flags:
            flags = [*flags, "--hn-curriculum-warmup",
                     str(round(args.recipe_warmup_share * (args.samples // batch_size) * args.epochs))]
        slug = tag + "".join(c if c.isalnum() else "-" for c in name)
        argv = demo.train_argv(data, logs, slug, args.epochs, batch_size=batch_size, lr=lr,
                               warmup=max(1, steps_per_epoch // 10), pretrained=pretrained,
                               extra=flags, **common)
        stamp = demo.run_stamp(argv)
        if rows.get(name, {}).get("stamp") == stamp:
            continue  # scored before with the same command line, recipe and starting checkpoint
        start = time.time()
        checkpoint = demo.run_training(argv, logs, slug, args.epochs, quiet=True)
        rows[name] = demo.evaluate_checkpoints({name: checkpoint},
                                               {"val": data.val, "test": data.test}, "cpu",
                                               model_config=common["model_config"])[name]
        rows[name]["stamp"] = stamp
        rows[name]["seconds"] = time.time() - start
        atomic_write_json(results_path, rows, indent=2)
        print(f"{name}: {time.time() - start:.0f}s")
    rows = {k: v for k, v in rows.items() if k in names or k == "vanilla"}
    for bench in ("val", "test"):
        print(f"\n== {bench} compositions (percent; Δ vs vanilla) ==")
        print(table(rows, bench))


if __name__ == "__main__":
    main()
