"""The text hard-negative generator on SugarCrepe: real COCO captions that no one here wrote.

    python benchmarks/negatives_sugarcrepe.py --data /tmp/sugarcrepe [--k 4] [--limit N]

SugarCrepe (Hsieh et al. 2023, github.com/RAIVNLab/sugar-crepe, folder data/) pairs COCO captions
with one human-validated negative per caption, in seven files ({id: {"filename", "caption",
"negative_caption"}}). The data is not shipped here: fetch the seven JSON files into --data.
For each file the generator runs on every positive with only the matching type enabled and K
negatives asked for; the table gives coverage (share of captions with >= 1 negative), exact match
(the human negative is one of ours, compared after lower-casing and removing punctuation and extra
spaces) and negatives equal to their positive (must be 0). Exact match is a floor for replace_*
and add_* (many replacements are valid; SugarCrepe picked one) but meaningful for swaps.
Then the positives go through `python -m open_clip_hn.negatives generate` (all types, K=4) pinned
to one core; throughput is reported with and without process start-up. `--plausibility audited`
runs the generator with the plausibility filter (coverage with it on); blind accuracy is
`python -m open_clip_hn.negatives audit DIR --generate --plausibility audited`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SugarCrepe file stem -> our type (older copies name objects "ent")
FILES = (
    (("swap_att",), "swap_attributes"),
    (("swap_obj", "swap_ent"), "swap_objects"),
    (("replace_att",), "replace_attribute"),
    (("replace_obj", "replace_ent"), "replace_object"),
    (("replace_rel",), "replace_relation"),
    (("add_att",), "add_attribute"),
    (("add_obj", "add_ent"), "add_object"),
)


def load_pairs(data: Path, stems: tuple[str, ...]) -> tuple[str, list[tuple[str, str]]]:
    """(file name, [(caption, human negative), ...]) of the first stem present in `data`."""
    for stem in stems:
        path = data / f"{stem}.json"
        if path.exists():
            with open(path, encoding="utf-8") as handle:
                items = json.load(handle)
            return path.name, [(v["caption"], v["negative_caption"]) for v in items.values()]
    raise SystemExit(f"error: none of {', '.join(s + '.json' for s in stems)} in --data {data}; fetch "
                     "SugarCrepe's data/ folder (github.com/RAIVNLab/sugar-crepe) there")


def evaluate(pairs: list[tuple[str, str]], type_name: str, k: int, seed: int, plausibility=None
             ) -> dict[str, float]:
    from open_clip_hn.negatives import NegativeGenerator
    from open_clip_hn.negatives.generator import normalise

    generator = NegativeGenerator(types=type_name, seed=seed, plausibility=plausibility)
    covered = matched = equal = 0
    for caption, human in pairs:
        texts = [n["text"] for n in generator.generate(caption, k)]
        covered += bool(texts)
        matched += normalise(human) in {normalise(t) for t in texts}
        equal += sum(normalise(t) == normalise(caption) for t in texts)
    n = len(pairs)
    return {"captions": n, "coverage": covered / n, "exact_match": matched / n, "equal_to_positive": equal}


def _run_generate(path: str, out: str) -> float:
    cmd = ["taskset", "-c", "0"] if sys.platform.startswith("linux") else []
    cmd += [sys.executable, "-m", "open_clip_hn.negatives", "generate", "--input", path, "--output", out,
            "--num", "4"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stderr=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.perf_counter() - start


def cli_throughput(captions: list[str]) -> tuple[float, float | None, float]:
    """(captions/s including start-up, captions/s excluding it, start-up seconds) of `generate`;
    the second is None where the run is too short to tell its work from the start-up's noise."""
    with tempfile.TemporaryDirectory() as tmp:
        full, one, out = (os.path.join(tmp, name) for name in ("all.txt", "one.txt", "out.jsonl"))
        Path(full).write_text("\n".join(captions) + "\n", encoding="utf-8")
        Path(one).write_text(captions[0] + "\n", encoding="utf-8")
        startup = min(_run_generate(one, out) for _ in range(2))
        total = _run_generate(full, out)
    work = total - startup
    return len(captions) / total, len(captions) / work if work > 0.1 * startup else None, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Folder with SugarCrepe's seven JSON files.")
    parser.add_argument("--k", type=int, default=4, help="Negatives asked for per caption. Default: 4.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="Captions per file (0: all). Default: 0.")
    parser.add_argument("--no-throughput", action="store_true", help="Skip the `generate` timing.")
    parser.add_argument("--plausibility", default=None, metavar="{audited,PATH}",
                        help="Run with the plausibility filter: 'audited' (a model of the seven files' "
                             "captions, cross-fitted so no caption is judged by a model that saw it), a "
                             "caption file or a saved model. Default: no filter.")
    args = parser.parse_args()

    data = Path(args.data)
    loaded, positives = [], {}
    for stems, type_name in FILES:
        name, pairs = load_pairs(data, stems)
        if args.limit:
            pairs = pairs[: args.limit]
        positives.update(dict.fromkeys(c for c, _ in pairs))
        loaded.append((name, type_name, pairs))
    model = args.plausibility
    if model == "audited":
        from open_clip_hn.negatives.plausibility import fit

        model = fit(list(positives), source="SugarCrepe captions")
    rows = [(name, type_name, evaluate(pairs, type_name, args.k, args.seed, model))
            for name, type_name, pairs in loaded]

    print(f"SugarCrepe, one type at a time, K={args.k}, seed={args.seed}, plausibility filter: "
          f"{args.plausibility or 'off'}")
    print(f"{'file':<18} {'our type':<18} {'captions':>8} {'coverage':>9} {'exact match':>12} {'= positive':>11}")
    for name, type_name, r in rows:
        print(f"{name:<18} {type_name:<18} {r['captions']:>8} {r['coverage']:>9.1%} {r['exact_match']:>12.1%} "
              f"{r['equal_to_positive']:>11}")
    summary = {type_name: r for _, type_name, r in rows}
    if not args.no_throughput:
        with_startup, steady, startup = cli_throughput(list(positives))
        print(f"`generate`, all types, K=4, one core, {len(positives):,} distinct captions: "
              f"{with_startup:,.0f} captions/s with start-up, "
              f"{'n/a (too few captions)' if steady is None else f'{steady:,.0f}'} without "
              f"(start-up {startup:.2f} s)")
        summary["generate"] = {"captions": len(positives), "captions_per_s": with_startup,
                               "captions_per_s_steady": steady, "startup_s": startup}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
