"""The `plausibility` and `audit` commands of `python -m open_clip_hn.negatives` (flags and runs)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from ..argtypes import path_value
from ..files import atomic_write_json
from .audit import AuditError, Scorers, examples_text, format_table, generated_pairs, read_sugarcrepe, run_audit
from .cli_common import add_caption_source, excluded, loaded, source_captions
from .plausibility import fit, read_caption_file, resolve

AUDITED = "audited"  # --plausibility value of `audit`: a model of the audited captions


def add_parsers(sub, add_generator_flags: Callable[[argparse.ArgumentParser, int], None]) -> None:
    """Add the `plausibility` and `audit` subcommands."""
    build = sub.add_parser("plausibility", help="Caption file or shards -> a saved plausibility model (.npz).")
    add_caption_source(build)
    build.add_argument("--output", required=True, type=path_value, help="Model file (.npz), written atomically; pass it to "
                                                       "--plausibility / --hn-plausibility.")

    audit = sub.add_parser("audit", help="Can a text-only reader tell negatives from positives? Per type.")
    audit.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="A caption file (txt/csv/tsv/jsonl: audits this generator's negatives of it), "
                            "or SugarCrepe-layout JSON files / folders of them ({id: {'caption', "
                            "'negative_caption'}}, file names like swap_att.json: audits those negatives).")
    audit.add_argument("--caption-key", default="caption",
                       help="Column (csv/tsv) or key (jsonl) holding the caption. Default: caption.")
    audit.add_argument("--generate", action="store_true",
                       help="With SugarCrepe input: also audit this generator's negatives of the same "
                            "captions (each file's type alone).")
    audit.add_argument("--reference", default=None, metavar="PATH",
                       help="Caption file the blind scorers learn from (captions equal to audited ones "
                            "are dropped). Default: the audited captions, cross-fitted in two halves.")
    audit.add_argument("--examples", type=int, default=3, metavar="N",
                       help="Most detectable examples per type to print and save. Default: 3.")
    audit.add_argument("--output", default=None, metavar="PATH.json", type=path_value, help="Full report as JSON, written atomically.")
    add_generator_flags(audit, 1)  # --plausibility also takes 'audited': a model of the audited captions


def run_plausibility_command(args: argparse.Namespace) -> int:
    captions = source_captions(args, read_caption_file)
    model = fit(list(captions), source=args.shards or args.input)
    model.save(args.output)
    print(f"{model} -> {args.output}", file=sys.stderr)
    return 0


def _is_sugarcrepe(inputs: list[str]) -> bool:
    return all(Path(p).is_dir() or Path(p).suffix.lower() == ".json" for p in inputs)


def _generator(args: argparse.Namespace, types, plausibility, exclude: tuple[str, ...],
               vocabulary: frozenset[str] | None):
    from .generator import NegativeGenerator

    return loaded(NegativeGenerator(types=types, seed=args.seed, lm_path=args.lm, vocabulary=vocabulary,
                                    plausibility=plausibility, swap_reorders=args.swap_reorders == "keep",
                                    exclude=exclude))


def _vocabulary(args: argparse.Namespace) -> frozenset[str] | None:
    from .lexicon import read_vocabulary

    return None if args.vocabulary is None else read_vocabulary(args.vocabulary)


def run_audit_command(args: argparse.Namespace) -> int:
    for path in args.inputs + ([args.reference] if args.reference else []):
        if not os.path.exists(path):
            raise AuditError(f"{path} not found; pass a caption file or SugarCrepe-layout JSON files")
    exclude = excluded(args)  # read once, and checked even where nothing is generated
    vocabulary = _vocabulary(args)  # likewise, and given to every generator below
    sugarcrepe = _is_sugarcrepe(args.inputs)
    if not sugarcrepe and len(args.inputs) != 1:
        raise AuditError("audit takes one caption file, or SugarCrepe-layout JSON files/folders")
    if sugarcrepe:
        given = read_sugarcrepe(args.inputs)
        by_type = {name: list(dict.fromkeys(p for p, _ in pairs)) for name, pairs in given.items()}
        positives = list(dict.fromkeys(p for captions in by_type.values() for p in captions))
        sources = {"given": (given, {name: 1.0 for name in given})}
    else:
        positives = read_caption_file(args.inputs[0], args.caption_key)
        by_type = None
        sources = {}
    reference = None if args.reference is None else read_caption_file(args.reference, args.caption_key)
    scorers = Scorers(positives, reference)  # refuses too few captions before generating
    filters = {"ours": None}
    if args.plausibility == AUDITED:
        filters["ours, plausibility"] = fit(positives, source="audited captions")
    elif args.plausibility is not None:
        filters["ours, plausibility"] = resolve(args.plausibility, args.caption_key)
    if sugarcrepe and not args.generate:
        filters = {}
    for label, model in filters.items():
        if by_type is None:
            generator = _generator(args, args.types, model, exclude, vocabulary)
            pairs, covered = generated_pairs(generator, positives, args.num)
            sources[label] = (pairs, {n: covered.get(n, 0) / len(positives) for n in pairs})
        else:
            pairs, coverage = {}, {}
            for name, captions in by_type.items():
                generator = _generator(args, name, model, exclude, vocabulary)
                found, covered = generated_pairs(generator, captions, args.num)
                pairs[name] = found.get(name, [])
                coverage[name] = covered.get(name, 0) / len(captions)
            sources[label] = (pairs, coverage)
    report = run_audit(sources, scorers, args.examples)
    print(format_table(report))
    if args.examples:
        print("\nmost detectable (kn3 log-probability difference, negative - positive):")
        print(examples_text(report, args.examples))
    if args.output:
        atomic_write_json(args.output, {"positives": len(positives), "reference": args.reference,
                                        "num": args.num, "seed": args.seed, "report": report}, indent=1)
        print(f"-> {args.output}", file=sys.stderr)
    return 0
