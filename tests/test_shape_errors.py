"""benchmarks/shape_errors.py: compositional sets split by the words each negative changes, with
the error and the text gap per group (benchmarks/RESULTS.md, session 23)."""

from __future__ import annotations

import open_clip
import pytest
import torch

from conftest import TINY_MODEL, load_benchmark
from open_clip_hn import scenes

shape_errors = load_benchmark("shape_errors")


def test_word_group_names_the_words_a_negative_changes():
    group = shape_errors.word_group
    assert group("a small green cone below a small yellow cylinder",
                 "a small green cylinder below a small yellow cone") == "cone+cylinder"
    assert group("a small purple cylinder below a small white cube",
                 "a small purple cone below a small white cube") == "cylinder -> cone"
    assert group("there is a tiny black ring over a tiny orange star, beside a cyan hexagon",
                 "there is a tiny black star over a tiny orange ring, beside a cyan hexagon") == "ring+star"
    assert group("a huge orange ring on the left of a tiny cyan hexagon",
                 "a huge cyan ring on the left of a tiny orange hexagon") == "cyan+orange"
    assert group("A small purple cylinder.", "a small purple cone") == "cylinder -> cone"  # case, stop
    assert group("a small purple cylinder", "a small purple cone", directed=False) == "cone/cylinder"
    assert group("a cube beside a cube", "a sphere beside a sphere") == shape_errors.OTHER  # not a swap
    assert group("a red cube left of a blue sphere",
                 "a red sphere left of a green cube") == shape_errors.OTHER  # a swap and a replacement
    assert group("a red cube", "a red cube on a table") == shape_errors.OTHER  # not one change
    assert group("a small red cube", "a large blue cube") == shape_errors.OTHER  # four words


def test_group_rows_count_error_and_gap_per_group():
    groups = ["a+b", "a+b", "a+b", "c -> d", "c -> d", "e+f"]
    wrong = torch.tensor([True, False, False, True, True, False])
    gaps = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    rows = shape_errors.group_rows(groups, wrong, gaps, min_items=2)
    assert list(rows) == ["a+b", "c -> d", "all"]  # e+f too small, but counted in 'all'
    assert rows["a+b"][0] == 3 and rows["a+b"][1:] == pytest.approx((1 / 3, 0.2))
    assert rows["c -> d"][1:] == pytest.approx((1.0, 0.6))
    assert rows["all"] == (6, pytest.approx(0.5), pytest.approx(0.45))


def test_shape_errors_prints_a_row_per_group_for_each_checkpoint(tmp_path, tiny_model_config,
                                                                 monkeypatch, capsys):
    sets = tmp_path / "test"
    scenes.write_compositional_sets(str(sets), num_items=60, types=("swap_objects", "replace_object"),
                                    num_pairs=0, num_retrieval=0)
    open_clip.add_model_config(tiny_model_config)
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        checkpoints.append(tmp_path / f"seed{seed}.pt")
        torch.save({"epoch": 1, "state_dict": open_clip.create_model(TINY_MODEL).state_dict()},
                   checkpoints[-1])
    argv = ["shape_errors.py", "--sets", str(sets), "--model-config", tiny_model_config,
            "--min-items", "1", f"a={checkpoints[0]}", f"b={checkpoints[1]}"]
    monkeypatch.setattr("sys.argv", argv)
    shape_errors.main()
    out = capsys.readouterr().out
    assert "== swap_objects (60 items)" in out and "== replace_object (60 items)" in out
    assert "| words | items | a error | a gap | b error | b gap |" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith(("| words", "| ---", "| all"))]
    shapes = [cells[0].replace(" -> ", "+").strip().split("+") for cells in rows]
    assert shapes and all(len(s) == 2 and set(s) <= set(scenes.SHAPES) for s in shapes)
    assert any(cells[3] != cells[5] for cells in rows)  # each checkpoint's own text gaps
    assert "| all | 60 |" in out
    monkeypatch.setattr("sys.argv", [*argv[:5], "--min-items", "1000", "--undirected", *argv[7:]])
    shape_errors.main()
    out = capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")
            and not line.startswith(("| words", "| ---"))] == ["all", "all"]  # only 'all' is left
    monkeypatch.setattr("sys.argv", argv[:5] + ["--kinds", "swap_attributes", f"a={checkpoints[0]}"])
    with pytest.raises(SystemExit):
        shape_errors.main()
    assert "no swap_attributes.json" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", argv[:5] + ["--kinds", ",", f"a={checkpoints[0]}"])
    with pytest.raises(SystemExit):
        shape_errors.main()
    assert "--kinds ','" in capsys.readouterr().err
