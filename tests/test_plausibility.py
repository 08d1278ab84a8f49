"""The plausibility model (Kneser-Ney trigram of the user's captions), the filter it drives in the
generator, its on-disk cache, and `negatives audit`."""

from __future__ import annotations

import json
import math
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from open_clip_hn.negatives import NegativeGenerator
from open_clip_hn.negatives import plausibility as P
from open_clip_hn.negatives.audit import Scorers, detector_accuracy, generated_pairs
from open_clip_hn.negatives.cli import main

# scenes whose words go together (as in real captions): replacing one object by a co-hyponym
# mostly yields a scene the captions never show, which a text-only model notices
SCENES = (
    ("man", ("riding", "leading"), ("horse",), ("beach", "field")),
    ("woman", ("holding", "carrying"), ("umbrella", "bag"), ("street", "sidewalk")),
    ("dog", ("catching", "chasing"), ("frisbee", "ball"), ("park", "yard")),
    ("cat", ("sleeping", "lying"), ("", ), ("couch", "bed")),
    ("boy", ("flying", "holding"), ("kite",), ("beach", "hill")),
    ("girl", ("eating", "holding"), ("sandwich", "banana"), ("table", "kitchen")),
    ("giraffe", ("eating", "reaching"), ("leaves",), ("tree", "zoo")),
    ("skier", ("skiing", "going"), ("",), ("slope", "mountain")),
)
COLORS = ("red", "white", "black", "brown", "blue", "green")


def scene_captions(n: int, seed: int = 0) -> list[str]:
    """`n` distinct captions of the SCENES, in a few phrasings."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        subject, verbs, objects, places = rng.choice(SCENES)
        verb, obj, place = rng.choice(verbs), rng.choice(objects), rng.choice(places)
        color = rng.choice(COLORS)
        what = f" a {color} {obj}" if obj else ""
        rel = "on" if place in ("beach", "couch", "bed", "slope", "street", "sidewalk", "hill", "table") else "in"
        form = rng.randrange(4)
        if form == 0:
            text = f"a {subject} {verb}{what} {rel} the {place}"
        elif form == 1:
            text = f"A {subject} is {verb}{what} {rel} a {place}."
        elif form == 2:
            text = f"a young {subject} {verb}{what} {rel} the {place} on a sunny day"
        else:
            text = f"{rng.choice(('two', 'three'))} {subject}s {verb}{what} {rel} the {place}"
        out[text] = None
    return list(out)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return scene_captions(600)


@pytest.fixture(scope="module")
def model(captions) -> P.PlausibilityModel:
    return P.fit(captions, source="scene captions")


def toy_model() -> P.PlausibilityModel:
    rng = random.Random(0)
    words = "a dog cat man on the grass sitting red blue table with".split()
    return P.fit([" ".join(rng.choice(words) for _ in range(rng.randint(1, 7))) for _ in range(300)])


def test_kneser_ney_distributions_sum_to_one():
    model = toy_model()
    ids = model.ids
    contexts = [(P.BOS, P.BOS), (ids["a"], ids["dog"]), (ids["dog"], ids["dog"]), (P.UNK, P.UNK),
                (ids["red"], P.UNK), (P.BOS, ids["table"])]
    for half in model.halves:
        for u, v in contexts:
            total = sum(math.exp(half.log_prob(u, v, w)) for w in range(len(model.vocabulary)) if w != P.BOS)
            assert total == pytest.approx(1.0, abs=1e-9)
        # a seen trigram is more probable than an unseen continuation of the same context
        assert half.log_prob(P.BOS, P.BOS, ids["a"]) > half.log_prob(P.BOS, P.BOS, P.UNK)


def test_difference_scores_only_the_edit_yet_equals_the_full_difference():
    model = toy_model()
    positive = "a dog on the grass"
    half = model.encode(positive)[1]
    for negative in ("a cat on the grass", "a dog on the red grass with a table", "dog", "the grass",
                     "a dog on the grass table", "zebra dog on the grass", positive):
        full = model.log_prob(negative, half) - model.log_prob(positive, half)
        assert model.difference(positive, negative) == pytest.approx(full, abs=1e-9)
        units = negative.replace("red grass", "red-grass").split()  # the generator's units
        assert model.difference(model.prepare(positive), units) == pytest.approx(full, abs=1e-9)
    assert model.prefers_positive(positive, "a zebra on the grass")
    # a caption is scored by the half it is not in
    assert model.encode(positive)[1] == 1 - P.fold_of(P.tokens(positive))


def test_save_load_round_trip_and_cheap_pickle(tmp_path, model, captions):
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = P._read(path)
    assert loaded.identity == model.identity and loaded.vocabulary == model.vocabulary
    pairs = [(c, c.replace("horse", "banana")) for c in captions[:50]]
    assert [loaded.difference(*p) for p in pairs] == pytest.approx([model.difference(*p) for p in pairs])
    generator = NegativeGenerator(seed=3, plausibility=str(path))
    blob = pickle.dumps(generator)
    assert len(blob) < 2000  # the model travels as its path, loaded once per process
    again = pickle.loads(blob)
    assert again.plausibility is generator.plausibility
    assert [again.generate(c, 4) for c in captions[:30]] == [generator.generate(c, 4) for c in captions[:30]]


def _rewrite(path, **meta_changes) -> None:
    with np.load(path) as data:
        arrays = dict(data)
    meta = json.loads(arrays["meta"].tobytes())
    meta.update(meta_changes)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_foreign_old_or_broken_models_are_refused(tmp_path, model):
    path = tmp_path / "m.npz"
    model.save(path)
    _rewrite(path, tokenisation="bpe/9")
    with pytest.raises(P.PlausibilityError, match=r"tokenisation 'bpe/9', this version uses 'words_of/1'.*rebuild"):
        P._read(path)
    model.save(path)
    _rewrite(path, format="open_clip_hn.plausibility/0")
    with pytest.raises(P.PlausibilityError, match=r"format 'open_clip_hn.plausibility/0'.*reads"):
        P._read(path)
    model.save(path)
    with pytest.raises(P.PlausibilityError, match="built from other captions"):
        P.load_model(path, identity="0" * 64)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(P.PlausibilityError, match="broken.npz cannot be read"):
        P.resolve(broken)


def test_bad_caption_sources_are_refused_with_the_fix(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a dog on the grass\n" * 3)
    with pytest.raises(P.PlausibilityError, match=rf"tiny.txt: 3 usable captions; .* at least {P.MIN_CAPTIONS}"):
        P.resolve(tiny, cache=tmp_path)
    odd = tmp_path / "captions.xml"
    odd.write_text("<c>a dog</c>")
    with pytest.raises(P.PlausibilityError, match=r"captions.xml: unknown caption file format '.xml'"):
        P.resolve(odd, cache=tmp_path)
    not_a_model = tmp_path / "model.npz"
    not_a_model.write_text("a dog on the grass\n")
    with pytest.raises(P.PlausibilityError, match=r"model.npz is not a saved plausibility model"):
        P.resolve(not_a_model, cache=tmp_path)
    with pytest.raises(P.PlausibilityError, match="not found"):
        P.resolve(tmp_path / "missing.txt")
    good = tmp_path / "good.txt"
    good.write_text("\n".join(scene_captions(300)))
    with pytest.raises(P.PlausibilityError, match="cache directory .*nowhere does not exist"):
        P.resolve(good, cache=tmp_path / "nowhere")
    csv = tmp_path / "c.csv"
    csv.write_text("title\n" + "\n".join(scene_captions(300)))
    with pytest.raises(P.PlausibilityError, match="no column 'caption'"):
        P.resolve(csv, cache=tmp_path)


def test_caption_file_model_is_cached_by_content(tmp_path, monkeypatch):
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(scene_captions(300)))
    cache = tmp_path / "cache"
    cache.mkdir()
    first = P.resolve(source, cache=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and first.path == str(files[0])
    P._LOADED.clear()
    monkeypatch.setattr(P, "fit", lambda *a, **k: pytest.fail("refitted although cached"))
    assert P.resolve(source, cache=cache).identity == first.identity
    monkeypatch.undo()
    source.write_text("\n".join(scene_captions(300, seed=1)))  # other content: another model
    assert P.resolve(source, cache=cache).identity != first.identity
    assert len(list(cache.glob("*.npz"))) == 2


def _blind_accuracy(pairs, scorers) -> float:
    diffs = scorers.differences(pairs, normalise=False)["kn3"]
    return sum(d < 0 for d in diffs) / len(diffs)


def test_filter_lowers_blind_accuracy_and_masks_rather_than_forces(captions, model):
    scorers = Scorers(captions)  # split otherwise than the filter's model
    types = "replace_object,swap_objects,replace_relation"
    off, _ = generated_pairs(NegativeGenerator(types=types), captions, 1)
    on, covered = generated_pairs(NegativeGenerator(types=types, plausibility=model), captions, 1)
    for name in ("replace_object", "replace_relation"):
        before, after = _blind_accuracy(off[name], scorers), _blind_accuracy(on[name], scorers)
        assert after < before - 0.1, (name, before, after)
        assert all(P.tokens(p) != P.tokens(n) for p, n in on[name])
        assert all(model.difference(p, n) >= -P.MARGIN for p, n in on[name])
    # every kept negative is within the margin; captions whose candidates all fall outside get none
    generator = NegativeGenerator(types="replace_object", plausibility=model)
    for caption in captions[:100]:
        every = NegativeGenerator(types="replace_object").candidates(caption).get("replace_object", [])
        kept = generator.generate(caption, 1)
        if every and not kept:
            assert all(model.difference(caption, c) < -P.MARGIN for c in every)


def test_audit_coverage_is_where_a_type_applies_whatever_k(captions):
    """With the default --num 1 coverage was the share of captions whose one drawn negative had
    the type (7% for swap_attributes where --num 4 said 36%), and a type no caption drew was
    left out of the table."""
    generator = NegativeGenerator(types="swap_attributes,replace_object,replace_count")
    one, covered_one = generated_pairs(generator, captions[:60], 1)
    _, covered_three = generated_pairs(generator, captions[:60], 3)
    assert covered_one == covered_three
    assert set(one) == set(generator.types)
    assert generated_pairs(generator, ["a red cube next to a blue sphere"], 1)[0]["replace_count"] == []
    assert covered_one["swap_attributes"] > len(one["swap_attributes"])  # applies beyond the draw


def test_plausible_order_keeps_the_margin_most_plausible_first():
    assert P.plausible_order([-1.0, 3.0, -20.0, 0.5], margin=10) == [1, 3, 0]
    assert P.plausible_order([-11.0, -30.0], margin=10) == []


def test_detector_finds_a_systematic_artefact():
    rng = random.Random(0)
    pairs = []
    for caption in scene_captions(300):
        artefact = rng.random() < 0.5
        words = caption.split()
        i = rng.randrange(len(words))
        negative = " ".join(words[:i] + ["zxq" if artefact else rng.choice(COLORS)] + words[i + 1:])
        pairs.append((caption, negative))
    folds = [P.fold_of(P.tokens(p), "audit-fold") for p, _ in pairs]
    assert detector_accuracy(pairs, folds) > 0.7


def test_config_flag_applies_to_online_negatives_only():
    import argparse

    from open_clip_hn.config import HNConfig, add_hn_arguments

    parser = add_hn_arguments(argparse.ArgumentParser())
    config = HNConfig.from_args(parser.parse_args(["--hn-negatives", "online", "--hn-plausibility", "train-data"]))
    assert config.plausibility == "train-data"
    assert HNConfig.from_args(parser.parse_args(["--hn-negatives", "online", "--hn-plausibility", "none"])
                              ).plausibility is None
    with pytest.raises(ValueError, match="--hn-plausibility acts on online text negatives"):
        HNConfig.from_args(parser.parse_args(["--hn-negatives", "precomputed", "--hn-plausibility", "x.txt"]))
    assert HNConfig.from_args(parser.parse_args(["--hn-negatives", "online"])).swap_reorders == "keep"
    with pytest.raises(ValueError, match="--swap-reorders drop to `python -m open_clip_hn.negatives precompute`"):
        HNConfig.from_args(parser.parse_args(["--hn-negatives", "precomputed", "--hn-swap-reorders", "drop"]))
    with pytest.raises(ValueError, match="--hn-swap-reorders must be keep or drop, got 'Drop'"):
        HNConfig(negatives="online", swap_reorders="Drop").validate()


# ---- command line -------------------------------------------------------------------------------

def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "open_clip_hn.negatives", *argv], capture_output=True, text=True)


def test_generate_with_filter_is_deterministic_across_runs_and_workers(tmp_path, captions):
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions[:300]) + "\n")
    outputs = []
    for run, workers in enumerate(("1", "1", "4")):
        out = tmp_path / f"out{run}.jsonl"
        assert main(["generate", "--input", str(source), "--output", str(out), "--plausibility", str(source),
                     "--workers", workers]) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1] == outputs[2]
    plain = tmp_path / "plain.jsonl"
    assert main(["generate", "--input", str(source), "--output", str(plain)]) == 0
    assert plain.read_text() != outputs[0]  # the filter did something


def test_cli_build_show_and_bad_input(tmp_path, captions):
    source = tmp_path / "captions.jsonl"
    source.write_text("\n".join(json.dumps({"text": c}) for c in captions) + "\n")
    saved = tmp_path / "model.npz"
    assert main(["plausibility", "--input", str(source), "--caption-key", "text", "--output", str(saved)]) == 0
    assert P._read(saved).meta["captions"] == len(captions)
    out = run_cli("show", "a man riding a brown horse on the beach", "--plausibility", str(saved),
                  "--types", "replace_object")
    assert out.returncode == 0, out.stderr
    missing = run_cli("show", "a dog", "--plausibility", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "nope.txt not found" in missing.stderr
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a dog\n")
    refused = run_cli("generate", "--input", str(tiny), "--output", str(tmp_path / "o.jsonl"), "--plausibility",
                      str(tiny))
    assert refused.returncode == 2 and f"at least {P.MIN_CAPTIONS}" in refused.stderr
    assert not (tmp_path / "o.jsonl").exists()


def _sugarcrepe_dir(tmp_path, captions) -> str:
    folder = tmp_path / "sc"
    folder.mkdir()
    rng = random.Random(1)
    odd = {str(i): {"filename": f"{i}.jpg", "caption": c, "negative_caption": c.rsplit(" ", 1)[0] + " zxq"}
           for i, c in enumerate(captions[:300])}
    swaps = {}
    for i, c in enumerate(captions[300:]):
        words = c.split()
        a, b = rng.sample(range(len(words)), 2)
        words[a], words[b] = words[b], words[a]
        swaps[str(i)] = {"filename": f"{i}.jpg", "caption": c, "negative_caption": " ".join(words)}
    (folder / "replace_rel.json").write_text(json.dumps(odd))
    (folder / "swap_obj.json").write_text(json.dumps(swaps))
    return str(folder)


def test_audit_on_sugarcrepe_layout(tmp_path, captions, capsys):
    data = _sugarcrepe_dir(tmp_path, captions)
    report_path = tmp_path / "audit.json"
    assert main(["audit", data, "--generate", "--plausibility", "audited", "--output", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "given" in out and "ours, plausibility" in out and "most detectable" in out
    report = json.loads(report_path.read_text())["report"]
    odd = report["given"]["replace_relation"]
    assert odd["pairs"] == 300 and odd["coverage"] == 1.0
    assert odd["blind_kn3"] > 0.9 and odd["blind_bigram"] > 0.9 and odd["detector"] > 0.9  # 'zxq' is obvious
    assert "zxq" in odd["most_detectable"][0]["negative"]
    ours = report["ours"]["replace_relation"]
    assert 0 < ours["coverage"] <= 1 and ours["equal_to_positive"] == 0
    assert set(report) == {"given", "ours", "ours, plausibility"}


def test_audit_reads_the_vocabulary_once_for_every_generator(tmp_path, captions, monkeypatch, capsys):
    """Each type and filter gets its own generator; the word list is read once, up front (a bad
    path fails before any work), and every generator gets it."""
    from open_clip_hn.negatives import generator, lexicon

    data = _sugarcrepe_dir(tmp_path, captions)
    words = tmp_path / "words.txt"
    words.write_text("\n".join(captions) + "\n")
    reads, read = [], lexicon.read_vocabulary
    monkeypatch.setattr(lexicon, "read_vocabulary", lambda path: reads.append(path) or read(path))
    given, real = [], generator.NegativeGenerator

    class Spy(real):
        def __init__(self, *args, **kwargs):
            given.append(kwargs.get("vocabulary"))
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(generator, "NegativeGenerator", Spy)
    report_path = tmp_path / "audit.json"
    assert main(["audit", data, "--generate", "--plausibility", "audited", "--vocabulary", str(words),
                 "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())["report"]
    assert set(report["ours"]) == set(report["ours, plausibility"]) == {"replace_relation", "swap_objects"}
    assert reads == [str(words)]
    assert len(given) == 4 and all(v == read(words) and v for v in given)  # 2 types x 2 filters
    assert main(["audit", data, "--vocabulary", str(tmp_path / "missing.txt")]) == 2  # nothing generated
    assert "missing.txt" in capsys.readouterr().err


def test_audit_of_a_caption_file_and_its_errors(tmp_path, captions):
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions) + "\n")
    report_path = tmp_path / "a.json"
    assert main(["audit", str(source), "--num", "2", "--types", "replace_object,add_object", "--plausibility",
                 str(source), "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())["report"]
    assert report["ours"]["add_object"]["normalised"] is True
    assert report["ours, plausibility"]["replace_object"]["blind_kn3"] < report["ours"]["replace_object"]["blind_kn3"]
    reference = tmp_path / "reference.txt"  # other captions for the readers; shared ones are dropped
    reference.write_text("\n".join(c + " today" for c in scene_captions(400, seed=9)) + "\n")
    with_reference = tmp_path / "r.json"
    assert main(["audit", str(source), "--types", "replace_object", "--reference", str(reference),
                 "--output", str(with_reference)]) == 0
    assert json.loads(with_reference.read_text())["reference"] == str(reference)
    bad = tmp_path / "swap_things.json"
    bad.write_text("{}")
    assert main(["audit", str(bad)]) == 2
    assert main(["audit", str(source), "--output", str(tmp_path)]) == 2  # a folder
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a dog on a couch\n")
    assert main(["audit", str(tiny)]) == 2


def test_plausibility_and_audit_modules_import_no_torch(tmp_path, captions):
    """The filter runs in loader workers and the audit offline: plain Python + numpy."""
    source = tmp_path / "c.txt"
    source.write_text("\n".join(captions[:300]))
    code = ("import sys\n"
            "from open_clip_hn.negatives import NegativeGenerator\n"
            "from open_clip_hn.negatives import audit, audit_cli, plausibility\n"
            f"model = plausibility.fit(open({str(source)!r}).read().splitlines())\n"
            "generator = NegativeGenerator(plausibility=model)\n"
            "pairs, covered = audit.generated_pairs(generator, ['a man riding a horse on the beach'], 4)\n"
            "audit.run_audit({'ours': (pairs, {})}, audit.Scorers("
            f"open({str(source)!r}).read().splitlines()), 1)\n"
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_artefacts_the_audit_found_are_fixed():
    """All-caps captions get all-caps negatives (inserted and re-inflected words too), a
    coordinated subject keeps its plural verb when one conjunct changes, and the items of a list
    never merely trade places (the same scene: not a negative)."""
    generator = NegativeGenerator()
    shouted = generator.candidates("A DOG SITTING ON A RED COUCH NEXT TO TWO CATS")
    assert {"add_object", "add_attribute", "swap_attributes"} <= set(shouted)
    assert all(text == text.upper() for texts in shouted.values() for text in texts)
    found = generator.candidates("A zebra and two elephants are on a grassy field.")
    assert "A grassy field and two elephants are on a zebra." in found["swap_objects"]
    assert "Two elephants and a zebra are on a grassy field." not in found["swap_objects"]
    assert not any(text.startswith("Two elephants and a zebra") for texts in found.values() for text in texts)
    assert "Two zebras and an elephant are on a grassy field." in found["swap_attributes"]
    assert generator.candidates("Two dogs are sleeping on a bed.")["swap_objects"] == ["A bed is sleeping on two dogs."]


def test_trainer_reads_the_train_data_captions(tmp_path):
    """--hn-plausibility train-data: the model of the --train-data captions (a CSV here), cached;
    too few captions are refused with the number needed."""
    from open_clip_hn.config import HNConfig
    from open_clip_hn.run import HardNegativeRun, TrainCaptions

    captions = scene_captions(250, seed=5)
    csv = tmp_path / "train.csv"
    csv.write_text("filepath\ttitle\n" + "".join(f"img{i}.png\t{c}\n" for i, c in enumerate(captions)))
    source = TrainCaptions(str(csv), is_csv=True, csv_separator="\t", csv_caption_key="title")
    run = HardNegativeRun(HNConfig(negatives="online", plausibility="train-data"))
    model = run.plausibility(source)
    assert model.meta["captions"] == 250 and model.identity == P.captions_identity(captions)
    assert model.path is not None and P.load_model(model.path).identity == model.identity  # workers load it
    assert HardNegativeRun(HNConfig(negatives="online")).plausibility(source) is None
    csv.write_text("filepath\ttitle\n" + "".join(f"img{i}.png\t{c}\n" for i, c in enumerate(captions[:20])))
    with pytest.raises(P.PlausibilityError, match=f"20 usable captions; .*at least {P.MIN_CAPTIONS}"):
        run.plausibility(source)


def test_trainer_reads_a_caption_table_by_openclips_caption_column(tmp_path):
    """--hn-plausibility FILE.csv: the trainer reads the column OpenCLIP's --csv-caption-key names
    (an OpenCLIP training CSV's own 'title', by default), and a missing one is named by that flag."""
    from open_clip_hn.config import HNConfig
    from open_clip_hn.run import HardNegativeRun, TrainCaptions

    captions = scene_captions(220, seed=9)
    table = tmp_path / "captions.csv"
    table.write_text("filepath\ttitle\n" + "".join(f"img{i}.png\t{c}\n" for i, c in enumerate(captions)))
    run = HardNegativeRun(HNConfig(negatives="online", plausibility=str(table)))
    shards = TrainCaptions("shards/{0..9}.tar", is_csv=False)  # its csv_caption_key: OpenCLIP's 'title'
    assert run.plausibility(shards).meta["captions"] == 220
    renamed = TrainCaptions("shards/{0..9}.tar", is_csv=False, csv_caption_key="caption")
    with pytest.raises(P.PlausibilityError, match=r"no column 'caption' .*pass --csv-caption-key NAME"):
        run.plausibility(renamed)


def test_model_from_shards_drives_precompute(tmp_path):
    """`plausibility --shards` builds the model from webdataset captions; `precompute
    --plausibility` writes the filtered negatives (the same as the library's)."""
    import io
    import tarfile

    captions = scene_captions(240, seed=7)
    shard = tmp_path / "in-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, caption in enumerate(captions):
            data = caption.encode()
            info = tarfile.TarInfo(f"{i:05d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    saved = tmp_path / "m.npz"
    assert main(["plausibility", "--shards", str(shard), "--output", str(saved)]) == 0
    assert P._read(saved).meta["captions"] == len(captions)
    out = tmp_path / "out"
    assert main(["precompute", "--shards", str(shard), "--output-dir", str(out), "--plausibility", str(saved)]) == 0
    with tarfile.open(out / shard.name) as tar:
        written = {m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".neg.json")}
    generator = NegativeGenerator(plausibility=str(saved))
    assert [written[f"{i:05d}.neg.json"] for i in range(20)] == [generator.generate(c, 4) for c in captions[:20]]
    # the folder records the filter: finishing it without the filter (or with another) is refused
    assert main(["precompute", "--shards", str(shard), "--output-dir", str(out)]) == 2


def test_sugarcrepe_files_are_read_as_the_evaluation_reads_them(tmp_path):
    """The audit read SugarCrepe's files with json.loads: an id given twice kept only its last
    record without a word, and a byte-order mark failed; it now uses the evaluation's reader."""
    import pytest

    from open_clip_hn.negatives.audit import AuditError, read_sugarcrepe

    record = '{"filename": "a.jpg", "caption": "a dog", "negative_caption": "a cat"}'
    (tmp_path / "swap_obj.json").write_text("\ufeff{" + f'"1": {record}, "2": {record}' + "}", encoding="utf-8")
    assert read_sugarcrepe([str(tmp_path)]) == {"swap_objects": [("a dog", "a cat")] * 2}
    (tmp_path / "swap_obj.json").write_text("{" + f'"1": {record}, "1": {record}' + "}")
    with pytest.raises(AuditError, match=r"swap_obj.json: the key\(s\) '1' appear more than once"):
        read_sugarcrepe([str(tmp_path)])
