"""`python -m open_clip_hn.negatives`: show, generate, precompute (resumable), setup-nltk."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import env_without_nltk_data, scene_words
from open_clip_hn.negatives import NegativeGenerator
from open_clip_hn.negatives.cli import main
from open_clip_hn.negatives.lexicon import cache_dir

CAPTIONS = [line for line in (Path(__file__).parent / "data" / "coco_style_captions.txt").read_text().splitlines()
            if line]


def run_cli(*argv: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "open_clip_hn.negatives", *argv], capture_output=True,
                          text=True, env=env, **kwargs)


def test_help_and_show():
    out = run_cli("show", "a red car next to a blue house")
    assert out.returncode == 0, out.stderr
    assert "replace_relation:\n  a red car far from a blue house" in out.stdout
    assert "replace_count: (does not apply)" in out.stdout
    assert run_cli("--help").stdout.count("precompute") >= 1
    missing = run_cli("show", "--vocabulary", "/nonexistent/words.txt", "a red car")
    assert missing.returncode == 2 and "/nonexistent/words.txt" in missing.stderr


def test_show_says_why_a_caption_gets_no_negatives(capsys):
    """A caption the generator will not touch is named with its reason, so a user can tell a
    too-long or non-English caption from one with nothing to change."""
    from open_clip_hn.negatives.cli import main

    for caption, reason in (("a red cube " * 100, "it is longer than 1000 characters (1100)"),
                            ("a cat on a mat\u2122", "it holds '\u2122', outside plain English text"),
                            ("a cat &amp; a dog", "it holds an HTML entity"),
                            ("a dog on a beach https://example.com/x.jpg",
                             "it holds a web address or file name ('https://')"),
                            ("www.example.com - a man riding a bike",
                             "it holds a web address or file name ('www.')"),
                            ("a man riding a bike photo.jpg", "it holds a web address or file name ('photo.jpg')"),
                            ("hello there", "it has nothing the negative types change")):
        assert main(["show", caption]) == 0
        assert f"(no negatives: {reason})" in capsys.readouterr().out


def test_generate_formats_order_and_malformed_lines(tmp_path, capsys):
    jsonl = tmp_path / "in.jsonl"
    lines = [json.dumps({"caption": c}) for c in CAPTIONS[:5]]
    lines.insert(2, "{not json")
    jsonl.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", str(jsonl), "--output", str(out), "--num", "4"]) == 0
    assert "line 3: invalid JSON" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in rows] == CAPTIONS[:5]
    assert [r["line"] for r in rows] == [1, 2, 4, 5, 6]  # each output names its input line
    generator = NegativeGenerator(seed=0)
    assert [r["negatives"] for r in rows] == [generator.generate(c, 4) for c in CAPTIONS[:5]]
    assert main(["generate", "--input", str(jsonl), "--output", str(tmp_path / "x.jsonl"), "--strict"]) == 2

    csv_path = tmp_path / "in.csv"
    csv_path.write_text("id,title\n1,\"A dog, sitting on a couch.\"\n2,\n")
    out_csv = tmp_path / "csv.jsonl"
    assert main(["generate", "--input", str(csv_path), "--caption-key", "title", "--output", str(out_csv),
                 "--types", "replace_relation", "--workers", "2"]) == 0
    rows = [json.loads(line) for line in out_csv.read_text().splitlines()]
    assert {"text": "A dog, sitting under a couch.", "type": "replace_relation"} in rows[0]["negatives"]
    assert rows[1] == {"line": 3, "caption": "", "negatives": []}


def _write_shards(folder: Path, count: int, per_shard: int) -> None:
    for s in range(count):
        with tarfile.open(folder / f"in-{s:06d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{s:03d}{i:05d}"
                caption = CAPTIONS[(s * per_shard + i) % len(CAPTIONS)] if i % 7 else "🐶🐶"
                for ext, data in (("jpg", bytes([i % 256]) * 16), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))


def test_precompute_adds_neg_json_and_resumes_after_kill(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    _write_shards(source, count=6, per_shard=400)
    pattern = str(source / "in-{000000..000005}.tar")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert main(["precompute", "--shards", pattern, "--output-dir", str(clean)]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "open_clip_hn.negatives", "precompute", "--shards", pattern,
                             "--output-dir", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not list(killed.glob(".precompute/in-*.tar.json")):
        time.sleep(0.02)  # a shard is done once its manifest entry is written
    proc.kill()
    proc.wait()
    finished = sorted(p.name for p in killed.glob(".precompute/in-*.tar.json"))
    assert 1 <= len(finished) < 6, "the run should be killed midway"
    out = run_cli("precompute", "--shards", pattern, "--output-dir", str(killed), "--workers", "2")
    assert out.returncode == 0, out.stderr
    assert f"{len(finished)} already done" in out.stderr
    assert sorted(os.listdir(killed)) == sorted(os.listdir(clean))
    assert sorted(os.listdir(killed / ".precompute")) == sorted(os.listdir(clean / ".precompute"))
    for name in (p.name for p in clean.glob("*.tar")):
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name
    # OpenCLIP's sample count of the folder, so training needs no --train-num-samples
    from open_clip_train.data import get_dataset_size

    sizes = json.loads((killed / "sizes.json").read_text())
    assert sizes == {f"in-{i:06d}.tar": 400 for i in range(6)}
    assert get_dataset_size(str(killed / "in-{000000..000005}.tar")) == (2400, 6)

    generator = NegativeGenerator(seed=0)
    with tarfile.open(clean / "in-000001.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["00100000.jpg", "00100000.txt", "00100000.neg.json"]
        negs = json.loads(tar.extractfile("00100001.neg.json").read())
        caption = tar.extractfile("00100001.txt").read().decode()
        assert negs == generator.generate(caption, 4) and negs
        assert json.loads(tar.extractfile("00100000.neg.json").read()) == []  # emoji caption: masked


def test_precompute_redoes_a_shard_edited_in_the_middle_at_the_same_size(tmp_path, capsys):
    """A caption fixed in place ("a" -> "A") far from the shard's ends keeps its size and its
    ends' digest; the rerun redoes the shard. Only touching it (a new modification time, the same
    content) does not."""
    source = tmp_path / "src"
    source.mkdir()
    _write_shards(source, count=1, per_shard=400)
    shard, out = source / "in-000000.tar", tmp_path / "out"
    argv = ["precompute", "--shards", str(shard), "--output-dir", str(out)]
    assert main(argv) == 0
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers()[390:] if m.name.endswith(".txt")
                      and tar.extractfile(m).read()[:1].isalpha())
    assert 1 << 17 < member.offset_data < shard.stat().st_size - (1 << 17)  # past content_identity's ends
    with open(shard, "r+b") as handle:
        handle.seek(member.offset_data)
        first = handle.read(1)
        handle.seek(member.offset_data)
        handle.write(first.swapcase())
    capsys.readouterr()
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))  # a coarse clock may not move
    assert main(argv) == 0
    assert "1 shards written, 0 already done" in capsys.readouterr().err
    with tarfile.open(out / shard.name) as tar:
        assert tar.extractfile(member.name).read()[:1] == first.swapcase()
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert main(argv) == 0
    assert "0 shards written, 1 already done" in capsys.readouterr().err


def test_precompute_fails_when_no_caption_got_a_negative(tmp_path, capsys):
    """Captions under a member that is not plain text (`--caption-key json`: a JSON document)
    get no negative at all: exit 1 naming --caption-key, not a quiet "N without negatives"."""
    source = tmp_path / "src"
    source.mkdir()
    _write_shards(source, count=1, per_shard=20)
    shard = next(source.glob("*.tar"))
    relabelled = tmp_path / "json.tar"
    with tarfile.open(shard) as reader, tarfile.open(relabelled, "w") as writer:
        for member in reader:
            data = reader.extractfile(member).read()
            if member.name.endswith(".txt"):
                member.name = member.name[:-4] + ".json"
                data = json.dumps({"caption": data.decode()}).encode()
                member.size = len(data)
            writer.addfile(member, io.BytesIO(data))
    code = main(["precompute", "--shards", str(relabelled), "--output-dir", str(tmp_path / "out"),
                 "--caption-key", "json"])
    err = capsys.readouterr().err
    assert code == 1 and "error: none of the 20 samples got a negative: are their '.json' members" in err
    (tmp_path / "afile").write_text("x")
    assert main(["precompute", "--shards", str(shard), "--output-dir", str(tmp_path / "afile")]) == 2
    assert f"error: --output-dir {tmp_path / 'afile'} is a file; pass a folder" in capsys.readouterr().err


def test_precompute_skips_a_corrupt_member_with_a_warning(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    _write_shards(source, count=1, per_shard=20)
    shard = source / "in-000000.tar"
    data = bytearray(shard.read_bytes())
    data[512 * 12: 512 * 12 + 64] = b"\xff" * 64  # smash a header in the middle
    shard.write_bytes(bytes(data))
    out = run_cli("precompute", "--shards", str(shard), "--output-dir", str(tmp_path / "out"))
    assert out.returncode == 1
    assert f"error: input shard {shard} is damaged" in out.stderr and "corrupt bytes" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out" / "in-000000.tar").exists()
    out = run_cli("precompute", "--shards", str(shard), "--output-dir", str(tmp_path / "out"),
                  "--allow-damaged")
    assert out.returncode == 0, out.stderr
    assert "warning:" in out.stderr and "corrupt" in out.stderr
    with tarfile.open(tmp_path / "out" / "in-000000.tar") as tar:
        assert any(n.endswith(".neg.json") for n in tar.getnames())


def test_missing_wordnet_message_then_setup_nltk_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NLTK_DATA",)}
    env.update(HOME=str(tmp_path / "home"), OPEN_CLIP_HN_CACHE=str(cache_dir()))
    missing = run_cli("show", "a dog on a couch", env=env)
    assert missing.returncode == 2
    assert "python -m nltk.downloader wordnet" in missing.stderr
    assert "python -m open_clip_hn.negatives setup-nltk" in missing.stderr

    target = tmp_path / "nltk_data"
    setup = run_cli("setup-nltk", "--target", str(target), env=env)
    assert setup.returncode == 0, setup.stderr
    lexnames = (target / "corpora" / "wordnet" / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45 and lexnames[5] == "05\tnoun.animal\t1" and lexnames[44] == "44\tadj.ppl\t3"
    env["NLTK_DATA"] = str(target)
    shown = run_cli("show", "a dog on a couch", env=env)
    assert shown.returncode == 0 and "replace_relation:\n  a dog under a couch" in shown.stdout
    check = subprocess.run([sys.executable, "-c", "from nltk.corpus import wordnet as wn; "
                            "print(wn.synsets('dog')[0].lexname())"], capture_output=True, text=True, env=env)
    assert check.stdout.strip() == "noun.animal", check.stderr


def test_setup_nltk_names_an_absolute_nltk_data(tmp_path):
    """A relative --target printed `export NLTK_DATA=rel`: wrong for a job started elsewhere."""
    out = run_cli("setup-nltk", "--target", "rel", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"export NLTK_DATA={tmp_path / 'rel'}" in out.stdout


def test_setup_nltk_from_a_folder_without_wordnet_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["setup-nltk", "--target", str(tmp_path / "data"), "--source", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and str(tmp_path / "nope") in err


def test_an_interrupt_names_a_resume_only_where_one_exists(tmp_path, capsys, monkeypatch):
    """Ctrl-C: one line, exit 130; only precompute resumes at its first unfinished shard."""
    import open_clip_hn.negatives.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    (tmp_path / "in.txt").write_text("a red cube\n")
    for command, runner in (("generate", "run_generate"), ("precompute", "run_precompute")):
        monkeypatch.setattr(cli, runner, interrupted)
        source = ["--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.jsonl")] \
            if command == "generate" else ["--shards", str(tmp_path / "x.tar"), "--output-dir", str(tmp_path / "o")]
        assert main([command, *source]) == 130
        err = capsys.readouterr().err
        assert err.startswith("interrupted: every output is written whole or not at all")
        assert ("resumes at its first unfinished shard" in err) == (command == "precompute")


def _nltk_copy(root: Path) -> dict:
    """A copy of this machine's WordNet under `root` (NLTK_DATA), seen by nothing else."""
    from open_clip_hn.negatives.nltk_data import find_wordnet

    shutil.copytree(find_wordnet(), root / "corpora" / "wordnet")
    return env_without_nltk_data(root, nltk_data=root)


@pytest.mark.parametrize("damage", ["cut", "no-lexnames", "empty-tagger"])
def test_damaged_nltk_data_is_named_with_the_fix(tmp_path, damage):
    """A WordNet cut short (NLTK warned per missing synset, then an AttributeError), a file
    missing, or a tagger folder left empty by an interrupted download: `error:` with the fix, no
    traceback (the tagger used to be taken as installed because its folder existed)."""
    env = _nltk_copy(tmp_path)
    wordnet = tmp_path / "corpora" / "wordnet"
    if damage == "cut":
        with open(wordnet / "data.noun", "r+b") as handle:
            handle.truncate(100_000)
    elif damage == "no-lexnames":
        (wordnet / "lexnames").unlink()
    else:
        (tmp_path / "taggers" / "averaged_perceptron_tagger_eng").mkdir(parents=True)
    out = run_cli("show", "a red car", env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stderr.count("warn") == 0
    if damage == "empty-tagger":
        assert f"NLTK's POS tagger data at {tmp_path / 'taggers'}" in out.stderr
        assert "python -m nltk.downloader averaged_perceptron_tagger_eng" in out.stderr
    else:
        assert f"NLTK's WordNet corpus at {wordnet} cannot be read" in out.stderr
        assert "Remove that folder and install it again" in out.stderr
        assert "python -m nltk.downloader wordnet" in out.stderr


def test_precompute_records_the_tagger_and_refuses_to_mix_two(tmp_path, scene_shards):
    """The two POS taggers parse some captions differently: a folder begun on a machine with
    NLTK's tagger data and finished on one without would hold two parsers' negatives."""
    out = tmp_path / "out"
    assert main(["precompute", "--shards", scene_shards, "--output-dir", str(out), "--num", "1"]) == 0
    settings_file = out / ".precompute" / "settings.json"
    settings = json.loads(settings_file.read_text())
    assert settings["tagger"] == NegativeGenerator().tagger_name
    settings["tagger"] = "nltk" if settings["tagger"] == "lexicon" else "lexicon"
    settings_file.write_text(json.dumps(settings))
    proc = run_cli("precompute", "--shards", scene_shards, "--output-dir", str(out), "--num", "1")
    assert proc.returncode == 2 and "POS tagger" in proc.stderr, proc.stderr


def test_vocabulary_from_shards_or_captions_feeds_show(tmp_path, scene_shards):
    words = tmp_path / "words.txt"
    assert main(["vocabulary", "--shards", scene_shards, "--output", str(words)]) == 0
    vocabulary = set(words.read_text().split())
    assert {"a", "to", "left", "of"} <= vocabulary <= scene_words()
    out = run_cli("show", "--vocabulary", str(words), "--types", "replace_object",
                  "a small red cube above a large blue sphere")
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split("replace_object:", 1)[1].split()) <= vocabulary

    captions = tmp_path / "captions.tsv"
    captions.write_text("caption\tfilepath\nA dog on a sofa\tx.jpg\na dog, a cat\ty.jpg\n")
    assert main(["vocabulary", "--input", str(captions), "--min-count", "2",
                 "--output", str(words)]) == 0
    assert words.read_text() == "a\ndog\n"
    openclip_csv = tmp_path / "train.csv"  # OpenCLIP's CSVs are tab-separated, whatever the name
    openclip_csv.write_text("filepath\ttitle\nx.jpg\tA cat, a hat\n")
    assert main(["vocabulary", "--input", str(openclip_csv), "--caption-key", "title",
                 "--output", str(words)]) == 0
    assert words.read_text() == "a\ncat\nhat\n"
    assert main(["vocabulary", "--input", str(captions), "--min-count", "9",
                 "--output", str(words)]) == 2
    assert main(["vocabulary", "--shards", str(tmp_path / "none-{0..1}.tar"),
                 "--output", str(words)]) == 2


@pytest.mark.parametrize("command", ["precompute", "vocabulary", "plausibility"])
@pytest.mark.parametrize("pattern, message", [
    ("{dir}/{{000..003.tar", "unbalanced braces; close every '{' with a '}', e.g. 'dir/{000..099}.tar'"),
    ("", "the pattern gives an empty path (an unset shell variable, or '::' at an end?)"),
    ("{dir}/in-000000.tar::", "the pattern gives an empty path"),
    ("{dir}/none-{{0..1}}.tar", "2 of 2 shard file(s) not found (first: {dir}/none-0.tar); give local "
                                ".tar paths, brace patterns and '::' separators, e.g. 'dir/{000..099}.tar'"),
])
def test_a_bad_shards_pattern_is_named_as_neighbors_names_it(tmp_path, capsys, command, pattern, message):
    """Every command that reads --shards refuses a pattern that gives no shard files in the same
    words as `neighbors` (not braceexpand's), exit 2, before any output is made."""
    _write_shards(tmp_path, count=1, per_shard=3)
    spec, out = pattern.format(dir=tmp_path), tmp_path / "out"
    output = ["--output-dir" if command == "precompute" else "--output", str(out)]
    assert main([command, "--shards", spec, *output]) == 2
    assert f"error: --shards {spec!r}: {message.replace('{dir}', str(tmp_path))}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("part", ["vocabulary", "plausibility"])
def test_the_trainer_names_a_bad_train_data_pattern_as_neighbors_names_it(tmp_path, part):
    """`--hn-vocabulary/--hn-plausibility train-data` read the --train-data captions before
    OpenCLIP reads the pattern: a bad one is named in the same words, with --train-data (not in
    braceexpand's), as a VocabularyError, which the trainer ends as `error: ...`, exit 2."""
    import re

    from open_clip_hn.config import HNConfig
    from open_clip_hn.negatives.lexicon import VocabularyError
    from open_clip_hn.run import HardNegativeRun, TrainCaptions

    spec = f"{tmp_path}/{{000..003.tar"
    run = HardNegativeRun(HNConfig(negatives="online", **{part: "train-data"}))
    with pytest.raises(VocabularyError, match=re.escape(
            f"--hn-{part} train-data: --train-data {spec!r}: unbalanced braces; close every '{{' with "
            "a '}', e.g. 'dir/{000..099}.tar'; ")):
        getattr(run, part)(TrainCaptions(spec, is_csv=False))


def test_precompute_refuses_shards_of_the_same_name(tmp_path, capsys):
    """Output shards keep their input's name, so two inputs of one name would write one output."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _write_shards(tmp_path / folder, count=1, per_shard=3)
    spec = f"{tmp_path}/{{a,b}}/in-000000.tar"
    assert main(["precompute", "--shards", spec, "--output-dir", str(tmp_path / "out")]) == 2
    assert (f"error: --shards {spec!r}: shard file names must be unique (in-000000.tar twice; the "
            "output shards keep their input's name)") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["vocabulary", "--shards", spec, "--output", str(tmp_path / "w.txt")]) == 0  # reads only


# ---------------------------------------------------------------------------- precompute manifest


def _neg_counts(path) -> tuple[int, int]:
    with tarfile.open(path) as tar:
        names = tar.getnames()
    return sum(n.endswith(".txt") for n in names), sum(n.endswith(".neg.json") for n in names)


def test_truncated_shard_is_reported_with_counts_and_never_counted_done(tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    _write_shards(source, count=2, per_shard=40)
    good, short = source / "in-000000.tar", source / "in-000001.tar"
    for cut in (512 * 4 * 10, 512 * 4 * 10 + 520):  # a sample is 4 blocks: at a boundary, in data
        _write_shards(source, count=2, per_shard=40)
        short.write_bytes(short.read_bytes()[:cut])
        out = tmp_path / f"out{cut}"
        spec = str(source / "in-{000000..000001}.tar")
        assert main(["precompute", "--shards", spec, "--output-dir", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"error: input shard {short} is damaged: 10 samples readable" in err, err
        assert "1 shards written, 0 already done (skipped), 1 damaged" in err
        assert "--allow-damaged" in err
        assert sorted(p.name for p in out.glob("*.tar")) == ["in-000000.tar"]
        written = (out / "in-000000.tar").stat().st_mtime_ns
        # a rerun neither skips the damaged shard nor redoes the good one
        assert main(["precompute", "--shards", spec, "--output-dir", str(out)]) == 1
        assert "0 shards written, 1 already done (skipped), 1 damaged" in capsys.readouterr().err
        assert (out / "in-000000.tar").stat().st_mtime_ns == written
        assert main(["precompute", "--shards", spec, "--output-dir", str(out), "--allow-damaged"]) == 0
        assert "kept the 10 readable samples" in capsys.readouterr().err
        assert _neg_counts(out / "in-000001.tar") == (10, 10)
    # the same-size output of an earlier version (no manifest) is made again, not trusted
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "in-000000.tar").write_bytes(b"not a finished shard")
    assert main(["precompute", "--shards", str(good), "--output-dir", str(legacy)]) == 0
    assert _neg_counts(legacy / "in-000000.tar") == (40, 40)


def test_rerun_with_other_settings_is_refused_naming_them(tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    _write_shards(source, count=1, per_shard=10)
    spec, out = str(source / "in-000000.tar"), str(tmp_path / "out")
    assert main(["precompute", "--shards", spec, "--output-dir", out, "--num", "2"]) == 0
    before = (tmp_path / "out" / "in-000000.tar").read_bytes()
    assert main(["precompute", "--shards", spec, "--output-dir", out, "--num", "3", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: --output-dir {out} holds negatives made with other settings" in err
    assert "--num 3 (folder: 2)" in err and "--seed 1 (folder: 0)" in err
    assert "another --output-dir" in err
    assert (tmp_path / "out" / "in-000000.tar").read_bytes() == before
    words = tmp_path / "words.txt"
    words.write_text("dog\ncat\n")
    assert main(["precompute", "--shards", spec, "--output-dir", out, "--num", "2",
                 "--vocabulary", str(words)]) == 2
    assert "--vocabulary sha256" in capsys.readouterr().err
    assert main(["precompute", "--shards", spec, "--output-dir", out, "--num", "2",
                 "--swap-reorders", "drop"]) == 2
    assert "--swap-reorders drop (folder: keep)" in capsys.readouterr().err
    # a folder of an older version recorded no plausibility filter: unknown, so never finished
    settings = tmp_path / "out" / ".precompute" / "settings.json"
    stored = json.loads(settings.read_text())
    settings.write_text(json.dumps({k: v for k, v in stored.items() if k != "plausibility"}))
    assert main(["precompute", "--shards", spec, "--output-dir", out, "--num", "2"]) == 2
    assert "--plausibility (model identity) none (folder: not recorded (an older version's folder))" \
        in capsys.readouterr().err
    # a folder written under the generator's earlier rules (before they were recorded)
    settings.write_text(json.dumps({k: v for k, v in stored.items() if k != "rules"}))
    assert main(["precompute", "--shards", spec, "--output-dir", out, "--num", "2"]) == 2
    from open_clip_hn.negatives.taxonomy import RULES_REVISION

    err = capsys.readouterr().err
    assert f"generator rules revision {RULES_REVISION} (folder: 1)" in err
    assert "another release of open_clip_hn" in err and "another --output-dir" in err
    settings.write_text(json.dumps(stored))
    # a changed input shard (same name) is made again
    assert main(["precompute", "--shards", spec, "--output-dir", out, "--num", "2"]) == 0
    assert "0 shards written, 1 already done" in capsys.readouterr().err
    _write_shards(source, count=1, per_shard=12)
    assert main(["precompute", "--shards", spec, "--output-dir", out, "--num", "2"]) == 0
    assert "1 shards written, 0 already done" in capsys.readouterr().err
    assert _neg_counts(tmp_path / "out" / "in-000000.tar") == (12, 12)


def test_output_dir_holding_the_inputs_is_refused(tmp_path, capsys):
    _write_shards(tmp_path, count=1, per_shard=5)
    before = (tmp_path / "in-000000.tar").read_bytes()
    assert main(["precompute", "--shards", str(tmp_path / "in-000000.tar"),
                 "--output-dir", str(tmp_path)]) == 2
    assert "holds the input shards" in capsys.readouterr().err
    assert (tmp_path / "in-000000.tar").read_bytes() == before


def test_two_concurrent_jobs_on_one_folder_keep_each_others_work(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    _write_shards(source, count=4, per_shard=300)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".tmp-{socket.gethostname().replace('-', '_')}-999999-xyzin-000000.tar"
    stale.write_bytes(b"partial")  # the temp of a killed run on this host (no pid 999999)
    jobs = [subprocess.Popen([sys.executable, "-m", "open_clip_hn.negatives", "precompute",
                              "--shards", str(source / f"in-{{{a}..{b}}}.tar"),
                              "--output-dir", str(out)], stderr=subprocess.PIPE, text=True)
            for a, b in (("000000", "000001"), ("000002", "000003"))]
    errors = [job.communicate(timeout=600)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], errors
    assert sorted(p.name for p in out.glob("in-*.tar")) == [f"in-{i:06d}.tar" for i in range(4)]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    for i in range(4):
        assert _neg_counts(out / f"in-{i:06d}.tar") == (300, 300)
    from open_clip_hn.negatives.manifest import check_precomputed_shards

    check_precomputed_shards([str(out / f"in-{i:06d}.tar") for i in range(4)])


def test_check_precomputed_shards_finds_a_raw_later_shard(tmp_path):
    from open_clip_hn.negatives.manifest import ManifestError, check_precomputed_shards

    source = tmp_path / "src"
    source.mkdir()
    _write_shards(source, count=3, per_shard=10)
    out = tmp_path / "out"
    assert main(["precompute", "--shards", str(source / "in-{000000..000001}.tar"),
                 "--output-dir", str(out)]) == 0
    shards = [str(out / "in-000000.tar"), str(out / "in-000001.tar")]
    check_precomputed_shards(shards)
    os.replace(source / "in-000002.tar", out / "in-000002.tar")  # a raw shard among them
    with pytest.raises(ManifestError, match=r"shard .*in-000002.tar has no neg.json members for 10 "
                                            r"of its 10 samples.*negatives precompute"):
        check_precomputed_shards([*shards, str(out / "in-000002.tar")])
    _write_shards(source, count=1, per_shard=3)
    os.replace(source / "in-000000.tar", out / "in-000001.tar")  # swapped after precompute
    with pytest.raises(ManifestError, match="in-000001.tar is .* bytes, but precompute wrote"):
        check_precomputed_shards(shards)
    check_precomputed_shards([str(tmp_path / "remote-{0..1}.tar")])  # not local: not checked here


def test_csv_captions_skip_empty_cells_and_name_a_missing_column(tmp_path, caplog, scene_csv):
    from open_clip_hn.negatives.shards import csv_captions
    from open_clip_hn.negatives.lexicon import VocabularyError

    table = tmp_path / "train.csv"
    table.write_text("filepath\ttitle\na.png\tA red cube\nb.png\t\nc.png\tNA\nd.png\t  \ne.png\t7\n")
    with caplog.at_level("WARNING"):
        assert csv_captions(str(table), "\t", "title") == ["A red cube", "7"]
    assert f"{table}: skipped 3 of 5 row(s) with an empty caption in column 'title' (first: data row 2)" \
        in caplog.text
    assert len(csv_captions(scene_csv, "\t", "title")) == 32
    with pytest.raises(VocabularyError, match=r"has no column 'caption' \(columns, split at '\\t': "
                                              r"\['filepath', 'title'\]\); set --csv-caption-key"):
        csv_captions(str(table), "\t", "caption")
    with pytest.raises(VocabularyError, match=r"no column 'title'.*'filepath\\ttitle'.*--csv-separator"):
        csv_captions(str(table), ",", "title")
    with pytest.raises(VocabularyError, match="not found"):
        csv_captions(str(tmp_path / "none.csv"), "\t", "title")


def test_cli_user_errors_exit_non_zero_without_traceback(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog on a couch\n")
    table = tmp_path / "captions.csv"
    table.write_text("id,title\n1,a cat\n")
    cases = [
        (["generate", "--input", str(tmp_path / "none.txt"), "--output", str(tmp_path / "o.jsonl")],
         f"error: caption file {tmp_path / 'none.txt'} not found"),
        (["generate", "--input", str(captions), "--output", str(captions)],
         f"error: --output {captions} is an input of this command, which the output would replace"),
        (["generate", "--input", str(table), "--output", str(tmp_path / "o.jsonl")],
         f"error: {table}: no column 'caption' (columns: ['id', 'title']); pass --caption-key"),
        (["generate", "--input", str(tmp_path), "--output", str(tmp_path / "o.jsonl")],
         f"error: caption file {tmp_path} not found"),
        (["generate", "--input", str(captions), "--output", str(tmp_path / "o.jsonl"), "--num", "-1"],
         "argument --num/-k: must be >= 1, got -1"),
        (["precompute", "--shards", "x.tar", "--output-dir", str(tmp_path), "--workers", "0"],
         "argument --workers: must be >= 1, got 0"),
        (["vocabulary", "--input", str(captions), "--output", str(tmp_path / "w.txt"),
          "--min-count", "0"], "argument --min-count: must be >= 1, got 0"),
        (["vocabulary", "--input", str(captions), "--output", str(captions)],
         f"error: --output {captions} is an input of this command"),
        (["plausibility", "--input", str(tmp_path / "none.txt"), "--output", str(tmp_path / "m.npz")],
         f"error: --input {tmp_path / 'none.txt'}: caption file not found; pass a .txt"),
    ]
    for argv, message in cases:
        out = run_cli(*argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert message in out.stderr, (argv, out.stderr)
        assert "Traceback" not in out.stderr, argv
    assert captions.read_text() == "a dog on a couch\n"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{broken\n")
    out = run_cli("generate", "--input", str(empty), "--output", str(tmp_path / "o.jsonl"))
    assert out.returncode == 2 and "no caption to process (1 malformed line(s))" in out.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_a_bad_generator_flag_does_not_claim_the_output_folder(tmp_path, capsys):
    _write_shards(tmp_path, count=1, per_shard=3)
    shard, out = str(tmp_path / "in-000000.tar"), str(tmp_path / "out")
    assert main(["precompute", "--shards", shard, "--output-dir", out, "--lm", str(tmp_path / "nolm")]) == 2
    assert "--lm" in capsys.readouterr().err and not os.path.exists(out)
    assert main(["precompute", "--shards", shard, "--output-dir", out,
                 "--vocabulary", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err and not os.path.exists(out)
    assert main(["precompute", "--shards", shard, "--output-dir", out]) == 0


def test_garbage_empty_and_gzipped_shards(tmp_path, capsys):
    import gzip

    _write_shards(tmp_path, count=1, per_shard=6)
    gz = tmp_path / "in-000001.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "in-000000.tar").read_bytes()))
    (tmp_path / "garbage.tar").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "empty.tar").write_bytes(b"")
    out = str(tmp_path / "out")
    assert main(["precompute", "--shards", str(gz), "--output-dir", out]) == 0
    assert _neg_counts(tmp_path / "out" / "in-000001.tar.gz") == (6, 6)
    written = (tmp_path / "out" / "in-000001.tar.gz").read_bytes()
    assert written[:2] == b"\x1f\x8b"  # compressed like its input, as its name says
    assert main(["precompute", "--shards", str(gz), "--output-dir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "in-000001.tar.gz").read_bytes() == written  # no name or time inside
    # a tar cut at a member boundary, then compressed whole: the decompressed tar lacks its end
    plain = (tmp_path / "in-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "in-000000.tar") as tar:
        members = tar.getmembers()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gzip.compress(plain[:members[-2].offset]))
    assert main(["precompute", "--shards", str(cut), "--output-dir", out]) == 1
    err = capsys.readouterr().err
    assert "is damaged" in err and "the decompressed tar ends at byte" in err, err
    assert main(["vocabulary", "--shards", str(cut), "--output", str(tmp_path / "v.txt")]) == 2
    assert "the decompressed tar ends at byte" in capsys.readouterr().err
    capsys.readouterr()
    for name, message in (("garbage.tar", "5120 bytes after the last readable member (byte 0)"),
                          ("empty.tar", "0 samples readable; not a tar archive")):
        assert main(["precompute", "--shards", str(tmp_path / name), "--output-dir", out]) == 1
        err = capsys.readouterr().err
        assert f"error: input shard {tmp_path / name} is damaged" in err and message in err, err
        assert not (tmp_path / "out" / name).exists()
    gz.write_bytes(gz.read_bytes()[:-40])  # a cut gzip stream fails in the decompressor
    assert main(["precompute", "--shards", str(gz), "--output-dir", str(tmp_path / "out2")]) == 1
    assert "is damaged" in capsys.readouterr().err
    tarfile.open(tmp_path / "hollow.tar", "w").close()  # a whole tar without members
    for _ in range(2):  # nothing recorded: a rerun refuses it again rather than skipping it
        assert main(["precompute", "--shards", str(tmp_path / "hollow.tar"), "--output-dir", out]) == 1
        err = capsys.readouterr().err
        assert "0 damaged and 1 empty (not written)" in err and \
            f"error: 1 input shard(s) hold no samples and were not written (e.g. {tmp_path / 'hollow.tar'})" in err, err
        assert not (tmp_path / "out" / "hollow.tar").exists()


def test_a_cut_shard_is_refused_wherever_its_captions_are_read(tmp_path, capsys):
    """tarfile reads a shard cut at a member boundary as a shorter valid archive: the word list,
    the plausibility model and `--hn-vocabulary train-data` would lose its last captions without
    a word (precompute already refused it)."""
    from open_clip_hn.negatives.lexicon import VocabularyError
    from open_clip_hn.negatives.shards import shard_captions, train_data_captions, word_counts

    _write_shards(tmp_path, count=1, per_shard=400)
    whole = tmp_path / "in-000000.tar"
    assert len(list(shard_captions(str(whole), "txt"))) == 400
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:300 * 1024 // 512 * 512])
    with pytest.raises(VocabularyError, match=f"shard {cut} is damaged: .*truncated.*re-create"):
        list(train_data_captions(str(cut), is_csv=False))
    for command in ("vocabulary", "plausibility"):
        assert main([command, "--shards", str(cut), "--output", str(tmp_path / f"{command}.out")]) == 2
        assert f"shard {cut} is damaged" in capsys.readouterr().err
        assert not (tmp_path / f"{command}.out").exists()
    # --allow-damaged keeps the readable captions, named in a warning; it has no meaning for a file
    readable = len(list(_readable(str(cut))))
    assert 0 < readable < 400
    spec = f"{tmp_path}/{{in-000000,cut}}.tar"
    usable = word_counts([*shard_captions(str(whole), "txt"), *_readable(str(cut))])[1]
    for command in ("vocabulary", "plausibility"):
        out = tmp_path / f"{command}.out"
        assert main([command, "--shards", spec, "--output", str(out), "--allow-damaged"]) == 0
        err = capsys.readouterr().err
        assert f"warning: shard {cut} is damaged" in err and "--allow-damaged" in err and out.exists()
        assert command == "plausibility" or f"from {usable} usable captions" in err, err
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\n")
    assert main(["vocabulary", "--input", str(captions), "--output", str(tmp_path / "v2"),
                 "--allow-damaged"]) == 2
    assert "--allow-damaged applies to --shards" in capsys.readouterr().err


def _readable(path: str):
    from open_clip_hn.negatives.lexicon import VocabularyError
    from open_clip_hn.negatives.shards import shard_captions

    try:
        yield from shard_captions(path, "txt")
    except VocabularyError:
        return


def test_precompute_exclude_keeps_the_captions_out_and_is_recorded(tmp_path, capsys):
    """--exclude (as --hn-exclude-negatives): no precomputed negative equals an excluded caption,
    the folder records the exclusion, and a bad path stops before the folder is claimed."""
    source = tmp_path / "src"
    source.mkdir()
    _write_shards(source, count=1, per_shard=30)
    spec, plain, out = str(source / "in-000000.tar"), str(tmp_path / "plain"), str(tmp_path / "out")
    assert main(["precompute", "--shards", spec, "--output-dir", plain]) == 0
    with tarfile.open(Path(plain) / "in-000000.tar") as tar:
        before = [n["text"] for name in tar.getnames() if name.endswith(".neg.json")
                  for n in json.loads(tar.extractfile(name).read())]
    banned = sorted(set(before))[:3]
    excluded = tmp_path / "test-captions.txt"
    excluded.write_text("\n".join(b.upper() + "." for b in banned) + "\n")  # case and punctuation ignored

    assert main(["precompute", "--shards", spec, "--output-dir", out, "--exclude", str(tmp_path / "nope")]) == 2
    assert "--exclude " in capsys.readouterr().err and not os.path.exists(out)
    assert main(["precompute", "--shards", spec, "--output-dir", out, "--exclude", str(excluded)]) == 0
    with tarfile.open(Path(out) / "in-000000.tar") as tar:
        after = [n["text"] for name in tar.getnames() if name.endswith(".neg.json")
                 for n in json.loads(tar.extractfile(name).read())]
    assert after and not set(banned) & set(after)
    assert len(after) >= len(before) - 3  # the next candidates take the excluded ones' places
    capsys.readouterr()
    assert main(["precompute", "--shards", spec, "--output-dir", out]) == 2
    assert "--exclude (captions' digest) none (folder: sha256" in capsys.readouterr().err
    assert main(["precompute", "--shards", spec, "--output-dir", plain, "--exclude", str(excluded)]) == 2
    assert "--exclude (captions' digest) sha256" in capsys.readouterr().err
    assert main(["precompute", "--shards", spec, "--output-dir", out, "--exclude", "none"]) == 2
    assert "--exclude (captions' digest) none (folder: sha256" in capsys.readouterr().err  # none: no exclusion


def test_show_generate_and_audit_honour_exclude(tmp_path, capsys):
    caption = "a red car next to a blue house"
    shown = NegativeGenerator(seed=0).candidates(caption)
    banned = [texts[0] for texts in shown.values()]
    excluded = tmp_path / "excluded.txt"
    excluded.write_text("\n".join(banned) + "\n")
    assert main(["show", caption]) == 0
    plain = capsys.readouterr().out
    assert main(["show", caption, "--exclude", str(excluded)]) == 0
    filtered = capsys.readouterr().out
    assert all(f"  {b}\n" in plain for b in banned) and not any(f"  {b}\n" in filtered for b in banned)
    captions = tmp_path / "captions.txt"
    captions.write_text(caption + "\n")
    for flags, want in (([], True), (["--exclude", str(excluded)], False)):
        out = tmp_path / "negatives.jsonl"
        assert main(["generate", "--input", str(captions), "--output", str(out), *flags]) == 0
        texts = {n["text"] for n in json.loads(out.read_text().splitlines()[0])["negatives"]}
        assert bool(texts & set(banned)) is want
    assert main(["audit", str(captions), "--exclude", str(tmp_path / "missing")]) == 2  # checked up front
    assert "--exclude " in capsys.readouterr().err


def test_show_tells_a_filtered_type_from_one_that_does_not_apply(tmp_path, capsys):
    caption = "a dog to the left of a cat"
    shown = NegativeGenerator(seed=0, types=["replace_relation", "shuffle_order"]).candidates(caption)
    excluded = tmp_path / "excluded.txt"
    excluded.write_text("\n".join(shown["shuffle_order"]) + "\n")
    flags = ["--types", "replace_relation,shuffle_order,replace_count", "--exclude", str(excluded)]
    assert main(["show", caption, *flags]) == 0
    out = capsys.readouterr().out
    assert f"shuffle_order: (all {len(shown['shuffle_order'])} removed by --exclude)" in out
    assert "replace_count: (does not apply)" in out and "replace_relation:\n  " in out
    excluded.write_text("\n".join(shown["shuffle_order"] + shown["replace_relation"]) + "\n")
    assert main(["show", caption, *flags]) == 0
    assert "(no negatives: every one was removed by --exclude)" in capsys.readouterr().out


def test_no_output_replaces_an_input_or_lands_in_a_folder(tmp_path, captions_300):
    """Every command that writes a file refuses, before any work, an output that is one of its
    inputs (a caption file, a shard, --vocabulary, --plausibility, --exclude, --reference, a
    file of an input folder), a folder, or an empty path."""
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions_300) + "\n")
    other = tmp_path / "other.txt"
    other.write_text("\n".join(captions_300[:250]) + "\n")
    _write_shards(tmp_path, count=1, per_shard=3)
    shard = tmp_path / "in-000000.tar"
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "swap_att.json").write_text(json.dumps({"0": {"caption": "a red cube", "negative_caption":
                                                          "a blue cube"}}))
    kept = {p: p.read_bytes() for p in (source, other, shard, sets / "swap_att.json")}
    out = str(tmp_path / "out.jsonl")
    for argv in (["audit", str(source), "--output", str(source)],
                 ["audit", str(source), "--reference", str(other), "--output", str(other)],
                 ["audit", str(sets), "--output", str(sets / "swap_att.json")],
                 ["plausibility", "--input", str(source), "--output", str(source)],
                 ["plausibility", "--shards", str(shard), "--output", str(shard)],
                 ["vocabulary", "--shards", str(shard), "--output", str(shard)],
                 ["generate", "--input", str(source), "--plausibility", str(other), "--output", str(other)],
                 ["generate", "--input", str(source), "--vocabulary", str(other), "--output", str(other)],
                 ["generate", "--input", str(source), "--exclude", str(other), "--output", str(other)]):
        proc = run_cli(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert f"error: --output {argv[-1]} is an input of this command" in proc.stderr, (argv, proc.stderr)
    assert {p: p.read_bytes() for p in kept} == kept
    for command in (["generate", "--input", str(source)], ["vocabulary", "--input", str(source)],
                    ["plausibility", "--input", str(source)], ["audit", str(source)]):
        folder = run_cli(*command, "--output", str(tmp_path))
        assert folder.returncode == 2 and f"error: --output {tmp_path} is a folder" in folder.stderr
        empty = run_cli(*command, "--output", "")
        assert empty.returncode == 2 and "--output: empty path" in empty.stderr, empty.stderr
    assert not os.path.exists(out)
    made = run_cli("vocabulary", "--input", str(source), "--output", str(tmp_path / "new" / "w.txt"))
    assert made.returncode == 0, made.stderr  # a missing folder is made, as for every output


@pytest.fixture
def captions_300():
    import random

    from open_clip_hn.scenes import sample_scene

    rng = random.Random(3)
    return [sample_scene(rng).caption for _ in range(300)]


def test_caption_files_as_web_data_comes(tmp_path, capsys):
    """A byte-order mark, a stray carriage return inside a caption, bytes that are not UTF-8 and
    jsonl values that are not text: each caption file is read as written, malformed lines
    named, and an extension it is not is refused instead of read as lines."""
    bom = "\ufeff"
    (tmp_path / "b.txt").write_bytes((bom + "a dog on a couch\r\na cat\rsitting on a mat\r\n").encode())
    (tmp_path / "b.csv").write_bytes((bom + 'caption,id\n"a dog\non a couch",1\n').encode()
                                     + b"a red \xff car,2\na cat on a mat,3\n")
    (tmp_path / "b.jsonl").write_bytes(
        (bom + '{"caption": "a dog on a couch"}\n{"caption": null}\n{"caption": 12}\n').encode()
        + b'{"caption": "a red \xff car"}\n{"caption": "a cat on a mat"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"caption": "a dog on a couch"}]))
    rows = {}
    for name in ("b.txt", "b.csv", "b.jsonl"):
        out = tmp_path / f"{name}.out"
        assert main(["generate", "--input", str(tmp_path / name), "--output", str(out)]) == 0
        rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
    err = capsys.readouterr().err
    assert [(r["line"], r["caption"]) for r in rows["b.txt"]] == [(1, "a dog on a couch"),
                                                                  (2, "a cat\rsitting on a mat")]
    assert [(r["line"], r["caption"]) for r in rows["b.csv"]] == [(2, "a dog\non a couch"),
                                                                  (5, "a cat on a mat")]
    assert "line 4: not UTF-8 text; skipped" in err  # a CSV row's number is its first line
    assert [(r["line"], r["caption"]) for r in rows["b.jsonl"]] == [(1, "a dog on a couch"),
                                                                    (5, "a cat on a mat")]
    assert all(r["negatives"] for r in rows["b.jsonl"])
    assert "line 2: 'caption' is null, not text; skipped" in err
    assert "line 3: 'caption' is 12, not text; skipped" in err
    assert "line 4: not UTF-8 text (byte 19); skipped" in err
    assert main(["generate", "--input", str(tmp_path / "b.json"), "--output", str(tmp_path / "j")]) == 2
    assert "unknown caption file format '.json'; pass a .txt" in capsys.readouterr().err
    assert main(["vocabulary", "--input", str(tmp_path / "b.jsonl"), "--output", str(tmp_path / "w")]) == 0
    assert "3 malformed line(s) skipped (the first, line 2" in capsys.readouterr().err


def test_generate_refuses_a_file_where_no_caption_got_a_negative(tmp_path, capsys):
    source = tmp_path / "c.txt"
    source.write_text("\u4e00\u53ea\u732b\n\n   \n")
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--input", str(source), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {source}: none of its 3 captions got a negative (the first, line 1: it holds" in err
    assert not out.exists() and os.listdir(tmp_path) == ["c.txt"]  # nor a temp file


def test_vocabulary_leaves_out_the_words_of_unusable_captions(tmp_path):
    source = tmp_path / "c.txt"
    source.write_text("a dog on a beach https://example.com/x.jpg\nfish &amp; chips on a plate\n"
                      "a red car\n")
    out = tmp_path / "w.txt"
    proc = run_cli("vocabulary", "--input", str(source), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().split() == ["a", "car", "red"]
    assert "from 1 usable captions" in proc.stderr


def test_a_stopped_or_piped_command_leaves_nothing_behind(tmp_path):
    """SIGTERM or Ctrl-C to the command's process group (as scancel and a terminal send them)
    unwinds generate, with or without workers: its temp output goes, no traceback is printed,
    the pool never hangs its end (Pool.terminate waited forever on a lock a killed worker held);
    and `show | head` ends quietly."""
    import signal

    source = tmp_path / "c.txt"
    source.write_text("a dog on a couch and a cat under a red table\n" * 200_000)
    for stop, workers in ((signal.SIGTERM, "1"), (signal.SIGINT, "1"), (signal.SIGTERM, "2"),
                          (signal.SIGINT, "2"), (signal.SIGTERM, "2"), (signal.SIGTERM, "2")):
        proc = subprocess.Popen([sys.executable, "-m", "open_clip_hn.negatives", "generate", "--input",
                                 str(source), "--output", str(tmp_path / "o.jsonl"), "--workers", workers],
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 120
        while not any(n.startswith(".tmp-") for n in os.listdir(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        time.sleep(0.5)  # the workers are busy
        os.killpg(proc.pid, stop)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == (143 if stop == signal.SIGTERM else 130), (workers, err)
        assert "Traceback" not in err, (workers, err)
        assert sorted(os.listdir(tmp_path)) == ["c.txt"], err
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shards(shards, count=20, per_shard=400)
    proc = subprocess.Popen([sys.executable, "-m", "open_clip_hn.negatives", "precompute", "--shards",
                             str(shards / "in-{000000..000019}.tar"), "--output-dir", str(tmp_path / "out"),
                             "--workers", "2"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "in-000000.tar").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent_of(int(p)) == proc.pid]
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.communicate(timeout=60)[1].count("Traceback") == 0 and proc.returncode == 143
    time.sleep(1)
    assert [w for w in workers if _state_of(w) not in (None, "Z")] == []  # the pool went with it
    rerun = run_cli("precompute", "--shards", str(shards / "in-{000000..000019}.tar"), "--output-dir",
                    str(tmp_path / "out"), "--workers", "2")
    assert rerun.returncode == 0 and "already done (skipped)" in rerun.stderr, rerun.stderr
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".tmp-")]  # a worker's, removed
    piped = subprocess.run(f"{shlex.quote(sys.executable)} -m open_clip_hn.negatives show "
                           "'a dog on a couch and a cat under a red table' | head -1",
                           shell=True, capture_output=True, text=True)
    assert piped.stdout.startswith("caption:") and piped.stderr == "", piped.stderr


def _stat_fields(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def _parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 else None


def _state_of(pid: int) -> str | None:
    """The process's state letter ('Z': ended, not yet reaped), None once it is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None
