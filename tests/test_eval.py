"""Compositional evaluation: pure scorers, agreement with an independent scorer, bad input."""

import contextlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from open_clip_hn import eval as hn_eval
from open_clip_hn import scenes

CONFIG = os.path.join(os.path.dirname(hn_eval.__file__), "model_configs", "hn-tiny-vit.json")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    scenes.write_compositional_sets(str(root), num_items=60, num_pairs=30, num_retrieval=40)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model saved the way open_clip_train saves (DDP 'module.' prefix)."""
    import open_clip
    open_clip.add_model_config(CONFIG)
    torch.manual_seed(0)
    model = open_clip.create_model("hn-tiny-vit")
    path = tmp_path_factory.mktemp("ckpt") / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "t", "state_dict":
                {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return str(path)


def test_choice_correct_counts_ties_as_wrong():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    options = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],   # true wins
                            [[0.0, 1.0], [1.0, 0.0]],   # negative wins
                            [[1.0, 0.0], [1.0, 0.0]]])  # tie
    assert hn_eval.choice_correct(image, options).tolist() == [True, False, False]


def test_pair_scores_by_hand():
    # scores[n, caption i, image j]
    right = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    text_only = torch.tensor([[2.0, 3.0], [1.0, 4.0]])  # c0>c1 on i0, c1>c0 on i1; c0 prefers i1
    result = hn_eval.pair_scores(torch.stack([right, text_only]))
    assert result == {"text": 1.0, "image": 0.5, "group": 0.5}


def test_retrieval_recall_by_hand():
    images = torch.eye(6)
    texts = torch.eye(6)[[0, 1, 2, 3, 5, 4]]  # pairs 4 and 5 swapped
    result = hn_eval.retrieval_recall(images, texts, ks=(1, 5))
    assert result["image_to_text_R@1"] == pytest.approx(4 / 6)
    assert result["text_to_image_R@1"] == pytest.approx(4 / 6)
    # image 4's own caption scores 0 for it: below caption 5 (which holds image 4's vector) and
    # tied with the other four, each tie counting against it, so it ranks sixth
    assert result["image_to_text_R@5"] == pytest.approx(4 / 6)


def test_diverged_model_scores_zero_not_perfect():
    nan = torch.full((4, 3), float("nan"))
    assert hn_eval.retrieval_recall(nan, nan, ks=(1,)) == {"image_to_text_R@1": 0.0,
                                                           "text_to_image_R@1": 0.0}
    assert not hn_eval.choice_correct(nan, torch.full((4, 2, 3), float("nan"))).any()
    assert hn_eval.pair_scores(torch.full((2, 2, 2), float("nan")))["group"] == 0.0


def _independent_accuracy(model, preprocess, tokenizer, json_path):
    """Item by item, no batching, with its own file handling: the reference scorer."""
    from PIL import Image
    data = json.load(open(json_path))
    correct = 0
    with torch.no_grad():
        for item in data.values():
            image = Image.open(os.path.join(os.path.dirname(json_path), "images",
                                            item["filename"])).convert("RGB")
            f_img = model.encode_image(preprocess(image)[None])[0]
            f_pos = model.encode_text(tokenizer([item["caption"]]))[0]
            f_neg = model.encode_text(tokenizer([item["negative_caption"]]))[0]
            cos = torch.nn.functional.cosine_similarity
            correct += int(cos(f_img, f_pos, dim=0) > cos(f_img, f_neg, dim=0))
    return correct / len(data)


def test_agrees_with_independent_scorer(sets, checkpoint):
    model, preprocess, tokenizer = hn_eval.load_model("hn-tiny-vit", checkpoint,
                                                      model_configs=[CONFIG])
    flat = hn_eval.evaluate_compositional(model, preprocess, tokenizer, str(sets), batch_size=17)
    for kind in scenes.COMPOSITIONAL_TYPES:
        reference = _independent_accuracy(model, preprocess, tokenizer, sets / f"{kind}.json")
        assert abs(flat[f"compositional/{kind}/acc"] - reference) <= 0.005, kind
    assert {"compositional/relation_pairs/group", "retrieval/image_to_text_R@1"} <= set(flat)
    assert not model.training


def test_encode_choice_set_scores_like_the_evaluation(sets, checkpoint):
    """The diagnostics' per-item features: the same accuracy as `evaluate_sets`, with each row's
    options being its caption and then its negative."""
    model, preprocess, tokenizer = hn_eval.load_model("hn-tiny-vit", checkpoint,
                                                      model_configs=[CONFIG])
    choice_set = hn_eval.load_choice_set(str(sets / "swap_objects.json"))
    images, options = hn_eval.encode_choice_set(model, preprocess, tokenizer, choice_set, "cpu", 17)
    assert images.shape[0] == options.shape[0] == len(choice_set.items) and options.shape[1] == 2
    caption, negative = choice_set.items[3][2]
    alone = hn_eval.encode_texts(model, tokenizer, [caption, negative], "cpu", 2, contextlib.nullcontext)
    assert torch.allclose(options[3], alone, atol=1e-5)
    accuracy = hn_eval.choice_correct(images, options).float().mean().item()
    assert accuracy == pytest.approx(hn_eval.evaluate_sets(model, preprocess, tokenizer, [choice_set],
                                                           batch_size=17)["swap_objects"]["acc"])


def test_chance_levels_are_what_a_random_scorer_gets():
    """The plot's dotted chance lines: Winoground's pair scores of random similarities, and one
    over the captions per item of a choice set (5 for ARO's order sets, 2 when not recorded)."""
    random_pairs = hn_eval.pair_scores(torch.rand(200_000, 2, 2, generator=torch.Generator().manual_seed(0)))
    for metric in ("text", "image", "group"):
        assert random_pairs[metric] == pytest.approx(hn_eval.chance_level({}, metric), abs=0.005)
    assert hn_eval.chance_level({"acc": 0.9, "options": 5}, "acc") == 0.2
    assert hn_eval.chance_level({"acc": 0.9}, "item_acc") == 0.5
    assert hn_eval.chance_level({"image_to_text_R@1": 0.5}, "image_to_text_R@1") is None


def test_cli_side_by_side_writes_json_and_plot(sets, checkpoint, tmp_path, capsys):
    document = hn_eval.main([
        "--model", "hn-tiny-vit", "--model-config", CONFIG, "--pretrained", checkpoint,
        checkpoint, "--labels", "vanilla", "hn", "--compositional", str(sets),
        "--retrieval", str(sets / "retrieval"), "--output", str(tmp_path / "r.json"),
        "--plot", str(tmp_path / "r.png"), "--batch-size", "64"])
    out = capsys.readouterr().out
    assert "replace_relation" in out and "Δ hn" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(document))
    assert [r["label"] for r in saved["runs"]] == ["vanilla", "hn"]
    assert all(v == 0 for v in saved["differences_vs_first"]["hn"].values())
    assert saved["runs"][0]["results"]["swap_objects"]["options"] == 2
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_aro_layout_with_crop(tmp_path, sets):
    shutil.copytree(sets / "images", tmp_path / "images")
    items = json.loads((sets / "replace_relation.json").read_text())
    aro = [{"image_path": v["filename"], "true_caption": v["caption"],
            "false_caption": v["negative_caption"], "bbox_x": 0, "bbox_y": 0, "bbox_w": 32,
            "bbox_h": 32} for v in items.values()]
    (tmp_path / "visual_genome_relation.json").write_text(json.dumps(aro))
    loaded = hn_eval.load_choice_set(str(tmp_path / "visual_genome_relation.json"))
    assert len(loaded.items) == len(items) and loaded.items[0][1] == (0, 0, 32, 32)
    assert loaded.items[0][2] == [items["0"]["caption"], items["0"]["negative_caption"]]


def test_missing_image_is_skipped_and_counted(tmp_path, sets, checkpoint, caplog):
    data = json.loads((sets / "swap_objects.json").read_text())
    shutil.copytree(sets / "images", tmp_path / "images")
    os.remove(tmp_path / "images" / data["3"]["filename"])
    (tmp_path / "swap_objects.json").write_text(json.dumps(data))
    model, preprocess, tokenizer = hn_eval.load_model("hn-tiny-vit", checkpoint,
                                                      model_configs=[CONFIG])
    choice, pairs = hn_eval.discover_sets(str(tmp_path))
    results = hn_eval.evaluate_sets(model, preprocess, tokenizer, choice, pairs)
    assert results["swap_objects"]["skipped"] == 1 and results["swap_objects"]["n"] == 59
    assert "skipped 1" in caplog.text


@pytest.mark.parametrize("content, message", [
    ('{"0": {"image": "a.png", "text": "x"}}', "lacks one of filename, caption"),
    ('"just a string"', "top level is a str"),
    ("{not json", "not valid JSON"),
    ("{}", "empty"),
    ("[]", "empty"),
])
def test_bad_json_names_file_and_layout(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        hn_eval.load_choice_set(str(path))
    assert str(path) in str(err.value)


def test_all_images_missing_and_bad_folders(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(
        {"0": {"filename": "nope.png", "caption": "a", "negative_caption": "b"}}))
    with pytest.raises(FileNotFoundError, match="s.json: none of its 1 items has a usable image \\(1 not found"):
        hn_eval.load_choice_set(str(tmp_path / "s.json"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hn_eval.discover_sets(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.json or \\*.jsonl sets"):
        hn_eval.discover_sets(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        hn_eval.load_retrieval_set(str(tmp_path / "empty"))
    (tmp_path / "p.jsonl").write_text('{"image_0": "x.png"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1: .*Winoground"):
        hn_eval.load_pair_set(str(tmp_path / "p.jsonl"))


def test_checkpoint_of_another_architecture(tmp_path, checkpoint):
    other = dict(json.load(open(CONFIG)))
    other["embed_dim"] = 32
    config = tmp_path / "hn-other-vit.json"
    config.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="does not fit model 'hn-other-vit'"):
        hn_eval.load_model("hn-other-vit", checkpoint, model_configs=[str(config)])
    # a model whose text context differs: OpenCLIP's resize_pos_embed asserts before any key is
    # compared, which said "is it complete?" as if the file were damaged
    longer = dict(json.load(open(CONFIG)))
    longer["text_cfg"] = {**longer["text_cfg"], "context_length": 2 * longer["text_cfg"]["context_length"],
                          "width": 2 * longer["text_cfg"]["width"]}
    (tmp_path / "hn-wide-text.json").write_text(json.dumps(longer))
    with pytest.raises(ValueError, match="does not fit model 'hn-wide-text'") as err:
        hn_eval.load_model("hn-wide-text", checkpoint, model_configs=[str(tmp_path / "hn-wide-text.json")])
    assert "cannot be loaded" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hn_eval.load_model("hn-tiny-vit", str(tmp_path / "missing.pt"), model_configs=[CONFIG])
    data = open(checkpoint, "rb").read()
    for name, content in (("cut.pt", data[: len(data) // 2]), ("garbage.pt", b"hello" * 100)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"checkpoint {tmp_path / name} cannot be loaded"):
            hn_eval.load_model("hn-tiny-vit", str(tmp_path / name), model_configs=[CONFIG])


def test_a_mistyped_pretrained_tag_is_named_before_any_checkpoint_is_scored(sets, checkpoint, capsys):
    """`--pretrained opneai`: exit 2 naming the flag and the model's tags (open_clip raises a
    bare RuntimeError once loading began), for every checkpoint before the first is scored; the
    loader the demo and `neighbors build` use says the same, before downloading anything."""
    with pytest.raises(SystemExit) as exit_:
        hn_eval.main(["--model", "hn-tiny-vit", "--model-config", CONFIG, "--pretrained", checkpoint,
                      "opneai", "--compositional", str(sets)])
    printed = capsys.readouterr()
    assert exit_.value.code == 2 and "evaluating" not in printed.out
    assert "error: --pretrained 'opneai' is neither a pretrained tag of --model hn-tiny-vit (its tags: " \
           "none) nor a checkpoint file; pass one of those" in printed.err
    with pytest.raises(ValueError, match=r"--pretrained 'opneai' is neither a pretrained tag of "
                                         r"--model ViT-B-32 \(its tags: openai, laion400m_e31, "):
        hn_eval.load_model("ViT-B-32", "opneai")


def test_a_pretrained_tag_that_cannot_be_fetched_is_named_before_any_checkpoint_is_scored(
        sets, checkpoint, capsys, monkeypatch):
    """A real tag whose weights are neither cached nor downloadable (offline): exit 2 naming the
    tag and the fix before the first checkpoint is scored (it was open_clip's traceback after the
    earlier checkpoints' scores)."""
    import open_clip.pretrained

    def offline(cfg, *args, **kwargs):
        assert cfg, "fetch_pretrained passes the tag's config"
        raise FileNotFoundError("Failed to download file (open_clip_pytorch_model.bin)\nmore")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", offline)
    with pytest.raises(SystemExit) as exit_:
        hn_eval.main(["--model", "hn-tiny-vit", "ViT-B-32", "--model-config", CONFIG, "--pretrained",
                      checkpoint, "openai", "--compositional", str(sets)])
    printed = capsys.readouterr()
    assert exit_.value.code == 2 and "evaluating" not in printed.out
    assert ("error: --pretrained 'openai' of --model ViT-B-32: its weights cannot be fetched (Failed "
            "to download file (open_clip_pytorch_model.bin)); connect to the internet once") in printed.err


def test_in_loop_evaluation_of_a_pure_bf16_model(tmp_path):
    """Models trained with --precision pure_bf16 take bf16 images, as in OpenCLIP's evaluate."""
    import open_clip

    from conftest import TINY_MODEL, TINY_MODEL_CONFIG
    from open_clip_hn.eval import evaluate_compositional
    from open_clip_hn.scenes import write_compositional_sets

    open_clip.add_model_config(str(TINY_MODEL_CONFIG))
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL, precision="pure_bf16")
    write_compositional_sets(str(tmp_path), num_items=8, num_pairs=4, num_retrieval=8)
    metrics = evaluate_compositional(model, preprocess, open_clip.get_tokenizer(TINY_MODEL),
                                     str(tmp_path),
                                     input_dtype=open_clip.get_input_dtype("pure_bf16"))
    assert 0 <= metrics["compositional/replace_relation/acc"] <= 1


# ---------------------------------------------------------------------------- validation before training


def _copy_set(sets, tmp_path, name="swap_objects"):
    shutil.copytree(sets / "images", tmp_path / "images")
    data = json.loads((sets / f"{name}.json").read_text())
    (tmp_path / f"{name}.json").write_text(json.dumps(data))
    return data


def test_check_compositional_sets_counts_missing_and_corrupt_images(tmp_path, sets, caplog):
    summary = hn_eval.check_compositional_sets(str(sets))
    assert summary["swap_objects"] == {"items": 60, "missing": 0, "unreadable": 0}
    assert summary["relation_pairs"]["items"] == 30 and summary["retrieval"]["items"] == 40
    data = _copy_set(sets, tmp_path)
    os.remove(tmp_path / "images" / data["3"]["filename"])
    corrupt = tmp_path / "images" / data["5"]["filename"]
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # a truncated PNG
    with caplog.at_level("WARNING"):
        summary = hn_eval.check_compositional_sets(str(tmp_path))
    assert summary == {"swap_objects": {"items": 58, "missing": 1, "unreadable": 1}}
    assert f"1 with an unreadable one ({corrupt})" in caplog.text
    for item in data.values():
        (tmp_path / "images" / item["filename"]).write_bytes(b"not an image")
    with pytest.raises(ValueError, match="none of its 60 items has images that can be decoded"):
        hn_eval.check_compositional_sets(str(tmp_path))


@pytest.mark.parametrize("record, message", [
    ({"filename": "a.png", "caption": None, "negative_caption": "b"},
     "item 'seven': caption is None, not a string"),
    ({"filename": "a.png", "caption": "a"}, "item 'seven' lacks one of filename, caption"),
    ({"filename": "a.png", "caption": "a dog", "negative_caption": " "}, "item 'seven': negative_caption is empty"),
])
def test_malformed_record_is_named_before_training(tmp_path, sets, record, message):
    data = _copy_set(sets, tmp_path)
    data["seven"] = record
    (tmp_path / "swap_objects.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        hn_eval.check_compositional_sets(str(tmp_path))
    assert str(tmp_path / "swap_objects.json") in str(err.value)
    with pytest.raises(FileNotFoundError, match=f"compositional folder {tmp_path}/absent does not exist"):
        hn_eval.check_compositional_sets(str(tmp_path / "absent"))


def test_corrupt_image_is_skipped_and_counted_like_a_missing_one(tmp_path, sets, checkpoint, caplog):
    data = _copy_set(sets, tmp_path)
    shutil.copyfile(sets / "relation_pairs.jsonl", tmp_path / "relation_pairs.jsonl")
    os.remove(tmp_path / "images" / data["3"]["filename"])
    corrupt = tmp_path / "images" / data["5"]["filename"]
    corrupt.write_bytes(b"\x89PNG garbage")
    pair = json.loads((sets / "relation_pairs.jsonl").read_text().splitlines()[0])
    pair_image = tmp_path / "images" / pair["image_1"]
    if not pair_image.exists():
        pair_image = tmp_path / "images" / (pair["image_1"] + ".png")
    pair_image.write_bytes(b"")
    model, preprocess, tokenizer = hn_eval.load_model("hn-tiny-vit", checkpoint,
                                                      model_configs=[CONFIG])
    choice, pairs = hn_eval.discover_sets(str(tmp_path))
    with caplog.at_level("WARNING"):
        results = hn_eval.evaluate_sets(model, preprocess, tokenizer, choice, pairs, batch_size=16)
    assert results["swap_objects"]["skipped"] == 2 and results["swap_objects"]["n"] == 58
    assert results["relation_pairs"]["skipped"] == 1 and results["relation_pairs"]["n"] == 29
    assert (f"skipped 2 item(s) with a missing or unreadable image or an empty box; 1 unreadable "
            f"image(s), e.g. {corrupt}") in caplog.text
    # the scores are those of the readable items alone
    kept = [i for i in range(len(choice[0].items)) if choice[0].items[i][0] != str(corrupt)]
    alone = hn_eval.ChoiceSet("swap_objects", "", [choice[0].items[i] for i in kept])
    assert hn_eval.evaluate_sets(model, preprocess, tokenizer, [alone])["swap_objects"]["acc"] == \
        results["swap_objects"]["acc"]


def test_cli_user_errors_exit_non_zero_without_traceback(tmp_path, sets, checkpoint):
    import subprocess
    import sys

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "open_clip_hn.eval", "--model", "hn-tiny-vit",
                               "--model-config", CONFIG, *argv], capture_output=True, text=True)

    missing = cli("--pretrained", checkpoint, "--compositional", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"error: compositional folder {tmp_path}/absent does not exist" in missing.stderr
    (tmp_path / "bad.json").write_text('{"0": {"filename": 3, "caption": "a", "negative_caption": "b"}}')
    bad = cli("--pretrained", checkpoint, "--compositional", str(tmp_path))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "bad.json: item '0': filename is 3, not a string" in bad.stderr
    clobber = cli("--pretrained", checkpoint, "--compositional", str(sets), "--output", checkpoint)
    assert clobber.returncode == 2 and f"output {checkpoint} is one of the inputs" in clobber.stderr
    assert cli("--pretrained", checkpoint, "--compositional", str(sets),
               "--batch-size", "0").returncode == 2
    unknown = subprocess.run([sys.executable, "-m", "open_clip_hn.eval", "--model", "no-such-model",
                              "--pretrained", checkpoint, "--compositional", str(sets)],
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "error: --model 'no-such-model' is not an OpenCLIP model" in unknown.stderr
    absent = cli("--pretrained", str(tmp_path / "none.pt"), "--compositional", str(sets))
    assert absent.returncode == 2 and "checkpoint" in absent.stderr and "Traceback" not in absent.stderr
    # outputs of the wrong kind are named before any model is scored
    folder, a_file = tmp_path / "out-folder", tmp_path / "out.json"
    folder.mkdir()
    a_file.write_text("{}")
    for flags, message in ((["--output", str(folder)], f"--output {folder} is a folder; pass a file name"),
                           (["--plot", str(folder)], f"--plot {folder} is a folder"),
                           (["--format", "clip_benchmark", "--output", str(a_file)],
                            f"--output {a_file} is a file; --format clip_benchmark writes a folder")):
        wrong = cli("--pretrained", checkpoint, "--compositional", str(sets), *flags)
        assert wrong.returncode == 2 and message in wrong.stderr and "evaluating" not in wrong.stdout
    # a checkpoint named without a path or a checkpoint's ending is still a file, not a tag
    (tmp_path / "model.log").write_text("not a checkpoint")
    odd = subprocess.run([sys.executable, "-m", "open_clip_hn.eval", "--model", "hn-tiny-vit",
                          "--model-config", CONFIG, "--pretrained", "model.log", "--compositional",
                          str(sets)], capture_output=True, text=True, cwd=tmp_path)
    assert odd.returncode == 2 and "Traceback" not in odd.stderr and "model.log" in odd.stderr


def test_a_set_without_a_readable_image_is_refused_not_scored_nan(tmp_path, sets, checkpoint, capsys):
    """Every image corrupt: the CLI stops before loading a model, naming the set and an image,
    and writes no results; `evaluate_sets` (in the loop, the demo) raises instead of NaN."""
    data = _copy_set(sets, tmp_path)
    shutil.copyfile(sets / "relation_pairs.jsonl", tmp_path / "relation_pairs.jsonl")
    for item in data.values():
        (tmp_path / "images" / item["filename"]).write_bytes(b"\x89PNG garbage")
    output = tmp_path.parent / f"{tmp_path.name}-results.json"  # outside the evaluation folder
    with pytest.raises(SystemExit) as exit_:
        hn_eval.main(["--model", "hn-tiny-vit", "--model-config", CONFIG, "--pretrained", checkpoint,
                      "--compositional", str(tmp_path), "--output", str(output)])
    assert exit_.value.code == 2 and not output.exists()
    printed = capsys.readouterr()
    assert f"error: {tmp_path / 'swap_objects.json'}: none of its 60 items has images that can be " \
           f"decoded (e.g. {tmp_path / 'images'}/" in printed.err
    assert "evaluating" not in printed.out  # refused before any model was loaded

    model, preprocess, tokenizer = hn_eval.load_model("hn-tiny-vit", checkpoint, model_configs=[CONFIG])
    choice, pairs = hn_eval.discover_sets(str(tmp_path))
    with pytest.raises(ValueError, match=f"{tmp_path / 'swap_objects.json'}: none of its 60 items"):
        hn_eval.evaluate_sets(model, preprocess, tokenizer, choice, batch_size=64)
    for image in (tmp_path / "images").iterdir():  # pairs: one unreadable image spoils an item
        image.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{tmp_path / 'relation_pairs.jsonl'}: none of its 30 items"):
        hn_eval.evaluate_sets(model, preprocess, tokenizer, [], pairs, batch_size=64)


# ---------------------------------------------------------------------------- protocols


def test_retrieval_ties_count_against_the_true_partner():
    """A collapsed model (every feature equal) finds nothing, in both directions: a tie with a
    wrong candidate is not a hit (it was R@1 = 1.0 when ties went to the true partner)."""
    same = torch.ones(10, 4) / 2
    assert set(hn_eval.retrieval_recall(same, same).values()) == {0.0}
    images = torch.eye(3)
    texts = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])  # captions 0 and 1 alike
    result = hn_eval.retrieval_recall(images, texts, ks=(1,))
    # images 0 and 1 tie on both captions: only pair 2 is found, in either direction
    assert result == {"image_to_text_R@1": pytest.approx(1 / 3), "text_to_image_R@1": pytest.approx(1 / 3)}


def test_retrieval_recall_with_several_captions_per_image():
    """CLIP_benchmark's definitions: an image hits when any of its captions ranks in the top k;
    each caption hits when its image does."""
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0, 0.9, 0.1], [0, 0.2, 0.8], [0.1, 0, 0.9]])
    owner = torch.tensor([0, 0, 1, 2])  # image 0 has two captions, the second points at image 1
    result = hn_eval.retrieval_recall(images, texts, ks=(1, 2), text_image=owner)
    assert result["image_to_text_R@1"] == pytest.approx(2 / 3)  # image 1's caption loses to image 0's 2nd
    assert result["image_to_text_R@2"] == 1.0
    assert result["text_to_image_R@1"] == pytest.approx(2 / 4)  # captions 1 and 2 find another image first
    assert result["text_to_image_R@2"] == pytest.approx(3 / 4)  # caption 1's image is third


def test_retrieval_folder_reads_caption_lines_and_counts_unpaired_files(tmp_path, sets, caplog):
    source = sets / "retrieval"
    keys = sorted(p.stem for p in source.glob("*.txt"))[:4]
    for key in keys:
        shutil.copy(source / f"{key}.png", tmp_path / f"{key}.png")
        shutil.copy(source / f"{key}.txt", tmp_path / f"{key}.txt")
    (tmp_path / f"{keys[0]}.txt").write_text("first caption\n\n  second caption \n")
    os.remove(tmp_path / f"{keys[1]}.txt")  # an image without captions
    (tmp_path / "orphan.txt").write_text("a caption without its image")
    loaded = hn_eval.load_retrieval_set(str(tmp_path))
    assert loaded.items[0][1] == ["first caption", "second caption"]
    assert len(loaded.items) == 3 and loaded.skipped == 2
    assert "2 key(s) without both an image and a non-empty caption file" in caplog.text
    shutil.copy(source / f"{keys[2]}.png", tmp_path / f"{keys[2]}.jpg")
    with pytest.raises(ValueError, match=f"{keys[2]}.jpg and {keys[2]}.png share the caption file|"
                                         f"{keys[2]}.png and {keys[2]}.jpg share the caption file"):
        hn_eval.load_retrieval_set(str(tmp_path))


def test_two_sets_with_one_stem_are_refused(tmp_path, sets):
    shutil.copy(sets / "swap_objects.json", tmp_path / "a.json")
    shutil.copy(sets / "relation_pairs.jsonl", tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="a.json and a.jsonl would share the results' name"):
        hn_eval.discover_sets(str(tmp_path))
    os.remove(tmp_path / "a.jsonl")
    shutil.copy(sets / "swap_objects.json", tmp_path / "retrieval.json")
    with pytest.raises(ValueError, match="a set named retrieval would share the retrieval results' name"):
        hn_eval.discover_sets(str(tmp_path))


def test_aro_macro_accuracy_by_relation_and_by_attribute_pair():
    """ARO's published numbers are macro accuracies: per relation without its symmetric ones
    (VG-Relation), per attribute pair with 25+ items (VG-Attribution)."""
    correct = torch.tensor([True] * 90 + [False] * 10 + [True] + [False] * 9 + [False] * 5)
    groups = ["on"] * 100 + ["wearing"] * 10 + ["next to"] * 5  # "next to" is symmetric
    assert hn_eval.aro_macro_accuracy(correct, groups, "relation") == (pytest.approx(0.5), 2)
    pairs = ["red_blue"] * 100 + ["big_small"] * 10 + ["old_new"] * 5  # only one pair has 25+
    assert hn_eval.aro_macro_accuracy(correct, pairs, "attributes") == (pytest.approx(0.9), 1)
    assert hn_eval.aro_macro_accuracy(correct[:5], ["next to"] * 5, "relation") is None


def test_aro_sets_report_the_macro_accuracy_and_skip_empty_boxes(tmp_path, sets, checkpoint, caplog):
    shutil.copytree(sets / "images", tmp_path / "images")
    items = list(json.loads((sets / "replace_relation.json").read_text()).values())
    aro = [{"image_path": v["filename"], "true_caption": v["caption"],
            "false_caption": v["negative_caption"], "relation_name": ("on", "under", "near")[i % 3],
            "bbox_x": 0, "bbox_y": 0, "bbox_w": 0 if i == 0 else 32, "bbox_h": 32}
           for i, v in enumerate(items)]
    aro[1]["bbox_x"] = 1000  # a box beside the image: scored on an empty crop, as ARO does, but said
    (tmp_path / "vg_relation.json").write_text(json.dumps(aro))
    loaded = hn_eval.load_choice_set(str(tmp_path / "vg_relation.json"))
    assert loaded.skipped == 1 and len(loaded.items) == len(items) - 1  # the empty box, not a crash
    assert loaded.group_kind == "relation" and loaded.groups[:2] == ["under", "near"]
    assert "less than a pixel wide or high" in caplog.text
    caplog.clear()
    summary = hn_eval.check_sets([loaded])["vg_relation"]
    assert summary["missing"] == 0  # the empty box is not called a missing image
    assert (f"1 item(s) whose box lies outside its image (e.g. {tmp_path / 'images' / aro[1]['image_path']})"
            " are scored on an empty crop") in caplog.text
    model, preprocess, tokenizer = hn_eval.load_model("hn-tiny-vit", checkpoint, model_configs=[CONFIG])
    result = hn_eval.evaluate_sets(model, preprocess, tokenizer, [loaded])["vg_relation"]
    assert result["groups_averaged"] == 2  # "near" is one of ARO's symmetric relations
    correct = hn_eval.encode_choice_set(model, preprocess, tokenizer, loaded, "cpu", 64)
    per_item = hn_eval.choice_correct(*correct)
    on, under = ([per_item[i].item() for i, g in enumerate(loaded.groups) if g == name]
                 for name in ("on", "under"))
    assert result["acc"] == pytest.approx((sum(on) / len(on) + sum(under) / len(under)) / 2)
    assert result["item_acc"] == pytest.approx(per_item.float().mean().item())


def test_sugarcrepe_table_marks_a_split_scored_without_some_items():
    from open_clip_hn.formats import format_sugarcrepe_table

    table = format_sugarcrepe_table(["mine"], [{"swap_obj": {"acc": 0.7, "n": 9, "skipped": 1},
                                                "swap_att": {"acc": 0.8, "n": 10, "skipped": 0}}])
    rows = {tuple(line.split()[:2]): line.split()[2] for line in table.splitlines()[2:13]}
    assert rows[("Swap", "obj")] == "70.0*" and rows[("Swap", "att")] == "80.0"
    assert rows[("Swap", "avg")] == "75.0*"
    assert "mine swap_obj (1 skipped); not comparable to the baselines" in table


def test_cli_reads_the_retrieval_subfolder_and_refuses_an_output_inside_the_sets(sets, checkpoint,
                                                                                 tmp_path, capsys):
    base = ["--model", "hn-tiny-vit", "--model-config", CONFIG, "--pretrained", checkpoint,
            "--compositional", str(sets), "--batch-size", "64"]
    with pytest.raises(SystemExit) as stop:
        hn_eval.main([*base, "--output", str(sets / "results.json")])
    assert stop.value.code == 2 and "is inside the evaluation folder" in capsys.readouterr().err
    document = hn_eval.main(base)
    assert "image_to_text_R@1" in document["runs"][0]["results"]["retrieval"]
    assert "retrieval" not in hn_eval.main([*base, "--retrieval", "none"])["runs"][0]["results"]


@pytest.mark.parametrize("every, epochs, due", [
    (1, 3, [1, 2, 3]),
    (2, 3, [2, 3]),  # the last epoch too, as OpenCLIP's --val-frequency
    (2, 1, [1]),  # a run shorter than the interval is still evaluated once
    (5, 10, [5, 10]),
])
def test_in_training_evaluation_runs_every_n_epochs_and_after_the_last(every, epochs, due):
    from open_clip_hn.config import HNConfig
    from open_clip_hn.run import HardNegativeRun

    run = HardNegativeRun(HNConfig(eval_compositional="sets", eval_every=every))
    assert [e for e in range(1, epochs + 1) if run.evaluation_due(e, epochs)] == due
    off = HardNegativeRun(HNConfig(eval_every=every))
    assert not any(off.evaluation_due(e, epochs) for e in range(1, epochs + 1))


# ---------------------------------------------------------------------------- fresh-user audit


def test_a_repeated_item_id_is_refused_not_dropped(tmp_path, sets):
    """json keeps only the last record of a repeated key: the set lost items silently (n fell)."""
    data = _copy_set(sets, tmp_path)
    records = [f'"{key}": {json.dumps(item)}' for key, item in list(data.items())[:4]]
    records += [f'"1": {json.dumps(data["5"])}', f'"3": {json.dumps(data["6"])}']
    (tmp_path / "swap_objects.json").write_text("{" + ", ".join(records) + "}")
    with pytest.raises(ValueError, match="the key\\(s\\) '1', '3' appear more than once") as err:
        hn_eval.load_choice_set(str(tmp_path / "swap_objects.json"))
    assert str(tmp_path / "swap_objects.json") in str(err.value)
    assert "give every item its own id" in str(err.value)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_wide_grey_images_are_scaled_to_8_bit_not_clipped_white(tmp_path, mode):
    """`convert("RGB")` clips samples over 255: a 16-bit PNG was scored as a white image."""
    from PIL import Image

    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # 0..252, the 8-bit image
    if mode.startswith("I;16"):  # 16-bit white is 65535 = 255 * 257
        wide = grey.astype(np.uint16) * 257
        path = tmp_path / ("grey16.png" if mode == "I;16" else "grey16b.tif")
        if mode == "I;16":
            Image.fromarray(wide).save(path)
        else:  # a big-endian TIFF keeps the byte order PIL reads it in
            Image.frombytes(mode, (8, 8), wide.astype(">u2").tobytes()).save(path)
        expected = grey
    else:  # no stated white level: the image's own range is spread over 0..255
        values = grey.astype(np.int32) * 1000 if mode == "I" else grey.astype(np.float32) / 300
        path = tmp_path / f"grey-{mode}.tif"
        Image.fromarray(values).save(path)
        expected = np.rint(grey.astype(np.float64) * 255 / 252).astype(np.uint8)
    assert Image.open(path).mode == mode
    decoded = np.asarray(hn_eval._load_image(str(path)))
    assert decoded.shape == (8, 8, 3) and decoded.min() < 255
    assert (decoded == expected[:, :, None]).all()


def test_a_damaged_later_checkpoint_stops_the_command_before_any_scoring(sets, checkpoint, tmp_path,
                                                                         capsys):
    """It was found only after the earlier checkpoints were scored, and then nothing was written."""
    cut = tmp_path / "cut.pt"
    data = open(checkpoint, "rb").read()
    cut.write_bytes(data[: len(data) // 2])  # head -c: a copy or a write cut short
    output = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exit_:
        hn_eval.main(["--model", "hn-tiny-vit", "--model-config", CONFIG, "--pretrained", checkpoint,
                      str(cut), "--compositional", str(sets), "--output", str(output)])
    printed = capsys.readouterr()
    assert exit_.value.code == 2 and "evaluating" not in printed.out and not output.exists()
    assert f"error: checkpoint {cut} cannot be loaded" in printed.err


def test_open_checkpoint_reads_what_openclip_loads_and_names_what_it_cannot(checkpoint, tmp_path):
    from safetensors.torch import save_file

    assert "state_dict" in hn_eval.open_checkpoint(checkpoint)
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, weights)
    assert hn_eval.open_checkpoint(str(weights)) == {}
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"checkpoint {cut} cannot be loaded"):
        hn_eval.open_checkpoint(str(cut))


def test_a_renamed_step_checkpoint_is_still_checked_against_its_model(tmp_path, capsys):
    """The record inside a step checkpoint's plugin state was read only under its step name."""
    from open_clip_hn import provenance, state

    record = provenance.model_record("ViT-B-32-quickgelu", "openai", None)
    renamed = tmp_path / "best.pt"  # cp epoch_1_step_3.pt best.pt
    torch.save({"epoch": 1, "state_dict": {}, state.EMBEDDED_STATE_KEY: {"trained_as": record}}, renamed)
    with pytest.raises(SystemExit) as exit_:
        hn_eval.main(["--model", "ViT-B-32", "--pretrained", str(renamed),
                      "--compositional", str(tmp_path / "not-read")])
    assert exit_.value.code == 2
    assert f"checkpoint {renamed}: it was trained as --model ViT-B-32-quickgelu" in capsys.readouterr().err


def test_both_tables_round_halves_up_and_show_every_set():
    """56.25 printed 56.2 in the sets table (half-even) and 56.3 in SugarCrepe's; Δ is the
    difference of the printed values; `--table sugarcrepe` also shows the sets it has no row for."""
    from open_clip_hn.formats import format_sugarcrepe_table

    runs = [{"swap_obj": {"acc": 0.5625, "n": 16, "skipped": 0}, "pairs": {"text": 0.5, "group": 0.125}},
            {"swap_obj": {"acc": 0.5674, "n": 16, "skipped": 0}, "pairs": {"text": 0.5, "group": 0.125}}]
    sets_rows = {tuple(line.split()[:2]): line.split()[2:]
                 for line in hn_eval.format_table(["a", "b"], runs).splitlines()[2:]}
    assert sets_rows[("swap_obj", "acc")] == ["56.3", "56.7", "+0.4"]  # 0.49 unrounded
    assert sets_rows[("pairs", "group")] == ["12.5", "12.5", "+0.0"]
    sugarcrepe = {tuple(line.split()[:2]): line.split()[2:4]
                  for line in format_sugarcrepe_table(["a", "b"], runs).splitlines()[2:13]}
    assert sugarcrepe[("Swap", "obj")] == sets_rows[("swap_obj", "acc")][:2]
    both = hn_eval.format_tables("sugarcrepe", ["a", "b"], runs)
    assert both.startswith(format_sugarcrepe_table(["a", "b"], runs))
    assert "pairs  group" in both and "swap_obj" not in both.split("\n\n")[1]
    assert hn_eval.format_tables("sugarcrepe", ["a"], [{"swap_obj": runs[0]["swap_obj"]}]) == \
        format_sugarcrepe_table(["a"], [{"swap_obj": runs[0]["swap_obj"]}])
    assert str(hn_eval.percent(0.125, 0)) == "13"  # the plot's bar labels, by the same rule


def test_skipped_items_are_named_in_the_warning(tmp_path, sets, caplog):
    """The warning said "N item(s) with a missing image" without naming one."""
    data = _copy_set(sets, tmp_path)
    gone = [data[str(i)]["filename"] for i in range(7)]
    for name in gone:
        os.remove(tmp_path / "images" / name)
    with caplog.at_level("WARNING"):
        summary = hn_eval.check_compositional_sets(str(tmp_path))
    assert summary["swap_objects"]["missing"] == 7
    assert f"7 item(s) with a missing image ({', '.join(gone[:5])} and 2 more)" in caplog.text
    retrieval = tmp_path / "retrieval"
    shutil.copytree(sets / "retrieval", retrieval)
    keys = sorted(p.stem for p in retrieval.glob("*.txt"))[:2]
    for key in keys:
        os.remove(retrieval / f"{key}.png")
    caplog.clear()
    with caplog.at_level("WARNING"):
        hn_eval.check_compositional_sets(str(tmp_path))
    assert f"2 item(s) without both an image and a non-empty caption file ({', '.join(keys)})" in caplog.text


def test_a_byte_order_mark_is_read_past(tmp_path, sets):
    """Editors on Windows start a UTF-8 file with one; a .jsonl set failed on its first line."""
    _copy_set(sets, tmp_path)
    for name in ("swap_objects.json", "relation_pairs.jsonl"):
        text = (sets / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
    choice, pairs = hn_eval.discover_sets(str(tmp_path))
    assert len(choice[0].items) == 60 and len(pairs[0].items) == 30


def test_a_stop_ends_the_evaluation_after_the_batch_in_flight(sets, checkpoint):
    """In training a stop signal during --hn-eval-compositional waited for the whole evaluation,
    while OpenCLIP's epoch checkpoint waits for the evaluation: a long one outlasted the
    scheduler's grace period and the epoch was lost. `stop()` now ends it after one batch."""
    model, preprocess, tokenizer = hn_eval.load_model("hn-tiny-vit", checkpoint, model_configs=[CONFIG])
    model.train()
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 2

    with pytest.raises(hn_eval.EvaluationStopped):
        hn_eval.evaluate_compositional(model, preprocess, tokenizer, str(sets), batch_size=16, stop=stop)
    assert len(asked) == 2 and model.training  # no batch after the stop; the mode is restored
    assert hn_eval.evaluate_compositional(model, preprocess, tokenizer, str(sets), batch_size=16,
                                          stop=lambda: False)


def test_in_training_metrics_go_to_wandb_at_the_runs_step(monkeypatch, tmp_path):
    """wandb got the in-training evaluation without a step, so it landed on the last training
    step logged; OpenCLIP logs its own evaluation at steps per epoch x epochs done."""
    import sys
    import types

    logged = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        log=lambda data, step=None: logged.append((data, step))))
    hn_eval.log_metrics({"compositional/swap_objects/acc": 0.5}, 2, results_dir=str(tmp_path),
                        use_wandb=True, step=38)
    assert logged == [({"val/compositional/swap_objects/acc": 0.5, "epoch": 2}, 38)]


def test_a_folder_of_retrieval_alone_is_evaluated(tmp_path, sets, checkpoint):
    """A folder holding only `retrieval/` was refused ("holds no *.json or *.jsonl sets"), in
    training and by the CLI, although retrieval is one of the sets a folder may hold."""
    shutil.copytree(sets / "retrieval", tmp_path / "retrieval")
    assert set(hn_eval.check_compositional_sets(str(tmp_path))) == {"retrieval"}
    model, preprocess, tokenizer = hn_eval.load_model("hn-tiny-vit", checkpoint, model_configs=[CONFIG])
    metrics = hn_eval.evaluate_compositional(model, preprocess, tokenizer, str(tmp_path), batch_size=16)
    assert metrics and all(name.startswith("retrieval/") for name in metrics)
    (tmp_path / "retrieval").rename(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"holds no \*.json or \*.jsonl sets and no retrieval/ folder"):
        hn_eval.discover_sets(str(tmp_path))


def test_an_interrupted_evaluation_ends_with_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(hn_eval, "main", interrupted)
    with pytest.raises(SystemExit) as stop:
        hn_eval.cli()
    assert stop.value.code == 130
    assert capsys.readouterr().err.startswith("interrupted: no --output or --plot was written")
