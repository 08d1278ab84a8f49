"""Throughput of the text hard-negative generator on one core (steady state), start-up separately.

    python benchmarks/negatives.py [--captions N] [--k 4]

The corpus is made here: COCO-style captions composed from templates over the lexicons (objects,
attributes, counts, relations, verbs), plus the held-out captions of tests/data. Start-up is
measured in a fresh process (import + loading the cached WordNet tables); the first run of a new
cache also reports the one-off cache build. Pinned to one core with os.sched_setaffinity.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPLATES = (
    "{A} {adj} {obj} {rel} {a} {adj2} {obj2}.",
    "{Num} {adj} {objs} {verb_ing} {a} {obj2} {rel} {the} {obj3}.",
    "{A} {obj} is {verb_ing} {a} {adj2} {obj2}.",
    "{The} {adj} {obj} and {a} {adj2} {obj2} {rel} {the} {obj3}",
    "{A} {obj} {verb_ing} next to {a} {obj2} in {the} {obj3}.",
    "{Num} {objs} are {verb_ing} on {a} {adj2} {obj2}.",
)


def make_corpus(n: int, seed: int = 0) -> list[str]:
    from open_clip_hn.negatives.edits import article_for
    from open_clip_hn.negatives.generator import _resources

    res = _resources()
    rng = random.Random(seed)
    objects = sorted(res.plurals)
    adjectives = sorted(w for c in ("color", "size", "material", "texture") for w in res.categories[c])
    relations = sorted(r for r in res.relations if len(r.split()) <= 4)
    verbs = sorted(res.verb_table)
    numbers = ["two", "three", "four", "five", "2", "3"]
    held_out = (ROOT / "tests" / "data" / "coco_style_captions.txt").read_text().splitlines()
    captions = []
    for i in range(n):
        if i % 5 == 0:
            captions.append(held_out[i // 5 % len(held_out)])
            continue
        obj, obj2, obj3 = rng.sample(objects, 3)
        adj, adj2 = rng.sample(adjectives, 2)
        text = rng.choice(TEMPLATES).format(
            A=article_for(adj).capitalize(), a=article_for(adj2), The="The", the="the",
            adj=adj, adj2=adj2, obj=obj, obj2=obj2, obj3=obj3, objs=res.plurals[obj], rel=rng.choice(relations),
            Num=rng.choice(numbers).capitalize(), verb_ing=res.verb_table[rng.choice(verbs)]["ing"])
        captions.append(text)
    return captions


STARTUP = ("import sys, time; t = time.perf_counter(); from open_clip_hn.negatives import NegativeGenerator; "
           "g = NegativeGenerator(plausibility=sys.argv[1] or None).load(); "
           "g.generate('a red cube to the left of a blue sphere', 4); print(time.perf_counter() - t)")


def startup_seconds(plausibility: str = "") -> float:
    """Seconds from a fresh process to its first negatives (with a cached plausibility model if given)."""
    out = subprocess.run([sys.executable, "-c", STARTUP, plausibility], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return float(out.stdout.strip())


def steady_rate(generator, captions: list[str], k: int) -> tuple[float, int]:
    """(captions/s after a warm-up, negatives produced) of one generator over the corpus."""
    for caption in captions[:500]:
        generator.generate(caption, k)  # warm the per-word caches
    start = time.perf_counter()
    produced = sum(len(generator.generate(caption, k)) for caption in captions)
    return len(captions) / (time.perf_counter() - start), produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=20_000, metavar="N",
                        help="Size of the generated caption corpus (its first 2,000 time each type "
                             "alone). Default: 20000.")
    parser.add_argument("--k", type=int, default=4, help="Negatives per caption. Default: 4.")
    parser.add_argument("--plausibility", default=None, metavar="PATH",
                        help="Caption file or saved model for the plausibility filter's row. Default: "
                             "a model of the benchmark's own corpus (saved once to a temp file).")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    first = startup_seconds()  # builds the WordNet cache if this is the first run
    startup = min(startup_seconds() for _ in range(3))

    from open_clip_hn.negatives import NEGATIVE_TYPES, NegativeGenerator

    captions = make_corpus(args.captions)
    rate, produced = steady_rate(NegativeGenerator(seed=0).load(), captions, args.k)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.plausibility
        if model_path is None:
            from open_clip_hn.negatives.plausibility import fit

            model_path = os.path.join(tmp, "plausibility.npz")
            fit(captions, source="benchmark corpus").save(model_path)
        filtered = NegativeGenerator(seed=0, plausibility=model_path).load()
        rate_on, produced_on = steady_rate(filtered, captions, args.k)
        startup_on = min(startup_seconds(model_path) for _ in range(3))

    per_type, sample = {}, captions[:2000]
    for name in NEGATIVE_TYPES:
        single = NegativeGenerator(types=name, seed=0)
        t0 = time.perf_counter()
        count = sum(1 for c in sample if single.generate(c, args.k))
        per_type[name] = (len(sample) / (time.perf_counter() - t0), count / len(sample))

    rows = [("steady state, all types", f"{rate:,.0f} captions/s", "target >= 2,000"),
            ("  with the plausibility filter", f"{rate_on:,.0f} captions/s", "target >= 2,000"),
            ("negatives per caption", f"{produced / len(captions):.2f}", f"K = {args.k}"),
            ("  with the plausibility filter", f"{produced_on / len(captions):.2f}", f"K = {args.k}"),
            ("start-up (cached tables)", f"{startup:.2f} s", "target <= 3 s"),
            ("  with the cached plausibility model", f"{startup_on:.2f} s", "target <= 3 s"),
            ("first start-up (may build cache)", f"{first:.2f} s", "one-off")]
    rows += [(f"  only {name}", f"{rate:,.0f} captions/s", f"applies to {share:.0%}")
             for name, (rate, share) in per_type.items()]
    width = max(len(r[0]) for r in rows)
    print(f"text hard negatives on one core, {len(captions):,} captions, K={args.k}")
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>20}  {note}")
    print(json.dumps({"captions_per_s": rate, "startup_s": startup, "captions_per_s_plausibility": rate_on,
                      "startup_s_plausibility": startup_on}))


if __name__ == "__main__":
    main()
