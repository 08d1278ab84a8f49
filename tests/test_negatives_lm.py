"""The optional masked-LM route with a tiny, randomly initialised local model (nothing downloaded)."""

from __future__ import annotations

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
