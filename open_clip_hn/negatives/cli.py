"""`python -m open_clip_hn.negatives`: show, generate, precompute, vocabulary, plausibility, audit, setup-nltk.

`generate` turns a caption file into JSON lines; `precompute` rewrites webdataset shards with a
`<key>.neg.json` member per sample (for `--hn-negatives precomputed`), one shard at a time, each
written to a temp file and renamed, so a killed run resumes by skipping finished shards.
`vocabulary` lists the words of the training captions, for `--hn-vocabulary`. The on-disk formats
(caption files, shard members, `neg.json`) live in `shards.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import signal
import sys
import threading
from functools import partial
from pathlib import Path

from ..argtypes import InputError, argparse_type, optional_path, path_value, positive_int
from ..files import atomic_open
from .generator import NegativeGenerator
from .lexicon import VocabularyError, read_vocabulary
from .parse import normalise_punctuation, unusable_reason
from .cli_common import (add_caption_source, check_output, excluded, existing_shards, input_files, loaded,
                         Stopped, ordered_results, progress, source_captions, worker_pool)
from .shards import MalformedLine, numbered_captions, read_captions, word_counts
from .taxonomy import NEGATIVE_TYPES, parse_types


def _add_generator_flags(parser: argparse.ArgumentParser, num_default: int, per: str = "caption") -> None:
    parser.add_argument("--num", "-k", type=positive_int, default=num_default, metavar="K",
                        help=f"Negatives per {per}. Default: {num_default}.")
    parser.add_argument("--types", type=argparse_type(parse_types), default=NEGATIVE_TYPES, metavar="A,B",
                        help=f"Comma list of types (default: all): {', '.join(NEGATIVE_TYPES)}.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Generator seed; the output is a pure function of the caption, the seed "
                             "and the other flags (the same command gives the same negatives).")
    parser.add_argument("--lm", default=None, metavar="PATH",
                        help="Local masked LM (transformers) proposing replacement words.")
    parser.add_argument("--vocabulary", default=None, metavar="PATH",
                        help="Text file of the words negatives may bring in (a word list, or the "
                             "captions themselves). Default: any lexicon word.")
    parser.add_argument("--plausibility", default=None, metavar="PATH",
                        help="Keep only negatives that read about as plausibly as their positive under "
                             "a trigram model of these captions (a txt/csv/tsv/jsonl caption file, read "
                             "with `generate`'s --caption-key, else its 'caption' column; cached on first "
                             "use) or a model saved by the `plausibility` command. Default: no filter.")
    parser.add_argument("--swap-reorders", choices=("keep", "drop"), default="keep",
                        help="Swap negatives that only put the caption's noun phrases in another "
                             "order ('a dog chasing a cat' -> 'a cat chasing a dog'): keep (the "
                             "default) or drop, so swaps only rebind (as --hn-swap-reorders).")
    parser.add_argument("--exclude", type=optional_path, default=None, metavar="PATH",
                        help="Never return these captions as negatives (as --hn-exclude-negatives; "
                             "compared ignoring case and punctuation): a folder of SugarCrepe/ARO-"
                             "layout evaluation sets (its choice positives, image-pair and "
                             "retrieval captions) or a .txt, one caption per line; 'none' (the default): "
                             "no exclusion.")


def _generator(args: argparse.Namespace) -> NegativeGenerator:
    """The flags' generator, loaded: a bad --lm or --vocabulary fails here, before any output."""
    vocabulary = None if args.vocabulary is None else read_vocabulary(args.vocabulary)
    plausibility = args.plausibility
    if plausibility is not None and args.command == "generate":  # a csv/tsv/jsonl: --caption-key's column
        from .plausibility import resolve

        plausibility = resolve(plausibility, args.caption_key)
    return loaded(NegativeGenerator(types=args.types, seed=args.seed, lm_path=args.lm,
                                    vocabulary=vocabulary, plausibility=plausibility,
                                    swap_reorders=args.swap_reorders == "keep", exclude=excluded(args)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_hn.negatives",
        description="Typed synthetic text hard negatives (NLTK + WordNet).")
    sub = parser.add_subparsers(dest="command", required=True)

    show = sub.add_parser("show", help="Print each type's negatives for a caption.")
    show.add_argument("caption", help="The caption, in quotes.")
    _add_generator_flags(show, 3, per="type")

    gen = sub.add_parser("generate", help="Caption file (txt/csv/tsv/jsonl) -> JSON lines of negatives.")
    gen.add_argument("--input", required=True,
                     help="captions.txt (one per line; a file without extension too), .csv, .tsv or "
                          ".jsonl; other extensions are refused.")
    gen.add_argument("--caption-key", default="caption",
                     help="Column (csv/tsv) or key (jsonl) holding the caption. Default: caption.")
    gen.add_argument("--output", required=True, type=path_value,
                     help="Output .jsonl, written atomically: per caption read, {line, caption, "
                          "negatives}, where line is its input line (CSV row) number and caption the "
                          "text the negatives were made from.")
    gen.add_argument("--workers", type=positive_int, default=1, help="Worker processes. Default: 1.")
    gen.add_argument("--strict", action="store_true", help="Fail on the first malformed input line.")
    _add_generator_flags(gen, 4)

    pre = sub.add_parser("precompute", help="Write webdataset shards with <key>.neg.json added.")
    pre.add_argument("--shards", required=True,
                     help="Input shards: a brace pattern 'in-{000000..000009}.tar' or a '::' list.")
    pre.add_argument("--output-dir", required=True, help="Folder for the output shards (same names).")
    pre.add_argument("--caption-key", default="txt", type=str.lower,
                     help="Member extension holding the caption, in any case (webdataset reads "
                          "extensions in lower case: .TXT is txt). Default: txt.")
    pre.add_argument("--workers", type=positive_int, default=1,
                     help="Shards processed in parallel. Default: 1.")
    pre.add_argument("--allow-damaged", action="store_true",
                     help="Keep the readable samples of a truncated or corrupt input shard (counted "
                          "in a warning and the manifest) instead of failing on it.")
    _add_generator_flags(pre, 4)

    voc = sub.add_parser("vocabulary", help="Words of the training captions -> a --hn-vocabulary file.")
    add_caption_source(voc)
    voc.add_argument("--min-count", type=positive_int, default=1, metavar="N",
                     help="Keep words seen at least N times (drops typos). Default: 1.")
    voc.add_argument("--output", required=True, type=path_value,
                     help="Word list (one per line), written atomically.")

    from .audit_cli import add_parsers

    add_parsers(sub, _add_generator_flags)

    setup = sub.add_parser("setup-nltk", help="Install WordNet for NLTK offline from Debian's wordnet packages.")
    setup.add_argument("--target", default=None,
                       help="nltk_data folder to install into. Default: first writable entry of nltk.data.path.")
    setup.add_argument("--source", default="/usr/share/wordnet", help="Debian's WordNet database folder.")
    setup.add_argument("--man-page", default="/usr/share/man/man5/lexnames.5WN.gz",
                       help="The lexnames(5WN) man page of wordnet-base.")
    return parser


# ---- caption files ---------------------------------------------------------------------------

def _generate_one(generator: NegativeGenerator, k: int, caption: object) -> list[dict[str, str]]:
    return generator.generate(caption, k)


def run_generate(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.input):
        raise InputError(f"caption file {args.input} not found (--input)")
    generator = _generator(args)
    captions, malformed = [], 0
    for number, item in numbered_captions(args.input, args.caption_key):
        if isinstance(item, MalformedLine):
            if args.strict:
                print(f"error: {args.input}: {item}", file=sys.stderr)
                return 2
            print(f"warning: {args.input}: {item}; skipped", file=sys.stderr)
            malformed += 1
            continue
        captions.append((number, item))
    if not captions:
        raise InputError(f"{args.input}: no caption to process ({malformed} malformed line(s)); "
                         "check the file and --caption-key")
    work = partial(_generate_one, generator, args.num)
    texts = [caption for _, caption in captions]
    with atomic_open(args.output, "w", encoding="utf-8") as handle:
        if args.workers > 1:  # forked workers inherit what the parent loaded; spawned ones load it
            with worker_pool(args.workers, generator.load) as pool:
                masked = _write_results(handle, captions, ordered_results(pool, work, texts, chunksize=256))
        else:
            masked = _write_results(handle, captions, map(work, texts))
        if masked == len(captions):  # raised inside: the output is not written
            reason = unusable_reason(texts[0]) or "it has nothing the negative types change"
            raise InputError(f"{args.input}: none of its {len(captions)} captions got a negative (the "
                             f"first, line {captions[0][0]}: {reason}); check the file and --caption-key "
                             "(`show CAPTION` explains one caption)")
    print(f"{len(captions)} captions, {masked} without negatives (masked), {malformed} malformed lines "
          f"skipped -> {args.output}", file=sys.stderr)
    return 0


def _write_results(handle, captions: list[tuple[int, str]], results) -> int:
    masked = 0
    for (number, caption), negatives in zip(captions, progress(results, total=len(captions), unit="cap")):
        masked += not negatives
        record = {"line": number, "caption": normalise_punctuation(caption).strip() if negatives else caption,
                  "negatives": negatives}
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return masked


# ---- webdataset shards ---------------------------------------------------------------------------

def run_precompute(args: argparse.Namespace) -> int:
    from .precompute import precompute

    shards = existing_shards(args.shards, unique_because="the output shards keep their input's name")
    generator = _generator(args)  # a bad --vocabulary or --lm fails here, before the folder is claimed
    return precompute(shards, args.output_dir, generator, args.num, args.caption_key,
                      workers=args.workers, allow_damaged=args.allow_damaged,
                      vocabulary=args.vocabulary, lm=args.lm)


def run_vocabulary(args: argparse.Namespace) -> int:
    malformed: list[MalformedLine] = []

    def file_captions(path: str, key: str):
        for caption in read_captions(path, key):
            if isinstance(caption, MalformedLine):
                malformed.append(caption)
            else:
                yield caption

    counts, total = word_counts(source_captions(args, file_captions))
    if malformed:
        print(f"warning: {args.input}: {len(malformed)} malformed line(s) skipped (the first, "
              f"{malformed[0]})", file=sys.stderr)
    words = sorted(w for w, n in counts.items() if n >= args.min_count)
    if not words:
        where = (f"members '.{args.caption_key or 'txt'}' of the shards" if args.shards
                 else f"lines of {args.input}" if Path(args.input).suffix.lower() in ("", ".txt")
                 else f"column/key '{args.caption_key or 'caption'}' of {args.input}")
        print(f"error: no word seen {args.min_count} time(s) in {total} usable captions (read from the "
              f"{where}); check --caption-key and --min-count", file=sys.stderr)
        return 2
    with atomic_open(args.output, "w", encoding="utf-8") as handle:
        handle.write("\n".join(words) + "\n")
    print(f"{len(words)} words (of {len(counts)}) from {total} usable captions -> {args.output}",
          file=sys.stderr)
    return 0


def run_show(args: argparse.Namespace) -> int:
    generator = _generator(args)
    found = generator.candidates(args.caption)
    unfiltered = _unfiltered_candidates(generator, args.caption)
    print(f"caption: {args.caption}")
    if not found:
        reason = (unusable_reason(args.caption) or
                  (f"every one was removed by {_filters(args)}" if unfiltered
                   else "it has nothing the negative types change"))
        print(f"  (no negatives: {reason})")
    for name in generator.types:
        texts = found.get(name, [])[: args.num]
        print(f"{name}:" + ("" if texts else _why_none(args, unfiltered.get(name, []))))
        for text in texts:
            print(f"  {text}")
    return 0


def _unfiltered_candidates(generator: NegativeGenerator, caption: str) -> dict[str, list[str]]:
    """The candidates before --exclude and --vocabulary, so `show` can tell a type that does not
    apply from one whose every negative those filters removed."""
    if not generator.exclude and generator.vocabulary is None:
        return {}
    bare = copy.copy(generator)
    bare.exclude, bare.vocabulary = frozenset(), None
    return bare.candidates(caption)


def _filters(args: argparse.Namespace) -> str:
    return " or ".join(flag for flag, value in (("--exclude", args.exclude),
                                               ("--vocabulary", args.vocabulary)) if value)


def _why_none(args: argparse.Namespace, unfiltered: list[str]) -> str:
    return f" (all {len(unfiltered)} removed by {_filters(args)})" if unfiltered else " (does not apply)"


def run_setup(args: argparse.Namespace) -> int:
    from .nltk_data import setup_nltk

    corpus = setup_nltk(args.target, args.source, args.man_page)
    print(f"WordNet installed for NLTK in {corpus}")
    if args.target and os.path.abspath(str(Path(args.target))) not in map(os.path.abspath, _nltk_paths()):
        target = shlex.quote(os.path.abspath(args.target))  # a job may start in another folder
        print(f"note: {args.target} is not in NLTK's search path; export NLTK_DATA={target}")
    return 0


def _nltk_paths() -> list[str]:
    from .nltk_data import default_search_paths

    return default_search_paths()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "setup-nltk":
        try:
            return run_setup(args)
        except (OSError, ValueError) as err:  # no WordNet at --source, a --target not writable
            print(f"error: {err}", file=sys.stderr)
            return 2
    from .audit import AuditError
    from .audit_cli import run_audit_command, run_plausibility_command
    from .nltk_data import NLTKDataError
    from .plausibility import PlausibilityError

    in_main_thread = threading.current_thread() is threading.main_thread()  # main() may be embedded
    previous = signal.signal(signal.SIGTERM, _stop) if in_main_thread else None
    try:
        if getattr(args, "output", None) is not None:
            check_output("--output", args.output, input_files(args))
        return {"show": run_show, "generate": run_generate, "precompute": run_precompute,
                "vocabulary": run_vocabulary, "audit": run_audit_command,
                "plausibility": run_plausibility_command}[args.command](args)
    except (NLTKDataError, VocabularyError, PlausibilityError, AuditError, InputError,
            OSError) as err:  # InputError covers ManifestError and LMError
        if isinstance(err, BrokenPipeError) and args.command == "show":  # `show | head`: read enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
            return 0
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as stop:
        resumes = " (a rerun resumes at its first unfinished shard)" if args.command == "precompute" else ""
        print(f"{'interrupted' if isinstance(stop, KeyboardInterrupt) else f'stopped by {stop}'}: every "
              f"output is written whole or not at all{resumes}", file=sys.stderr)
        return 130 if isinstance(stop, KeyboardInterrupt) else stop.status
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _stop(signum: int, frame) -> None:
    raise Stopped(signum)
