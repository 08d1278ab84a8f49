"""The seam between OpenCLIP's loader and its train step: packing, unpacking, model hooks."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from conftest import TINY_MODEL, scene_words
from open_clip_hn.packing import (PackedNegativeTokenizer, attach_model_hooks, encode_precomputed_caption,
                                  samples_with_precomputed_negatives, unpack_texts)
from open_clip_hn.negatives.taxonomy import TYPE_TO_ID


class FixedGenerator:
    """Stands in for the NLTK generator: a fixed list of negatives per caption."""

    def __init__(self, table: dict[str, list[dict[str, str]]]):
        self.table = table

    def generate(self, caption, k):
        return self.table.get(caption, [])[:k]


CAPTION = "a red cube to the left of a blue ball"
NEGATIVES = [
    {"text": "a blue cube to the left of a red ball", "type": "swap_attributes"},
    {"text": "a red cube to the right of a blue ball", "type": "replace_relation"},
]


def test_pack_unpack_round_trip(tokenizer):
    packer = PackedNegativeTokenizer(tokenizer, 3, FixedGenerator({CAPTION: NEGATIVES}))
    rows = torch.cat([packer(CAPTION), packer("two green balls")])  # what the loader stacks
    unpacked = unpack_texts(rows, 3)
    assert unpacked is not None
    assert unpacked.tokens.shape == (2 * 4, 32)
    expected = tokenizer([CAPTION, NEGATIVES[0]["text"], NEGATIVES[1]["text"], "",
                          "two green balls", "", "", ""])
    assert torch.equal(unpacked.tokens, expected)
    assert unpacked.neg_mask.tolist() == [[True, True, False], [False, False, False]]
    assert unpacked.neg_types.tolist() == [
        [TYPE_TO_ID["swap_attributes"], TYPE_TO_ID["replace_relation"], -1], [-1, -1, -1]]


def test_plain_tokens_are_not_unpacked(tokenizer):
    assert unpack_texts(tokenizer([CAPTION, "x"]), 2) is None
    assert unpack_texts(tokenizer([CAPTION, "x", "y"]), 2) is None  # 3 rows of 32: no sentinel


@pytest.mark.parametrize("bad", ["", "   ", None, 12345, b"\xff\xfe"])
def test_bad_captions_are_masked_not_crashing(tokenizer, bad):
    packer = PackedNegativeTokenizer(tokenizer, 2, FixedGenerator({}))
    unpacked = unpack_texts(packer(bad), 2)
    assert unpacked is not None and not unpacked.neg_mask.any()


def test_invalid_negatives_become_masks_never_duplicates(tokenizer):
    junk = [NEGATIVES[0], NEGATIVES[0], {"text": CAPTION.upper() + "  ", "type": "swap_objects"},
            {"text": "x", "type": "no_such_type"}, {"text": 3, "type": "swap_objects"}, "str"]
    packer = PackedNegativeTokenizer(tokenizer, 4, FixedGenerator({CAPTION: junk}))
    unpacked = unpack_texts(packer(CAPTION), 4)
    assert unpacked.neg_mask.tolist() == [[True, False, False, False]]


def test_texts_that_tokenize_like_their_caption_are_masked(caplog):
    """A caption cut at the context length hides edits past the cut: a negative, mirrored or
    converse caption that tokenizes like the caption would train the image away from its own
    caption, so it is masked (and warned about once), while edits inside the context are kept."""
    from open_clip_hn.negatives import NegativeGenerator

    short = open_clip.tokenizer.SimpleTokenizer(context_length=8)  # 6 words fit
    negatives = [{"text": "a red cube to the left of a green ball", "type": "replace_attribute"},
                 {"text": "a blue cube to the left of a red ball", "type": "swap_attributes"}]
    packer = PackedNegativeTokenizer(short, 2, FixedGenerator({CAPTION: negatives}),
                                     mirror_axes=("horizontal",), converse=NegativeGenerator(seed=0))
    with caplog.at_level("WARNING"):
        unpacked = unpack_texts(torch.cat([packer(CAPTION), packer(CAPTION)]), 2, mirror=True,
                                converse=True)
    assert unpacked.neg_mask.tolist() == [[False, True]] * 2
    assert unpacked.mirror_axis.tolist() == [0, 0]  # "right" falls inside the 6 words: kept
    assert unpacked.converse_mask.all()  # its four texts differ inside the 6 words
    assert sum("tokenize exactly like the caption" in r.message for r in caplog.records) == 1
    late = "a big red cube and a blue ball with the cube to the left of the ball"
    unpacked = unpack_texts(packer(late), 2, mirror=True, converse=True)
    assert unpacked.mirror_axis.tolist() == [-1]  # the flip's edit falls past the cut
    assert unpacked.converse_mask.tolist() == [False]  # and its converse pair goes with it
    wide = PackedNegativeTokenizer(open_clip.tokenizer.SimpleTokenizer(context_length=32), 2,
                                   FixedGenerator({CAPTION: negatives}), mirror_axes=("horizontal",),
                                   converse=NegativeGenerator(seed=0))
    unpacked = unpack_texts(wide(CAPTION), 2, mirror=True, converse=True)
    assert unpacked.neg_mask.tolist() == [[True, True]] and unpacked.converse_mask.tolist() == [True]


def test_converse_texts_that_tokenize_alike_mask_only_the_converse_pair():
    """The converse term's own twins: the caption and its mirror differ inside the context, but
    the two converse captions are cut before their relation word, so only the converse pair is
    masked and the mirrored caption still trains."""
    from open_clip_hn.negatives import NegativeGenerator

    caption = "a cube to the left of a red cube"  # converses: "a red cube to the right/left of a cube"
    short = open_clip.tokenizer.SimpleTokenizer(context_length=7)  # 5 words: "... to the left|right"
    packer = PackedNegativeTokenizer(short, 1, FixedGenerator({}), mirror_axes=("horizontal",),
                                     converse=NegativeGenerator(seed=0))
    unpacked = unpack_texts(packer(caption), 1, mirror=True, converse=True)
    assert unpacked.mirror_axis.tolist() == [0] and unpacked.converse_mask.tolist() == [False]
    wide = PackedNegativeTokenizer(open_clip.tokenizer.SimpleTokenizer(context_length=16), 1,
                                   FixedGenerator({}), mirror_axes=("horizontal",),
                                   converse=NegativeGenerator(seed=0))
    unpacked = unpack_texts(wide(caption), 1, mirror=True, converse=True)
    assert unpacked.mirror_axis.tolist() == [0] and unpacked.converse_mask.tolist() == [True]


def test_precomputed_negatives_ride_in_the_caption(tokenizer):
    samples = [{"__key__": "0", "txt": CAPTION.encode(), "neg.json": json.dumps(NEGATIVES).encode()},
               {"__key__": "1", "txt": b"a cat", "neg.json": b"{not json"}]
    errors = []
    out = list(samples_with_precomputed_negatives(iter(samples), lambda e: errors.append(e) or True))
    assert out[0]["txt"].decode() == encode_precomputed_caption(CAPTION, NEGATIVES)
    assert out[1]["txt"] == b"a cat" and len(errors) == 1  # corrupt member: warned, sample kept
    packer = PackedNegativeTokenizer(tokenizer, 2, generator=None)
    unpacked = unpack_texts(packer(out[0]["txt"].decode()), 2)
    assert unpacked.neg_mask.all()
    assert torch.equal(unpacked.tokens[0], tokenizer([CAPTION])[0])


def _worker_rows(packer, captions, workers):
    loader = torch.utils.data.DataLoader(captions, batch_size=None, num_workers=workers,
                                         collate_fn=lambda c: packer(c))
    return torch.cat(list(loader))


def test_negatives_identical_across_loader_workers(tokenizer):
    table = {f"caption {i}": NEGATIVES[: i % 3] for i in range(8)}
    packer = PackedNegativeTokenizer(tokenizer, 2, FixedGenerator(table))
    captions = list(table)
    assert torch.equal(_worker_rows(packer, captions, 0), _worker_rows(packer, captions, 2))


def test_model_hooks_encode_negatives_in_one_forward(tokenizer):
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL, output_dict=True)
    model.eval()
    packer = PackedNegativeTokenizer(tokenizer, 2, FixedGenerator({CAPTION: NEGATIVES}))
    texts = torch.cat([packer(CAPTION), packer("a cat")])
    images = torch.randn(2, 3, 32, 32)
    plain = model(images, unpack_texts(texts, 2).tokens)
    attach_model_hooks(model, 2)
    hooked = model(images, texts)
    assert torch.allclose(hooked["text_features"], plain["text_features"])
    assert hooked["hn_neg_mask"].tolist() == [[True, True], [False, False]]
    assert hooked["hn_neg_types"].shape == (2, 2)
    again = model(images, tokenizer(["a", "b"]))  # ordinary tokens: no metadata
    assert "hn_neg_mask" not in again and again["text_features"].shape == (2, 64)


def test_precomputed_negatives_keep_only_the_requested_types(tokenizer):
    packer = PackedNegativeTokenizer(tokenizer, 2, None, types=("replace_relation",))
    unpacked = unpack_texts(packer(encode_precomputed_caption(CAPTION, NEGATIVES)), 2)
    assert unpacked.neg_mask.tolist() == [[True, False]]
    assert unpacked.neg_types.tolist() == [[TYPE_TO_ID["replace_relation"], -1]]


def test_online_generator_gets_the_vocabulary(tokenizer, tmp_path, scene_shards):
    """--hn-vocabulary reaches the loader's generator: its negatives only bring in those words,
    read from a file or (train-data) from the training captions."""
    import argparse

    from open_clip_hn.config import HNConfig
    from open_clip_hn.hooks import train_tokenizer
    from open_clip_hn.run import HardNegativeRun
    from open_clip_hn.negatives.lexicon import VocabularyError

    def packer(vocabulary, train_data=scene_shards, dataset_type="webdataset", caption_key="title"):
        config = HNConfig(negatives="online", types=("replace_object", "replace_attribute"),
                          vocabulary=vocabulary)
        args = argparse.Namespace(train_data=train_data, dataset_type=dataset_type,
                                  csv_separator="\t", csv_caption_key=caption_key)
        return train_tokenizer(HardNegativeRun(config), tokenizer, args)

    words = tmp_path / "captions.txt"
    words.write_text("a red cube to the left of a blue ball\na green cone to the right of a cube\n")
    negatives = packer(str(words)).negatives_for(CAPTION, None)
    assert negatives and all(set(n["text"].split()) <= set(words.read_text().split())
                             for n in negatives)
    from_shards = packer("train-data").generator.vocabulary
    assert {"cube", "left"} <= from_shards <= scene_words()
    table = tmp_path / "train.csv"
    table.write_text("filepath\ttitle\nx.png\ta red cube above a blue ball\n")
    assert packer("train-data", str(table), "auto").generator.vocabulary == set(
        "a red cube above blue ball".split())
    with pytest.raises(VocabularyError, match="no column 'caption'.*--csv-caption-key"):
        packer("train-data", str(table), "auto", caption_key="caption")
    with pytest.raises(VocabularyError, match="nowhere.txt"):
        packer(str(tmp_path / "nowhere.txt"))
    with pytest.raises(VocabularyError, match="not a local file.*negatives vocabulary"):
        packer("train-data", "pipe:curl -s https://host/shard-{0..1}.tar")


def test_online_generator_drops_swap_reorders_when_asked(tokenizer):
    """--hn-swap-reorders reaches the loader's generator."""
    import argparse

    from open_clip_hn.config import HNConfig
    from open_clip_hn.hooks import train_tokenizer
    from open_clip_hn.run import HardNegativeRun

    args = argparse.Namespace(train_data=None, dataset_type="webdataset")
    for flag, keeps in (("keep", True), ("drop", False)):
        config = HNConfig(negatives="online", types=("swap_objects",), swap_reorders=flag)
        packer = train_tokenizer(HardNegativeRun(config), tokenizer, args)
        assert packer.generator.swap_reorders is keeps
        texts = [n["text"] for n in packer.negatives_for("a red cube to the left of a blue ball", None)]
        assert ("a blue ball to the left of a red cube" in texts) is keeps


def test_online_generator_never_yields_an_evaluations_captions(tokenizer, tmp_path):
    """--hn-exclude-negatives reaches the loader's generator with an evaluation folder's true
    captions (choice positives, image-pair and retrieval captions, not the choice negatives;
    the images need not be there) or a text file's lines."""
    import argparse

    from open_clip_hn.config import HNConfig
    from open_clip_hn.hooks import train_tokenizer
    from open_clip_hn.run import HardNegativeRun

    evaluation = tmp_path / "eval"
    (evaluation / "retrieval").mkdir(parents=True)
    for key, caption in (("0", "a red ball above a cube"), ("1", "a green cone\n")):
        (evaluation / "retrieval" / f"{key}.txt").write_text(caption)
    (evaluation / "swap_objects.json").write_text(json.dumps({"0": {
        "filename": "a.png", "caption": "A blue ball to the left of a red cube.",
        "negative_caption": "a red ball to the left of a blue cube"}}))
    (evaluation / "aro.json").write_text(json.dumps([{
        "image_path": "b.png", "true_caption": "a cube", "false_caption": "a ball"}]))
    (evaluation / "pairs.jsonl").write_text(json.dumps({
        "image_0": "a.png", "image_1": "b.png", "caption_0": "a blue cube", "caption_1": "a red cube"}) + "\n")
    args = argparse.Namespace(train_data=None, dataset_type="webdataset")

    def packer(path):
        config = HNConfig(negatives="online", types=("swap_objects",), exclude_negatives=str(path))
        return train_tokenizer(HardNegativeRun(config), tokenizer, args)
    excluded = packer(evaluation).generator.exclude
    assert excluded == {"a blue ball to the left of a red cube", "a cube", "a blue cube", "a red cube",
                        "a red ball above a cube", "a green cone"}
    texts = [n["text"] for n in packer(evaluation).negatives_for("a red cube to the left of a blue ball", None)]
    assert "a blue ball to the left of a red cube" not in texts
    lines = tmp_path / "captions.txt"
    lines.write_text("a blue ball to the left of a red cube\n\n")
    assert packer(lines).generator.exclude == {"a blue ball to the left of a red cube"}


class _BlindReader:
    """Stands in for the plausibility model: rejects negatives that mention 'right'."""

    def prefers_positive(self, positive: str, negative: str) -> bool:
        return "right" in negative


def test_blind_share_rides_with_the_negatives_and_is_logged(tokenizer):
    """With a plausibility model, each negative carries whether a text-only reader rejects it;
    the objective logs that share of the valid negatives as hn_blind."""
    from open_clip_hn.config import HNConfig
    from open_clip_hn.objective import HardNegativeLoss
    from open_clip_hn.packing import PackedOutputs

    generator = FixedGenerator({CAPTION: NEGATIVES})
    generator.plausibility = _BlindReader()
    rows = PackedNegativeTokenizer(tokenizer, 3, generator)([CAPTION, "nothing to change"])
    unpacked = unpack_texts(rows, 3)
    assert unpacked.neg_blind.tolist() == [[0, 1, -1], [-1, -1, -1]]  # -1: masked slot
    plain = unpack_texts(PackedNegativeTokenizer(tokenizer, 3, FixedGenerator({CAPTION: NEGATIVES}))(
        [CAPTION]), 3)
    assert plain.neg_blind.tolist() == [[-1, -1, -1]]  # no model, nothing known

    image = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 8), dim=-1)
    packed = PackedOutputs(unpacked.neg_mask, unpacked.neg_types, neg_blind=unpacked.neg_blind)
    config = HNConfig(negatives="online", num_negatives=3, plausibility="captions.txt")
    out = HardNegativeLoss(config)(image, text, torch.tensor(10.0), packed, output_dict=True)
    assert out["hn_blind"].item() == 0.5
    assert "hn_blind" not in HardNegativeLoss(HNConfig(negatives="online", num_negatives=3))(
        image, text, torch.tensor(10.0), packed, output_dict=True)


def test_a_caption_with_dashes_or_curly_quotes_is_trained_in_its_negatives_form(tokenizer):
    """Negatives are made from the caption with plain dashes and quotes: packed as written, the
    caption differed from each of its negatives in that token (text-only detectable)."""
    from open_clip_hn.negatives import NegativeGenerator

    caption = "a black dog \u2014 with a red collar \u2013 sitting on a \u201cwhite\u201d rug"
    rows = PackedNegativeTokenizer(tokenizer, 4, NegativeGenerator(seed=0)).pack(caption).reshape(5, -1)
    tokens, meta = rows[:, :-4], rows[:, -4:]
    assert torch.equal(tokens[0], tokenizer(['a black dog - with a red collar - sitting on a "white" rug'])[0])
    assert int(meta[1:, 1].sum()) == 4  # four negatives packed
    # the dashes' own tokens (OpenCLIP's ftfy already makes curly quotes straight)
    written = set(tokenizer(["\u2014 \u2013"])[0].tolist()) - set(tokenizer(["-"])[0].tolist())
    assert written and not written & set(tokens.flatten().tolist())
