"""The demo end to end at toy size: data, three training runs, evaluation, table, JSON, plot."""

import json
import os

import pytest
from conftest import env_without_nltk_data

from open_clip_hn import demo

# toy sizes: 128 captions are too few for the recipe's plausibility model (at least 200)
HN_ARGS = "--hn-num-negatives 2 --hn-curriculum const --hn-curriculum-warmup 0 --hn-plausibility none"


def test_summary_targets():
    vanilla = {"replace_relation": {"acc": 0.5}, "swap_attributes": {"acc": 0.9},
               "swap_objects": {"acc": 0.8}, "retrieval": {"image_to_text_R@1": 0.4}}
    hn = {"replace_relation": {"acc": 0.7}, "swap_attributes": {"acc": 0.95},
          "swap_objects": {"acc": 0.8}, "retrieval": {"image_to_text_R@1": 0.39}}
    out = demo.summary(vanilla, hn)
    assert out["relation_gain"] == pytest.approx(0.2)
    assert out["swap_attributes_error_reduction"] == pytest.approx(0.5)
    assert out["swap_objects_error_reduction"] == pytest.approx(0.0)
    assert out["i2t_R@1_change"] == pytest.approx(-0.01)


def test_expected_time_follows_the_stage_sizes():
    low, high = demo.expected_seconds(20000, 1000, 1, 3)  # the defaults: 7.5 min idle, 13.4 shared
    assert (round(low), round(high)) == (450, 802)
    half_low, half_high = demo.expected_seconds(10000, 500, 1, 3)
    assert low / 2 < half_low < low and high / 2 < half_high < high  # start-up does not halve
    assert demo.expected_seconds(20000, 1000, 1, 6)[0] > low + 300  # 3 more epochs of both runs
    toy_low, toy_high = demo.expected_seconds(64, 4, 1, 1)
    assert 4 * demo.STARTUP_SECONDS[0] <= toy_low and toy_high < 4 * demo.STARTUP_SECONDS[1] + 10


def test_logged_average_reads_the_last_epoch_line(tmp_path):
    log = tmp_path / "hn.log"
    log.write_text("x | INFO | Train Epoch: 0 [1/2] Hn_curriculum: 0.0000 (0.0000) Hn_negatives: "
                   "0.0000 (0.0000) Loss: 1\n"
                   "x | INFO | Train Epoch: 0 [2/2] Hn_curriculum: 1.0000 (0.5000) Hn_negatives: "
                   "3.5000 (1.7500) Loss: 1\n")
    assert demo.logged_average(str(log)) == 0.5
    assert demo.logged_average(str(log), "Hn_negatives") == 1.75
    log.write_text("x | INFO | Train Epoch: 0 [2/2] Loss: 1\n")
    assert demo.logged_average(str(log)) is None


def test_an_edited_recipe_is_another_run(tmp_path):
    """Cached runs are keyed on the recipe's contents, the starting checkpoint and the training
    shards too, not only on their paths."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("hn-mirror-weight: 5\n")
    argv = ["--epochs", "1", "--hn-config", str(recipe)]
    before = demo.run_stamp(argv)
    assert demo.run_stamp(list(argv)) == before
    recipe.write_text("hn-mirror-weight: 3\n")
    assert demo.run_stamp(argv) != before
    model = tmp_path / "tiny.json"
    model.write_text('{"embed_dim": 64}')
    sized = demo.run_stamp(["--model-config", str(model)])
    model.write_text('{"embed_dim": 32}')
    assert demo.run_stamp(["--model-config", str(model)]) != sized
    checkpoint = tmp_path / "epoch_1.pt"
    checkpoint.write_bytes(b"weights")
    continued = demo.run_stamp(["--pretrained", str(checkpoint)])
    checkpoint.write_bytes(b"other weights")  # pretraining ran again
    assert demo.run_stamp(["--pretrained", str(checkpoint)]) != continued
    shards = [tmp_path / "a.tar", tmp_path / "b.tar"]
    for shard in shards:
        shard.write_bytes(b"scenes")
    spec = ["--train-data", "::".join(map(str, shards))]
    rendered = demo.run_stamp(spec)
    os.utime(shards[1], ns=(1, 1))  # drawn anew: same size, another time
    assert demo.run_stamp(spec) != rendered


def test_cached_data_is_rendered_anew_when_the_renderer_changes(tmp_path, monkeypatch, capsys):
    from open_clip_hn import scenes
    root = str(tmp_path / "data")
    demo.prepare_data(root, samples=4, test_items=2, samples_per_shard=2)
    demo.prepare_data(root, samples=4, test_items=2, samples_per_shard=2)
    assert "reusing" in capsys.readouterr().out
    monkeypatch.setattr(scenes, "RENDER_VERSION", scenes.RENDER_VERSION + 1)
    demo.prepare_data(root, samples=4, test_items=2, samples_per_shard=2)
    assert "rendering" in capsys.readouterr().out


def test_missing_recipe_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--output-dir", str(tmp_path), "--hn-config", str(tmp_path / "none.yaml")])
    assert "none.yaml does not exist" in capsys.readouterr().err


def test_missing_model_config_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--output-dir", str(tmp_path), "--model-config", str(tmp_path / "none.json")])
    assert "--model-config" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--samples", "0"], "argument --samples: must be >= 1"),
    (["--test-items", "0"], "argument --test-items: must be >= 1"),
    (["--pretrain-epochs", "0"], "argument --pretrain-epochs: must be >= 1"),
    (["--epochs", "0"], "argument --epochs: must be >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["--lr", "-1"], "argument --lr: must be a finite number > 0"),
    (["--continue-lr", "nan"], "argument --continue-lr: must be a finite number > 0"),
    (["--workers", "-1"], "argument --workers: must be >= 0"),
    (["--hn-args", '"unclosed'], "--hn-args '\"unclosed': No closing quotation"),
    (["--hn-args", "--hn-bogus 3"], "unrecognized arguments: --hn-bogus 3 (in the hard-negative run's flags"),
    (["--hn-args", "--hn-mirror-weight 2 --hn-mirror none --hn-converse-weight 0 --hn-converse-margin 0"],
     "--hn-mirror-weight acts on the mirror term"),
    (["--hn-config", "fsc-clip"], "this model does not fit: its image tower is a ResNet"),
    (["--hn-args=--hn-drop-state"], "--hn-drop-state acts on a resume"),
    (["--hn-args", "--epochs 2 --hn-plausibility none"], "--epochs is not a --hn-* flag"),
    (["--hn-args", "--hn-seed 1 --lr=0.1"], "--lr=0.1 is not a --hn-* flag"),
    (["--hn-args", "--train-data 'x/{0..1.tar'"], "--train-data 'x/{0..1.tar': unbalanced braces; close "
                                                  "every '{' with a '}', e.g. 'dir/{000..099}.tar' (in --hn-args)"),
    (["--hn-args", "--train-data 'nowhere/{0..1}.tar'"],
     "--train-data 'nowhere/{0..1}.tar': 2 of 2 shard file(s) not found (first: nowhere/0.tar) (in --hn-args)"),
    (["--samples", "2000"], "the curriculum leaves no step with hard negatives (--hn-curriculum-warmup "
                            "117: 117 of the run's 93 steps"),
])
def test_bad_flags_stop_the_demo_before_any_work(tmp_path, capsys, flags, message):
    """Every value is checked before a scene is rendered or a run trained (a bad one used to
    end in a traceback after minutes of work, or after pretraining for --hn-args)."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        demo.main(["--output-dir", str(out), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_cuda_without_a_cuda_device_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        demo.main(["--output-dir", str(tmp_path / "out"), "--device", "cuda"])
    assert stop.value.code == 2 and "--device cuda: no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_nltk_data_stops_the_demo_before_any_work(tmp_path, monkeypatch):
    """The hard-negative run parses captions (online negatives): without WordNet the demo used
    to render its data and train two runs before the third failed in a loader worker."""
    import subprocess
    import sys

    env = env_without_nltk_data(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.demo", "--output-dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "NLTK's WordNet corpus was not found" in proc.stderr, proc.stderr
    assert not out.exists()
    # precomputed negatives and no converse term parse nothing: no NLTK data needed
    precomputed = ["--hn-negatives", "precomputed", "--hn-num-negatives", "2", "--hn-loss", "itc",
                   "--hn-mirror", "horizontal", "--hn-converse-weight", "0"]
    printed = subprocess.run([sys.executable, "-m", "open_clip_hn.train", "--model", "RN50",
                              *precomputed, "--hn-print-config"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert printed.returncode == 0, printed.stderr
    from open_clip_hn.negatives import NegativeGenerator, NLTKDataError

    def missing(self):
        raise NLTKDataError("no WordNet here")

    monkeypatch.setattr(NegativeGenerator, "load", missing)
    assert demo._caption_parser_problem(demo._printed_config(printed.stdout)) is None
    online = printed.stdout.replace("hn-negatives: precomputed", "hn-negatives: online")
    assert demo._caption_parser_problem(demo._printed_config(online)) == "no WordNet here"


def test_an_unreadable_model_config_or_a_file_as_output_folder_is_named(tmp_path, capsys):
    (tmp_path / "text.pt").write_text("hi")
    for flags, message in ((["--model-config", str(tmp_path / "text.pt")], "not readable JSON"),
                           (["--output-dir", str(tmp_path / "text.pt")], "is a file; pass a folder")):
        with pytest.raises(SystemExit):
            demo.main(["--output-dir", str(tmp_path / "out"), *flags])
        assert message in capsys.readouterr().err


def test_the_model_config_names_the_model(tmp_path):
    data = demo.DemoData("train.tar", "val", "test")
    argv = demo.train_argv(data, str(tmp_path), "run", 1, 8, 1e-3, "cpu", 0, 0, 1,
                           model_config="/configs/my-clip.json")
    assert argv[:4] == ["--model", "my-clip", "--model-config", "/configs/my-clip.json"]
    assert demo.train_argv(data, str(tmp_path), "run", 1, 8, 1e-3, "cpu", 0, 0, 1)[1] == "hn-tiny-rn"


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys):
    document = demo.main(["--output-dir", str(tmp_path), "--samples", "128", "--test-items", "8",
                          "--pretrain-epochs", "1", "--epochs", "1", "--batch-size", "32",
                          "--hn-args", HN_ARGS])
    out = capsys.readouterr().out
    assert "unseen sets (test)" in out and "replace_relation" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(document))
    bench = saved["benchmarks"]["demo sets (val)"]
    assert [r["label"] for r in bench["runs"]] == ["pretrained", "vanilla", "hard-negatives"]
    assert set(bench["targets"]) == {"relation_gain", "i2t_R@1_change",
                                     "swap_attributes_error_reduction",
                                     "swap_objects_error_reduction"}
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    hn_log = str(tmp_path / "runs" / "hard-negatives.log")
    assert demo.logged_average(hn_log) > 0
    assert demo.logged_average(hn_log, "Hn_mirrored") == 1.0  # the recipe mirrors every scene
    # a second run reuses data and checkpoints instead of retraining
    demo.main(["--output-dir", str(tmp_path), "--samples", "128", "--test-items", "8",
               "--pretrain-epochs", "1", "--epochs", "1", "--batch-size", "32",
               "--hn-args", HN_ARGS])
    assert capsys.readouterr().out.count("reusing") == 4
