"""Bad input to the negatives commands and to precomputed training is refused before any work,
naming the flag: a bad --lm, a --caption-key no sample has, shards with no negative at all."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, train_argv
from open_clip_hn.negatives.cli import main
from open_clip_hn.negatives.manifest import ManifestError, check_precomputed_shards


def _write_shard(path: Path, captions: list[str], caption_ext: str = "txt", image_ext: str = "jpg",
                 key: str = "{:05d}") -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, caption in enumerate(captions):
            for ext, data in ((image_ext, bytes([i]) * 16), (caption_ext, caption.encode())):
                info = tarfile.TarInfo(f"{key.format(i)}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _negatives_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "open_clip_hn.negatives", *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_generate_with_workers_and_a_bad_lm_fails_at_once_leaving_nothing(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red dog on a green couch\na cat under a table\n")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty").mkdir()
    for lm, reason in ((tmp_path / "none", "no such folder"), (tmp_path / "empty", "no config.json")):
        proc = _negatives_cli("generate", "--input", str(captions), "--output", str(out / "n.jsonl"),
                              "--workers", "2", "--lm", str(lm))  # hung, its workers restarted forever
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: --lm {lm}: {reason}"), proc.stderr
        assert "Traceback" not in proc.stderr
        assert os.listdir(out) == []  # no temp file left


def test_precompute_refuses_a_bad_lm_before_claiming_the_folder(tmp_path, capsys):
    _write_shard(tmp_path / "in.tar", ["a red dog on a green couch"])
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    argv = ["precompute", "--shards", str(tmp_path / "in.tar"), "--output-dir", str(out)]
    assert main([*argv, "--lm", str(tmp_path / "empty")]) == 2  # was a transformers traceback
    assert f"error: --lm {tmp_path / 'empty'}: no config.json" in capsys.readouterr().err
    assert not out.exists()
    assert main(argv) == 0  # the rerun without --lm is not refused as "other settings"


def test_precompute_refuses_a_caption_key_no_sample_has(tmp_path, capsys):
    _write_shard(tmp_path / "in.tar", ["a red dog on a green couch", "a cat under a table"])
    out = tmp_path / "out"
    argv = ["precompute", "--shards", str(tmp_path / "in.tar"), "--output-dir", str(out)]
    assert main([*argv, "--caption-key", "caption"]) == 2
    err = capsys.readouterr().err
    assert f"error: --caption-key caption: no sample of {tmp_path / 'in.tar'} has a '.caption' member " \
           "(its members: .jpg, .txt); pass --caption-key" in err, err
    assert not out.exists()
    assert main(argv) == 0
    assert "2 samples, 0 without negatives" in capsys.readouterr().err
    _write_shard(tmp_path / "json.tar", ["a red dog on a green couch"], caption_ext="json")
    assert main(["precompute", "--shards", str(tmp_path / "json.tar"), "--output-dir",
                 str(tmp_path / "out2"), "--caption-key", "json"]) == 0


def test_upper_case_extensions_are_read_as_webdataset_reads_them(tmp_path, capsys):
    """webdataset lowercases extensions, so '.JPG' and '.TXT' members train in OpenCLIP: precompute
    refused them ("no sample has a '.txt' member"), with --caption-key TXT it wrote negatives the
    trainer refused as of '.TXT' captions, and the train-data word list found no words."""
    from open_clip_hn.negatives.manifest import OPENCLIP_CAPTION_KEY
    from open_clip_hn.negatives.shards import shard_captions

    _write_shard(tmp_path / "in.tar", ["a red dog on a green couch", "a cat under a table"],
                 caption_ext="TXT", image_ext="JPG")
    assert list(shard_captions(str(tmp_path / "in.tar"), OPENCLIP_CAPTION_KEY)) == [
        "a red dog on a green couch", "a cat under a table"]
    for flags, out in (([], "out"), (["--caption-key", "TXT"], "out2")):
        assert main(["precompute", "--shards", str(tmp_path / "in.tar"), "--output-dir",
                     str(tmp_path / out), *flags]) == 0, capsys.readouterr().err
        assert "2 samples, 0 without negatives" in capsys.readouterr().err
        check_precomputed_shards([str(tmp_path / out / "in.tar")])


def test_keys_with_dots_are_named_as_the_cause(tmp_path, capsys):
    """A key holding a dot ('img.0001.txt') makes webdataset read the extension as '0001.txt': the
    error named --caption-key over a list of every member."""
    _write_shard(tmp_path / "in.tar", [f"a red dog number {i}" for i in range(30)], key="img.{:04d}")
    assert main(["precompute", "--shards", str(tmp_path / "in.tar"), "--output-dir",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the sample keys hold dots (a member '<key>.0000.txt')" in err and "'a.b.txt' -> 'a_b.txt'" in err
    assert len(err) < 600, err


def test_training_refuses_precomputed_shards_that_hold_no_negative(tmp_path, capsys):
    _write_shard(tmp_path / "a.tar", ["🐶🐶", "🐱"])  # nothing a type can change: all masked
    _write_shard(tmp_path / "b.tar", ["🐶", "..."])
    _write_shard(tmp_path / "c.tar", ["a red dog on a green couch"])
    out = tmp_path / "out"
    assert main(["precompute", "--shards", str(tmp_path / "{a,b,c}.tar"), "--output-dir", str(out)]) == 0
    assert "5 samples, 4 without negatives" in capsys.readouterr().err
    with pytest.raises(ManifestError, match=r"--hn-negatives precomputed: precompute's manifest records "
                                            r"no negative for any of the 4 samples of the 2 shard\(s\) "
                                            r".*--caption-key, or use --hn-negatives online"):
        check_precomputed_shards([str(out / "a.tar"), str(out / "b.tar")])
    check_precomputed_shards([str(out / name) for name in ("a.tar", "b.tar", "c.tar")])


@pytest.mark.slow
def test_training_names_a_bad_hn_lm_before_any_work(tmp_path, scene_shards):
    argv = train_argv(scene_shards, str(tmp_path / "logs"), "bad-lm", "--hn-negatives", "online",
                      "--hn-types", "replace_object", "--hn-lm", str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-m", "open_clip_hn.train", *argv], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"--hn-lm {tmp_path / 'none'}: no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "logs").exists()


def test_training_refuses_more_negatives_or_other_types_than_precomputed(tmp_path):
    """K above precompute's --num, or a type it did not make, would train on masked slots only
    (a user's 93% masked run): refused before the loader, naming the flag and both fixes."""
    from types import SimpleNamespace

    from open_clip_hn import hooks
    from open_clip_hn.config import HNConfig
    from open_clip_hn.negatives.manifest import check_precomputed_settings

    _write_shard(tmp_path / "a.tar", ["a red dog on a green couch", "a cat under a table"])
    out = tmp_path / "out"
    assert main(["precompute", "--shards", str(tmp_path / "a.tar"), "--output-dir", str(out),
                 "--num", "2", "--types", "swap_attributes,replace_object"]) == 0
    shards = [str(out / "a.tar")]
    check_precomputed_settings(shards, 2, ("replace_object",))
    check_precomputed_settings(shards, 1, None)
    with pytest.raises(ManifestError, match=rf"--hn-num-negatives 4: the precomputed shards in {out} "
                                            r"hold at most 2 negatives per caption \(precompute --num 2\), "
                                            r"so 2 of every 4 slots would be masked; pass "
                                            r"--hn-num-negatives 2, or precompute again"):
        check_precomputed_settings(shards, 4, None)
    with pytest.raises(ManifestError, match=r"--hn-types replace_object,swap_objects: .* hold no "
                                            r"swap_objects negatives \(precompute --types "
                                            r"swap_attributes,replace_object\)"):
        check_precomputed_settings(shards, 2, ("replace_object", "swap_objects"))
    # the trainer's check: every type (the default) reads whatever the folder holds; K is checked
    args = SimpleNamespace(train_data=shards[0], dataset_type="webdataset")
    hooks._check_precomputed_settings(HNConfig(negatives="precomputed", num_negatives=2), args)
    with pytest.raises(ManifestError, match=r"--hn-num-negatives 4 \(the default\)"):
        hooks._check_precomputed_settings(HNConfig(negatives="precomputed", num_negatives=4), args)
    with pytest.raises(ManifestError, match="hold no swap_objects negatives"):
        hooks._check_precomputed_settings(HNConfig(negatives="precomputed", num_negatives=2,
                                                   types=("swap_objects",)), args)
    # at parse time, so the trainer (and submit.py) refuse it before any set-up: exit 2
    with pytest.raises(SystemExit) as stop:
        hooks.parse_args(["--train-data", shards[0], "--dataset-type", "webdataset",
                          "--hn-negatives", "precomputed", "--hn-num-negatives", "3"])
    assert stop.value.code == 2
    # shards copied without .precompute/ (cp dir/*.tar, a sync tool) are judged by their negatives
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "a.tar", copy / "a.tar")
    check_precomputed_settings([str(copy / "a.tar")], 2, ("replace_object",))
    with pytest.raises(ManifestError, match=rf"hold at most 2 negatives per caption \(the most among "
                                            rf"the first 2 samples of {copy / 'a.tar'}; its .precompute/"):
        check_precomputed_settings([str(copy / "a.tar")], 4, None)
    with pytest.raises(ManifestError, match=r"hold no swap_objects negatives \(types among the first 2 "
                                            r"samples of .*: replace_object, swap_attributes\)"):
        check_precomputed_settings([str(copy / "a.tar")], 2, ("swap_objects",))


def test_training_refuses_negatives_of_another_caption_member_than_txt(tmp_path):
    """OpenCLIP trains on `.txt`: negatives precomputed from `.cap` captions would be trained
    against another caption (a user's "a photo" against rewrites of the real caption)."""
    _write_shard(tmp_path / "a.tar", ["a red dog on a green couch", "a cat under a table"], caption_ext="cap")
    out = tmp_path / "out"
    assert main(["precompute", "--shards", str(tmp_path / "a.tar"), "--output-dir", str(out),
                 "--num", "2", "--caption-key", "cap"]) == 0
    from open_clip_hn.negatives.manifest import check_precomputed_settings

    with pytest.raises(ManifestError, match=rf"the shards in {out} hold negatives of their '.cap' captions "
                                            r"\(precompute --caption-key cap\), but OpenCLIP trains on the '.txt'"):
        check_precomputed_settings([str(out / "a.tar")], 2, None)


def test_a_caption_longer_than_the_csv_modules_field_limit_is_read_and_masked(tmp_path, capsys):
    """Python's csv stops at 128 KiB fields with a traceback; pandas (OpenCLIP) reads them. The
    200k-character caption is read, masked like any too-long caption, and its neighbour gets
    negatives; vocabulary reads the same file."""
    import json

    path = tmp_path / "huge.csv"
    path.write_text("filepath,caption\na.png,a red dog next to a blue cat\nb.png," + "a red dog " * 20000 + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", str(path), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["negatives"] and rows[1]["negatives"] == []
    assert main(["vocabulary", "--input", str(path), "--output", str(tmp_path / "words.txt")]) == 0


def test_a_quoted_caption_over_several_lines_is_warned_about(tmp_path, capsys):
    """An unclosed quote reads the rest of the file as one caption (legal CSV, so the csv module
    says nothing; pandas, OpenCLIP's reader, refuses it): the row and the lines it took are named."""
    path = tmp_path / "weird.csv"
    path.write_text('filepath,title\nf.png,"unclosed quote, a red dog\ng.png,a blue cat\nh.png,a green cube\n')
    main(["generate", "--input", str(path), "--caption-key", "title", "--output", str(tmp_path / "o.jsonl")])
    assert f"warning: {path}: the row at line 2 runs to line 4" in capsys.readouterr().err
    path.write_text('filepath,title\nf.png,"a red dog, on a mat"\ng.png,a blue cat\n')
    assert main(["generate", "--input", str(path), "--caption-key", "title", "--output",
                 str(tmp_path / "o.jsonl")]) == 0
    assert "runs to line" not in capsys.readouterr().err
