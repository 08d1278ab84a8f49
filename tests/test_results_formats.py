"""eval's CLIP_benchmark JSON (read back by a reader written against CLIP_benchmark's documented
schema) and SugarCrepe's Replace/Swap/Add table beside the published baselines."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from open_clip_hn import eval as hn_eval
from open_clip_hn import formats, scenes

CONFIG = os.path.join(os.path.dirname(hn_eval.__file__), "model_configs", "hn-tiny-vit.json")
# CLIP_benchmark's README / clip_benchmark/cli.py: one JSON object per file with these keys,
# tasks from its --task choices, metric names from clip_benchmark/metrics/*.py
CLIP_BENCHMARK_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}
CLIP_BENCHMARK_TASKS = {"zeroshot_classification", "zeroshot_retrieval", "linear_probe",
                        "captioning", "image_caption_selection"}
TASK_METRICS = {"image_caption_selection": re.compile(r"(image_acc|text_acc|acc)"),
                "zeroshot_retrieval": re.compile(r"(image|text)_retrieval_recall@\d+")}


def read_clip_benchmark(path: str) -> dict:
    """A CLIP_benchmark result file, checked key by key; returns its `build` CSV row."""
    with open(path) as handle:
        data = json.load(handle)
    assert set(data) == CLIP_BENCHMARK_KEYS, path
    assert data["task"] in CLIP_BENCHMARK_TASKS
    assert all(isinstance(data[k], str) for k in CLIP_BENCHMARK_KEYS - {"metrics"})
    for name, value in data["metrics"].items():
        assert TASK_METRICS[data["task"]].fullmatch(name), name
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    slug = lambda s: s.replace("/", "_")  # their default --output template
    assert os.path.basename(path).startswith(slug(data["dataset"]) + "_")
    assert path.endswith(f"_{data['model']}_{data['language']}_{data['task']}.json")
    row = {**data["metrics"], **{k: v for k, v in data.items() if k != "metrics"}}
    row["model_fullname"] = row["model"] + " " + row["pretrained"]  # as `clip_benchmark build`
    return row


@pytest.fixture(scope="module")
def sugarcrepe_sets(tmp_path_factory):
    """Rendered sets, two of them renamed to SugarCrepe's split files."""
    root = tmp_path_factory.mktemp("sc")
    scenes.write_compositional_sets(str(root), num_items=12, num_pairs=6, num_retrieval=8)
    os.rename(root / "swap_attributes.json", root / "swap_att.json")
    os.rename(root / "replace_relation.json", root / "replace_rel.json")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import open_clip
    open_clip.add_model_config(CONFIG)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": open_clip.create_model("hn-tiny-vit").state_dict()}, path)
    return str(path)


def test_metric_mapping_by_hand():
    records = dict(formats.clip_benchmark_records("M", "/x/epoch_2.pt", "run", {
        "swap_att": {"acc": 0.75, "n": 4, "skipped": 0},
        "pairs": {"text": 0.5, "image": 0.25, "group": 0.125, "n": 8, "skipped": 0},
        "retrieval": {"image_to_text_R@1": 0.3, "text_to_image_R@1": 0.6, "n": 9, "skipped": 0},
    }, retrieval_name="coco"))
    choice = records["sugar_crepe_swap_att_run_M_en_image_caption_selection.json"]
    assert choice == {"dataset": "sugar_crepe/swap_att", "model": "M", "pretrained": "/x/epoch_2.pt",
                      "task": "image_caption_selection", "language": "en",
                      "metrics": {"image_acc": 1.0, "text_acc": 0.75, "acc": 0.75}}
    assert records["pairs_run_M_en_image_caption_selection.json"]["metrics"] == {
        "image_acc": 0.25, "text_acc": 0.5, "acc": 0.125}
    assert records["coco_run_M_en_zeroshot_retrieval.json"]["metrics"] == {
        "image_retrieval_recall@1": 0.6, "text_retrieval_recall@1": 0.3}


def test_eval_writes_clip_benchmark_files_and_sugarcrepe_table(sugarcrepe_sets, checkpoint,
                                                                 tmp_path, capsys):
    out = tmp_path / "cb"
    document = hn_eval.main([
        "--model", "hn-tiny-vit", "--model-config", CONFIG, "--pretrained", checkpoint,
        "--labels", "mine", "--compositional", str(sugarcrepe_sets),
        "--retrieval", str(sugarcrepe_sets / "retrieval"), "--output", str(out),
        "--format", "clip_benchmark", "--table", "sugarcrepe", "--batch-size", "64"])
    rows = {row["dataset"]: row for row in
            (read_clip_benchmark(str(out / name)) for name in sorted(os.listdir(out)))}
    results = document["runs"][0]["results"]
    assert set(rows) == {"sugar_crepe/swap_att", "sugar_crepe/replace_rel", "retrieval",
                         *(n for n in results if n not in ("swap_att", "replace_rel", "retrieval"))}
    assert rows["sugar_crepe/swap_att"]["acc"] == results["swap_att"]["acc"]
    assert rows["relation_pairs"]["acc"] == results["relation_pairs"]["group"]
    assert rows["retrieval"]["text_retrieval_recall@5"] == results["retrieval"]["image_to_text_R@5"]
    assert {row["model_fullname"] for row in rows.values()} == {f"hn-tiny-vit {checkpoint}"}
    table = capsys.readouterr().out
    swap_att = next(line for line in table.splitlines() if line.startswith("Swap ") and " att " in line)
    assert swap_att.split()[2:] == [formats._one_decimal(100 * results['swap_att']['acc']), "64.0", "77.0", "76.6"]
    assert "Replace  obj" in table and "vl_compo" in table
    replace_obj = next(line for line in table.splitlines() if line.startswith("Replace") and " obj " in line)
    assert replace_obj.split()[-1] == "94.3"  # CE-CLIP's 94.25, rounded as the paper prints it
    add_avg = next(line for line in table.splitlines() if line.startswith("Add") and "avg" in line)
    assert add_avg.split()[2:] == ["-", "73.0", "87.6", "92.2"]


def test_bad_format_requests_fail_before_loading(sugarcrepe_sets, tmp_path, capsys):
    (tmp_path / "never-loaded.pt").write_bytes(b"")  # exists (checked first), never read
    base = ["--model", "hn-tiny-vit", "--pretrained", str(tmp_path / "never-loaded.pt")]
    with pytest.raises(SystemExit):
        hn_eval.main([*base, "--compositional", str(sugarcrepe_sets), "--format", "clip_benchmark"])
    assert "give the folder as --output DIR" in capsys.readouterr().err
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(sugarcrepe_sets / "swap_objects.json", plain)
    shutil.copytree(sugarcrepe_sets / "images", plain / "images")
    with pytest.raises(SystemExit):
        hn_eval.main([*base, "--compositional", str(plain), "--table", "sugarcrepe"])
    assert "has no SugarCrepe split" in capsys.readouterr().err
