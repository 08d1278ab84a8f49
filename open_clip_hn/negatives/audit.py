"""`negatives audit`: can a text-only reader tell the negatives from their positives?

For each negative type: coverage, blind accuracy under two language models that never saw the
scored captions (cross-fitted: items are split in two halves by a hash of their positive, each
half is scored by models learned from the other half's positives, or from `--reference`
captions), the cross-validated accuracy of a learned n-gram detector, and the most detectable
examples. Blind accuracy = share of pairs where the reader gives the positive the higher score
(ties count half); 0.5 = no text-only shortcut.

Scorers: `kn3`, the Kneser-Ney trigram model of plausibility.py (with its own split, not the
generator's filter split); `bigram`, an add-0.1 bigram model (another family and smoothing);
`detector`, naive Bayes on the unigrams and bigrams an edit adds and removes, trained on one half
of the pairs and tested on the other. add_* types lengthen the caption, which alone makes any LM
prefer the positive: for them both LMs compare per-token mean log-probabilities (`normalised`).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from ..eval_sets import read_choice_records
from .plausibility import fit, fold_of, tokens

AUDIT_SALT = "audit-fold"
# SugarCrepe's file stems -> our types (older copies name objects "ent")
SUGARCREPE_FILES = {
    "swap_att": "swap_attributes", "swap_obj": "swap_objects", "swap_ent": "swap_objects",
    "replace_att": "replace_attribute", "replace_obj": "replace_object", "replace_ent": "replace_object",
    "replace_rel": "replace_relation", "add_att": "add_attribute", "add_obj": "add_object",
    "add_ent": "add_object",
}
ADDED_WORDS = ("add_attribute", "add_object")
BIGRAM_K = 0.1
NB_ALPHA = 0.5

Pair = tuple[str, str]  # (positive, negative)


class AuditError(ValueError):
    """Audit input that cannot be read."""


def read_sugarcrepe(paths: list[str]) -> dict[str, list[Pair]]:
    """{type: [(caption, negative_caption)]} of SugarCrepe-layout JSON files or folders of them."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    pairs: dict[str, list[Pair]] = {}
    for file in files:
        name = SUGARCREPE_FILES.get(file.stem)
        if name is None:
            raise AuditError(f"{file}: file name does not name a SugarCrepe type; expected one of "
                             f"{', '.join(s + '.json' for s in SUGARCREPE_FILES)}")
        try:  # the evaluation's reader: ids given twice, a byte-order mark, wrong records
            records, (_, true, false) = read_choice_records(str(file))
        except OSError as err:
            raise AuditError(f"{file} cannot be read ({err})") from err
        except ValueError as err:  # names the file and the layout it expects
            raise AuditError(str(err)) from err
        pairs.setdefault(name, []).extend((record[true], record[false]) for _, record in records)
    if not pairs:
        raise AuditError(f"no SugarCrepe JSON files in {', '.join(paths)}")
    return pairs


def generated_pairs(generator, captions: list[str], k: int) -> tuple[dict[str, list[Pair]], dict[str, int]]:
    """Our negatives of `captions`: {type: pairs}, K per caption as training draws them (every
    type of the generator a key, none left out for having no pair), and {type: captions it
    applies to}: with at least one negative of it whatever K (a caption's first round of
    negatives holds one of each type that applies), not only where the K drawn held one."""
    pairs: dict[str, list[Pair]] = {name: [] for name in generator.types}
    covered: Counter = Counter()
    every_type = len(generator.types)
    for caption in captions:
        found = generator.generate(caption, k)
        for n in found:
            pairs.setdefault(n["type"], []).append((caption, n["text"]))
        applying = found if k >= every_type else generator.generate(caption, every_type)
        covered.update({n["type"] for n in applying})
    return pairs, dict(covered)


class BigramLM:
    """Add-k bigram model of a caption set (the second, differently smoothed blind scorer)."""

    def __init__(self, captions: list[str]):
        self.pairs: Counter = Counter()
        self.context: Counter = Counter()
        vocabulary = set()
        for caption in captions:
            words = ["<s>", *tokens(caption), "</s>"]
            vocabulary.update(words)
            self.pairs.update(zip(words, words[1:]))
            self.context.update(words[:-1])
        self.size = len(vocabulary) + 1

    def log_prob(self, text: str) -> tuple[float, int]:
        """(log P(text), predicted tokens)."""
        words = ["<s>", *tokens(text), "</s>"]
        total = sum(math.log((self.pairs[(v, w)] + BIGRAM_K) / (self.context[v] + BIGRAM_K * self.size))
                    for v, w in zip(words, words[1:]))
        return total, len(words) - 1


def _accuracy(differences: list[float]) -> float:
    """Share of pairs where the reader prefers the positive (difference < 0), ties half."""
    return sum(1.0 if d < 0 else 0.5 if d == 0 else 0.0 for d in differences) / max(len(differences), 1)


def _features(text: str) -> Counter:
    words = ["<s>", *tokens(text), "</s>"]
    return Counter(words[1:-1]) + Counter(zip(words, words[1:]))


def detector_accuracy(pairs: list[Pair], folds: list[int]) -> float:
    """Cross-validated accuracy of naive Bayes on the n-grams an edit adds (positive -> negative):
    trained on the pairs of one half, it picks the negative of each pair of the other half."""
    edits = []
    for positive, negative in pairs:
        fp, fn = _features(positive), _features(negative)
        edits.append((fn - fp, fp - fn))  # (added, removed)
    correct = 0.0
    for held in (0, 1):
        added_in_neg: Counter = Counter()  # n-gram -> times an edit put it into the negative
        added_in_pos: Counter = Counter()  # ... or it sat in the positive and was edited away
        for (added, removed), f in zip(edits, folds):
            if f != held:
                added_in_neg.update(added.keys())
                added_in_pos.update(removed.keys())
        total_neg, total_pos = sum(added_in_neg.values()), sum(added_in_pos.values())
        vocabulary = len(set(added_in_neg) | set(added_in_pos)) + 1

        def odds(grams) -> float:  # log-odds that a text holding `grams` is the negative
            return sum(math.log((added_in_neg[g] + NB_ALPHA) / (total_neg + NB_ALPHA * vocabulary))
                       - math.log((added_in_pos[g] + NB_ALPHA) / (total_pos + NB_ALPHA * vocabulary))
                       for g in grams)

        for (added, removed), f in zip(edits, folds):
            if f == held:
                margin = odds(added) - odds(removed)
                correct += 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
    return correct / max(len(pairs), 1)


class Scorers:
    """The two blind LMs, cross-fitted: a positive is scored by models that never saw it."""

    def __init__(self, positives: list[str], reference: list[str] | None = None):
        purpose = "the audit's text-only scorer"
        if reference is None:
            self.kn3 = fit(positives, source="audited captions", salt=AUDIT_SALT, purpose=purpose)
            halves: tuple[list, list] = ([], [])
            for c in set(positives):
                halves[fold_of(tokens(c), AUDIT_SALT)].append(c)
            self.bigram = (BigramLM(halves[0]), BigramLM(halves[1]))
        else:
            scored = {" ".join(tokens(c)) for c in positives}
            kept = [c for c in reference if " ".join(tokens(c)) not in scored]
            source = (f"--reference captions ({len(reference) - len(kept)} of {len(reference)} dropped "
                      "as equal to audited ones)")
            self.kn3 = fit(kept, source=source, salt=AUDIT_SALT, purpose=purpose)
            self.bigram = (BigramLM(kept),) * 2

    def differences(self, pairs: list[Pair], normalise: bool) -> dict[str, list[float]]:
        """log P(negative) - log P(positive) per pair, under each LM."""
        kn3, bigram = [], []
        for positive, negative in pairs:
            kn3.append(self.kn3.difference(positive, negative, normalise=normalise))
            lm = self.bigram[1 - fold_of(tokens(positive), AUDIT_SALT)]
            (lp, np_), (ln, nn) = lm.log_prob(positive), lm.log_prob(negative)
            bigram.append(ln / nn - lp / np_ if normalise else ln - lp)
        return {"kn3": kn3, "bigram": bigram}


def audit_pairs(pairs: list[Pair], scorers: Scorers, name: str, examples: int) -> dict:
    """One type's numbers: blind accuracies, detector accuracy, most detectable examples."""
    normalise = name in ADDED_WORDS
    if not pairs:
        return {"pairs": 0, "normalised": normalise, "equal_to_positive": 0, "blind_kn3": None,
                "blind_bigram": None, "detector": None, "most_detectable": []}
    diffs = scorers.differences(pairs, normalise)
    row = {"pairs": len(pairs), "normalised": normalise,
           "equal_to_positive": sum(" ".join(tokens(p)) == " ".join(tokens(n)) for p, n in pairs)}
    for scorer, values in diffs.items():
        row[f"blind_{scorer}"] = _accuracy(values)
    if normalise:
        row["blind_kn3_raw"] = _accuracy(scorers.differences(pairs, False)["kn3"])
    row["detector"] = detector_accuracy(pairs, [fold_of(tokens(p), AUDIT_SALT) for p, _ in pairs])
    first = {pair: i for i, pair in reversed(list(enumerate(pairs)))}  # a repeated caption once
    worst = sorted(first.values(), key=lambda i: diffs["kn3"][i])[:examples]
    row["most_detectable"] = [{"positive": pairs[i][0], "negative": pairs[i][1],
                               "kn3_difference": round(diffs["kn3"][i], 3)} for i in worst]
    return row


def run_audit(sources: dict[str, tuple[dict[str, list[Pair]], dict[str, float]]], scorers: Scorers,
              examples: int) -> dict:
    """{source: {type: row}} for sources of ({type: pairs}, {type: coverage})."""
    report = {}
    for source, (pairs, coverage) in sources.items():
        report[source] = {}
        for name in sorted(pairs, key=_type_rank):
            row = audit_pairs(pairs[name], scorers, name, examples)
            row["coverage"] = coverage.get(name)
            report[source][name] = row
    return report


def _type_rank(name: str) -> int:
    from .taxonomy import NEGATIVE_TYPES

    return NEGATIVE_TYPES.index(name) if name in NEGATIVE_TYPES else len(NEGATIVE_TYPES)


def format_table(report: dict) -> str:
    """The console table: one row per (source, type)."""
    lines = [f"{'source':<26} {'type':<18} {'pairs':>6} {'coverage':>9} {'kn3':>6} {'bigram':>7} "
             f"{'detector':>9} {'= pos':>6}"]
    for source, rows in report.items():
        for name, r in rows.items():
            coverage = "" if r["coverage"] is None else f"{r['coverage']:.1%}"
            mark = "*" if r["normalised"] else " "
            if not r["pairs"]:
                lines.append(f"{source:<26} {name:<18} {0:>6} {coverage:>9}")
                continue
            lines.append(f"{source:<26} {name:<18} {r['pairs']:>6} {coverage:>9} {r['blind_kn3']:>5.2f}{mark} "
                         f"{r['blind_bigram']:>6.2f}{mark} {r['detector']:>9.2f} {r['equal_to_positive']:>6}")
    lines.append("blind accuracy: share of pairs whose positive the text-only reader prefers (0.50: no "
                 "shortcut); * per-token mean log-probabilities (added words)")
    return "\n".join(lines)


def examples_text(report: dict, per_type: int) -> str:
    lines = []
    for source, rows in report.items():
        for name, r in rows.items():
            for e in r["most_detectable"][:per_type]:
                lines.append(f"{source} {name} ({e['kn3_difference']:+.1f}): {e['positive']!r} -> {e['negative']!r}")
    return "\n".join(lines)


__all__ = ["AuditError", "Scorers", "read_sugarcrepe", "generated_pairs", "run_audit",
           "format_table", "examples_text", "detector_accuracy"]
