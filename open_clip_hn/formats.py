"""Evaluation results in the formats people already merge: CLIP_benchmark JSON, SugarCrepe's table.

CLIP_benchmark (github.com/LAION-AI/CLIP_benchmark, `clip_benchmark/cli.py`) writes one JSON
per (model, pretrained, dataset, language, task) with exactly the keys `dataset`, `model`,
`pretrained`, `task`, `metrics`, `language`, named by its default template
`{dataset}_{pretrained}_{model}_{language}_{task}.json` (dataset with '/' as '_'; a checkpoint
file as its base name). Its `clip_benchmark build` merges such files into one CSV, so ours merge
with theirs. The mapping of our metrics onto theirs:

- a choice set (one image, the true caption and its negatives) is their
  `image_caption_selection` task: `text_acc` = our `acc`; `image_acc` is 1.0, as CLIP_benchmark
  computes it for one image per item (the only image is always the closest), and `acc` = both.
  SugarCrepe's splits keep their CLIP_benchmark names (`sugar_crepe/swap_att`, ...). One
  difference: we count a tie between the true caption and a negative as wrong, their argmax as
  right (ties need identical scores, which only a collapsed model produces);
- a Winoground-style pair set is `image_caption_selection` with `text_acc` = our `text`,
  `image_acc` = our `image`, `acc` = our `group` (the same definitions, but for ties, which we
  count as wrong and their argmax counts as right for the first option);
- retrieval is `zeroshot_retrieval`: `image_retrieval_recall@k` (text -> image) = our
  `text_to_image_R@k`, `text_retrieval_recall@k` (image -> text) = our `image_to_text_R@k`
  (several captions per image as theirs: an image is found when one of its captions is; a tie
  with a wrong candidate counts against the true one, where their top-k breaks it arbitrarily).

SugarCrepe (Hsieh et al., NeurIPS 2023) reports its seven splits grouped as Replace (object,
attribute, relation), Swap (object, attribute) and Add (object, attribute). The baselines are
ViT-B/32 numbers published by vl_compo (Oh et al., "Exploring the Spectrum of Visio-Linguistic
Compositionality and Recognition", CVPRW 2024, arXiv:2406.09388), file `individual_results.csv`
of github.com/ytaek-oh/vl_compo at commit 43e2eae0474c686d99ab463232ec6fa0fb9a8852, rows
`ViT-B-32,openai`, `NegCLIP,coco-ft` and `CE-CLIP,coco-ft`, rounded to two decimals.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Sequence

LANGUAGE = "en"
CHOICE_TASK = "image_caption_selection"
RETRIEVAL_TASK = "zeroshot_retrieval"
# SugarCrepe's split files (and CLIP_benchmark's `sugar_crepe/<split>` names), by group
SUGARCREPE_GROUPS: dict[str, tuple[str, ...]] = {
    "Replace": ("replace_obj", "replace_att", "replace_rel"),
    "Swap": ("swap_obj", "swap_att"),
    "Add": ("add_obj", "add_att"),
}
SUGARCREPE_SPLITS = tuple(s for splits in SUGARCREPE_GROUPS.values() for s in splits)
# Percent accuracy per split; source and commit in the module docstring.
VL_COMPO_BASELINES: dict[str, dict[str, float]] = {
    "CLIP ViT-B/32 (OpenAI)": {"replace_obj": 90.92, "replace_att": 80.08, "replace_rel": 69.20,
                               "swap_obj": 61.22, "swap_att": 63.96,
                               "add_obj": 77.21, "add_att": 68.79},
    "NegCLIP (ViT-B/32)": {"replace_obj": 93.83, "replace_att": 87.94, "replace_rel": 74.40,
                           "swap_obj": 75.92, "swap_att": 77.03,
                           "add_obj": 90.06, "add_att": 85.12},
    "CE-CLIP (ViT-B/32)": {"replace_obj": 94.25, "replace_att": 90.36, "replace_rel": 81.15,
                           "swap_obj": 74.69, "swap_att": 76.58,
                           "add_obj": 92.39, "add_att": 91.91},
}


def _one_decimal(value: float) -> str:
    """`value` to one decimal, halves rounded up as the papers print them (94.25 -> 94.3; the
    format's round-half-even of the binary value would give 94.2)."""
    return str(Decimal(repr(value)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


BASELINE_SOURCE = ("baselines: vl_compo (Oh et al., CVPRW 2024, arXiv:2406.09388), "
                   "individual_results.csv @ 43e2eae")


def file_slug(text: str) -> str:
    """`text` as one file-name part: anything but letters, digits, `.`, `_` and `-` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _task_and_metrics(name: str, metrics: dict[str, float]) -> tuple[str, dict[str, float]]:
    """CLIP_benchmark's task and metric names for one of our sets' results."""
    if name == "retrieval":
        out = {}
        for ours, theirs in (("text_to_image", "image_retrieval"), ("image_to_text", "text_retrieval")):
            out.update({f"{theirs}_recall@{key.rsplit('@', 1)[1]}": value
                        for key, value in metrics.items() if key.startswith(f"{ours}_R@")})
        return RETRIEVAL_TASK, out
    if "group" in metrics:  # Winoground-style pairs
        return CHOICE_TASK, {"image_acc": metrics["image"], "text_acc": metrics["text"],
                             "acc": metrics["group"]}
    accuracy = metrics.get("item_acc", metrics["acc"])  # theirs is per item (ARO's acc is a macro)
    return CHOICE_TASK, {"image_acc": 1.0, "text_acc": accuracy, "acc": accuracy}


def clip_benchmark_records(model: str, pretrained: str, label: str,
                           results: dict[str, dict[str, float]],
                           retrieval_name: str = "retrieval") -> list[tuple[str, dict[str, Any]]]:
    """(file name, CLIP_benchmark record) for each set one checkpoint was scored on.

    File names follow CLIP_benchmark's default template, with the run's label standing for the
    checkpoint (labels are unique per invocation; two `epoch_3.pt` would otherwise collide).
    """
    records = []
    for name, metrics in results.items():
        task, their_metrics = _task_and_metrics(name, metrics)
        if name == "retrieval":
            dataset = retrieval_name
        elif name in SUGARCREPE_SPLITS:
            dataset = f"sugar_crepe/{name}"
        else:
            dataset = name
        record = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
                  "metrics": their_metrics, "language": LANGUAGE}
        file_name = "_".join(file_slug(part) for part in (dataset.replace("/", "_"), label, model,
                                                       LANGUAGE, task)) + ".json"
        records.append((file_name, record))
    return records


def _mean(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def sugarcrepe_columns(labels: Sequence[str], runs: Sequence[dict[str, dict[str, float]]]
                       ) -> tuple[list[str], list[dict[str, float | None]]]:
    """Our runs (percent) then the published baselines, each {split: accuracy or None}."""
    ours = [{split: 100 * r[split]["acc"] if split in r else None for split in SUGARCREPE_SPLITS}
            for r in runs]
    return [*labels, *VL_COMPO_BASELINES], [*ours, *VL_COMPO_BASELINES.values()]


def format_sugarcrepe_table(labels: Sequence[str], runs: Sequence[dict[str, dict[str, float]]]) -> str:
    """SugarCrepe's Replace/Swap/Add table: our runs beside vl_compo's ViT-B/32 baselines.

    Raises ValueError when no run has a SugarCrepe split (sets named after its files).
    """
    if not any(split in r for r in runs for split in SUGARCREPE_SPLITS):
        raise ValueError("--table sugarcrepe: no SugarCrepe split among the sets; it needs sets "
                         f"named after SugarCrepe's files ({', '.join(SUGARCREPE_SPLITS)}.json)")
    names, columns = sugarcrepe_columns(labels, runs)
    rows: list[tuple[str, str, tuple[str, ...]]] = []  # (group, label, the splits it averages)
    for group, splits in SUGARCREPE_GROUPS.items():
        rows += [(group, split.split("_", 1)[1], (split,)) for split in splits]
        rows.append((group, "avg", splits))
    rows.append(("all", "avg", SUGARCREPE_SPLITS))
    header = ["group", "split", *names]
    # a split scored on fewer items than the set holds (missing or unreadable images) is marked
    partial = {(split, column): r[split]["skipped"] for column, r in enumerate(runs)
               for split in SUGARCREPE_SPLITS if r.get(split, {}).get("skipped")}

    def cell(splits: tuple[str, ...], column: int, values: dict[str, float | None]) -> str:
        value = _mean([values[s] for s in splits])
        mark = "*" if any((s, column) in partial for s in splits) else ""
        return "-" if value is None else f"{_one_decimal(value)}{mark}"

    body = [[group, label, *(cell(splits, column, c) for column, c in enumerate(columns))]
            for group, label, splits in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths)))
    notes = [f"(percent; {BASELINE_SOURCE})"]
    if partial:
        notes.append("* scored without some items (missing or unreadable images): " + ", ".join(
            f"{names[column]} {split} ({skipped} skipped)" for (split, column), skipped in partial.items())
            + "; not comparable to the baselines, which score every item")
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body), *notes])

