"""The optional masked-LM route with a tiny, randomly initialised local model (nothing downloaded)."""

from __future__ import annotations

import re

from open_clip_hn.negatives import NegativeGenerator
from open_clip_hn.negatives.generator import _resources


def _tiny_lm(folder) -> str:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    torch.manual_seed(0)

    res = _resources()
    words = sorted({"a", "the", "on", "of", "to", "left", *res.plurals, *res.attr_category} - {""})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[w for w in words if " " not in w]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(folder)
    return str(folder)


def test_lm_proposals_pass_the_validity_tables(tmp_path):
    path = _tiny_lm(tmp_path)
    res = _resources()
    generator = NegativeGenerator(types="replace_object,replace_attribute", seed=0, lm_path=path)
    caption = "a red cube to the left of a small blue sphere"
    out = generator.generate(caption, 6)
    assert out and len({n["text"] for n in out}) == len(out)
    for item in out:
        new = set(item["text"].split()) - set(caption.split())
        assert len(new) == 1
        word = new.pop()
        if item["type"] == "replace_object":
            assert word in res.noun_candidates["cube"] + res.noun_candidates["sphere"]
        else:
            assert word in res.attr_candidates["red"] + res.attr_candidates["small"] + res.attr_candidates["blue"]
    proposer = generator._lm()
    assert proposer.propose(["a", "red", "cube"], 2)  # the model really proposes words
    assert out == NegativeGenerator(types="replace_object,replace_attribute", seed=0, lm_path=path).generate(caption, 6)


def test_a_path_that_is_not_a_masked_lm_is_named_with_the_reason(tmp_path):
    import shutil

    import pytest

    from open_clip_hn.negatives.lm import check_masked_lm

    good = tmp_path / "good"
    good.mkdir()
    check_masked_lm(_tiny_lm(good), "--hn-lm")
    no_weights = shutil.copytree(good, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    no_tokenizer = shutil.copytree(good, tmp_path / "no_tokenizer")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path, reason in ((tmp_path / "none", "no such folder"), (tmp_path / "file", "not a folder"),
                         (tmp_path / "empty", "no config.json"),
                         (no_weights, r"not a loadable masked LM \(OSError: .*model.safetensors"),
                         (no_tokenizer, "its tokenizer has no mask token or no words")):
        with pytest.raises(ValueError, match=rf"^--hn-lm {re.escape(str(path))}: {reason}.*save_pretrained$"):
            check_masked_lm(str(path), "--hn-lm")


def test_hn_lm_is_refused_where_it_does_nothing(tmp_path):
    """(A folder that does not load is refused by the hooks before training: test_negatives_input.)"""
    import pytest

    from open_clip_hn.config import HNConfig

    (tmp_path / "lm").mkdir()
    path = _tiny_lm(tmp_path / "lm")
    HNConfig(negatives="online", types=("replace_object",), lm=path).validate()
    off = r"--hn-lm acts on online replace_object and replace_attribute negatives \(--hn-negatives " \
          r"online, --hn-types with either\), which is off in this run: turn it on, or drop --hn-lm"
    cases = [(dict(negatives="precomputed"), off + r"; for precomputed negatives pass --lm to `python -m"),
             (dict(negatives="none"), off + "$"),
             (dict(negatives="online", types=("swap_objects", "replace_relation")), off + "$")]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            HNConfig(**{"lm": path, **flags}).validate()
