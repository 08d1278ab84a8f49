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


def _tiny_bpe_lm(folder) -> str:
    """A RoBERTa-style masked LM (byte-level BPE: a word after a space is 'Ġword')."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    res = _resources()
    words = sorted(w for w in {*res.plurals, *res.attr_category} if w and " " not in w)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([f"a {w} on the {w}" for w in words], vocab_size=2000, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                     cls_token="<s>", sep_token="</s>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    RobertaForMaskedLM(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=70, pad_token_id=1)).save_pretrained(folder)
    return str(folder)


def test_a_bpe_lm_proposes_whole_words(tmp_path):
    """A RoBERTa-style LM's tokens carry BPE's word-start mark ('Ġcube'), which no lexicon word
    matches: --hn-lm with such a model silently produced no edit. The mark is read as a word
    start, and word pieces without it are not proposed."""
    from open_clip_hn.negatives.lm import MaskedLMProposer, whole_words

    proposer = MaskedLMProposer(_tiny_bpe_lm(tmp_path))
    assert proposer.word_start == "Ġ"
    proposals = proposer.propose("a red cube on the table".split(), 2)
    assert proposals and all(w.isalpha() and not w.startswith("Ġ") for w in proposals)
    assert whole_words(["Ġcube", "ne", "Ġ", "Ġred"], "Ġ") == ["cube", "red"]
    assert whole_words(["▁cube", "▁re", "d"], "▁") == ["cube", "re"]
    assert whole_words(["cube", "##ne", "red"], None) == ["cube", "red"]
    assert whole_words(["Ġcube", "dog"], "Ġ", first=True) == ["cube", "dog"]  # no space before it
    assert proposer.propose("red cube on the table".split(), 0)  # a caption's first word
    res = _resources()
    assert any(w in res.nouns or w in res.attr_category for w in proposals), proposals


def test_a_base_model_without_its_masked_lm_head_is_refused(tmp_path):
    """A BertModel saved without the MLM head loaded with a random head (transformers' load report
    on stderr only) and trained on random proposals."""
    import pytest
    from transformers import BertModel

    from open_clip_hn.negatives.lm import check_masked_lm

    _tiny_lm(tmp_path)
    BertModel.from_pretrained(tmp_path).save_pretrained(tmp_path)  # the encoder alone
    with pytest.raises(ValueError, match=r"lacks weights of a masked LM \(cls\.predictions.*base "
                                         r"model saved without its masked-LM head"):
        check_masked_lm(str(tmp_path), "--hn-lm")
