"""The evaluation folders' captions as they sit on disk, read without images and without torch.

A folder of sets (eval.py's layouts): SugarCrepe `{name}.json` = {id: {"filename", "caption",
"negative_caption"}}, ARO `{name}.json` = [{"image_path", "true_caption", "false_caption"}, ...],
Winoground-style `{name}.jsonl` image pairs, and `retrieval/{key}.txt`. eval.py loads the images
around these readers; the negatives CLI (no torch) reads the captions to exclude with them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Callable, Sequence

SUGARCREPE_KEYS = ("filename", "caption", "negative_caption")
ARO_KEYS = ("image_path", "true_caption", "false_caption")
PAIR_KEYS = ("image_0", "image_1", "caption_0", "caption_1")
NAMED_AT_MOST = 5  # names a message lists before "and N more"


def first_few(names: Sequence[str], limit: int = NAMED_AT_MOST) -> str:
    """`names` for a message: the first `limit`, then how many more, so a long list stays short."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def layout_error(path: str, detail: str) -> ValueError:
    return ValueError(
        f"{path}: {detail}. Expected SugarCrepe layout {{id: {{\"filename\", \"caption\", "
        f"\"negative_caption\"}}}} or ARO layout [{{\"image_path\", \"true_caption\", "
        f"\"false_caption\", ...}}]")


def _unique_keys(path: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """json's object_pairs_hook, refusing a key given twice in one object: json keeps only the
    last, so a SugarCrepe-layout set with a repeated item id lost the earlier items silently."""
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        twice = [repr(key) for key, count in Counter(key for key, _ in pairs).items() if count > 1]
        if twice:
            raise ValueError(f"{path}: the key(s) {first_few(twice)} appear more than once in one "
                             "JSON object (item ids of a SugarCrepe-layout set, or keys of one "
                             "record); JSON keeps only the last, so the others would be dropped: "
                             "give every item its own id")
        return dict(pairs)
    return build


def read_choice_records(path: str) -> tuple[list[tuple[str, dict]], tuple[str, str, str]]:
    """A SugarCrepe- or ARO-layout JSON's (label, record) pairs, validated, and its layout's keys
    (image, true caption, false caption); images are not looked up. A byte-order mark (editors
    on Windows write one) is read past."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f, object_pairs_hook=_unique_keys(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise layout_error(path, f"not valid JSON ({err})") from None
    if isinstance(data, dict):
        records, keys = list(data.values()), SUGARCREPE_KEYS
    elif isinstance(data, list):
        records, keys = data, ARO_KEYS
    else:
        raise layout_error(path, f"top level is a {type(data).__name__}")
    if not records:
        raise ValueError(f"{path}: the set is empty; it needs at least one item")
    labels = [f"item {k!r}" for k in data] if isinstance(data, dict) else \
        [f"item {i} (0-based)" for i in range(len(records))]
    for label, record in zip(labels, records):
        if not isinstance(record, dict) or any(k not in record for k in keys):
            raise layout_error(path, f"{label} lacks one of {', '.join(keys)}")
        wrong = [k for k in keys if not isinstance(record[k], str)]
        if wrong:
            raise layout_error(path, f"{label}: {wrong[0]} is {record[wrong[0]]!r}, not a string")
        empty = [k for k in keys[1:] if not record[k].strip()]
        if empty:  # scored, it would compare the image with no text at all
            raise layout_error(path, f"{label}: {empty[0]} is empty")
    return list(zip(labels, records)), keys


def read_pair_records(path: str) -> list[dict]:
    """A Winoground-style JSONL's records, validated; images are not looked up. A byte-order mark
    is read past, as a .json set's."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: the set is empty; it needs at least one line")
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or any(not isinstance(record.get(k), str) for k in PAIR_KEYS):
            raise ValueError(f"{path}:{number}: expected one JSON object per line with string "
                             f"values for {', '.join(PAIR_KEYS)} (Winoground layout); got "
                             f"{line.strip()[:120]}")
        records.append(record)
    return records


def excluded_captions(path: str | None, flag: str) -> tuple[str, ...]:
    """The captions a generator must never return as negatives (--hn-exclude-negatives, the
    negatives CLI's --exclude); ValueError names `flag`, the path and the fix."""
    if path is None:
        return ()
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path}: no such file or folder; pass an evaluation folder "
                         "(SugarCrepe/ARO layout) or a .txt of captions")
    try:
        return tuple(evaluation_captions(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {path}: {err}") from None


def evaluation_captions(path: str) -> list[str]:
    """The captions true of some image in an evaluation folder (its choice sets' positives, its
    image-pair sets' captions, `retrieval/*.txt`; not the choice negatives, and with or without
    the images), or a .txt file's lines. ValueError names what is wrong."""
    if os.path.isfile(path):
        if os.path.splitext(path)[1].lower() not in ("", ".txt"):
            raise ValueError("expected a folder of evaluation sets or a .txt file with one caption "
                             "per line (a set's .json goes in as its folder)")
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            captions = [line.strip() for line in handle if line.strip()]
    else:
        captions = []
        for name in sorted(os.listdir(path)):
            if name.endswith(".json"):
                records, keys = read_choice_records(os.path.join(path, name))
                captions += [record[keys[1]] for _, record in records]
            elif name.endswith(".jsonl"):
                captions += [record[k] for record in read_pair_records(os.path.join(path, name))
                             for k in ("caption_0", "caption_1")]
        retrieval = os.path.join(path, "retrieval")
        for name in sorted(os.listdir(retrieval)) if os.path.isdir(retrieval) else []:
            if name.endswith(".txt"):
                with open(os.path.join(retrieval, name), encoding="utf-8-sig", errors="replace") as f:
                    captions += [line.strip() for line in f]  # one caption per line
    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ValueError("no captions in it: expected SugarCrepe/ARO-layout *.json, Winoground-"
                         "layout *.jsonl or retrieval/*.txt in a folder, or a .txt of captions")
    return captions
