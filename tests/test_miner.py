"""Memory bank FIFO and the cross-modal miner: reference, backends, false-negative filter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import unit
from open_clip_hn import miner as miner_module
from open_clip_hn.memory_bank import MemoryBank
from open_clip_hn.miner import mine

D = 16


def filled_bank(rows: int, seed: int, fp16: bool = False) -> MemoryBank:
    bank = MemoryBank(rows, fp16=fp16)
    bank.push(unit(rows, D, seed=seed), unit(rows, D, seed=seed + 1))
    return bank


def reference_mine(image, text, bank_image, bank_text, k, threshold):
    """Loop version: score every entry, keep the top 16 x (2k+8) by score (the miner's reach),
    drop false negatives, take the first k."""
    text_rows, image_rows = [], []
    for a in range(image.shape[0]):
        for sign, out in ((1, text_rows), (-1, image_rows)):
            scores = [sign * (float(image[a] @ bank_image[m]) - float(text[a] @ bank_text[m]))
                      for m in range(bank_image.shape[0])]
            order = sorted(range(len(scores)), key=lambda m: -scores[m])[:16 * (2 * k + 8)]
            kept = [m for m in order if float(image[a] @ bank_image[m]) < min(threshold, 0.999)
                    and float(text[a] @ bank_text[m]) < min(threshold, 0.999)]
            out.append(kept[:k])
    return text_rows, image_rows


def as_lists(index, valid):
    return [[int(i) for i, v in zip(row, ok) if v] for row, ok in zip(index, valid)]


def test_bank_is_a_fifo_of_the_last_n_pairs():
    bank = MemoryBank(5)
    image, text = unit(7, D, seed=0), unit(7, D, seed=1)
    bank.push(image[:3], text[:3])
    assert len(bank) == 3 and torch.allclose(bank.images(), image[:3])
    bank.push(image[3:], text[3:])
    assert len(bank) == 5
    matches = bank.images() @ image.T  # entry x pushed pair: cosine 1 where they are the same
    assert (matches.argmax(dim=1).sort().values == torch.arange(2, 7)).all()
    assert torch.allclose(bank.texts()[bank.pointer - 1], text[6])


def test_bank_fp16_storage_and_state_round_trip():
    bank = filled_bank(8, seed=2, fp16=True)
    assert bank.entries().dtype == torch.float16 and bank.nbytes() == 8 * 2 * D * 2
    other = MemoryBank(8, fp16=True)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.entries(), bank.entries()) and other.pointer == bank.pointer
    saved = bank.state_dict()
    kept = saved["storage"].clone()
    other.load_state_dict(saved)
    other.push(unit(3, D, seed=9), unit(3, D, seed=10))
    assert torch.equal(saved["storage"], kept)  # the loaded copy, not the caller's tensor, moved on


def test_miner_matches_loop_reference():
    bank = filled_bank(60, seed=3)
    image, text = unit(5, D, seed=4), unit(5, D, seed=5)
    found = mine(image, text, bank.entries(), k=4, false_negative_threshold=0.5)
    ref_text, ref_image = reference_mine(image, text, bank.images(), bank.texts(), 4, 0.5)
    assert as_lists(found.text_index, found.text_valid) == ref_text
    assert as_lists(found.image_index, found.image_valid) == ref_image


@pytest.mark.parametrize("fp16", [False, True])
def test_torch_and_faiss_return_the_same_indices(fp16, monkeypatch):
    monkeypatch.setattr(miner_module, "SEARCH_CHUNK_ROWS", 700)  # exercise the chunked scan
    monkeypatch.setattr(miner_module, "FILTER_CHUNK_BYTES", 4 * 700 * 5)  # and query blocks of 5
    bank = filled_bank(3000, seed=6, fp16=fp16)
    image, text = unit(32, D, seed=7), unit(32, D, seed=8)
    a = mine(image, text, bank.entries(), k=8, false_negative_threshold=0.9, backend="torch")
    b = mine(image, text, bank.entries(), k=8, false_negative_threshold=0.9, backend="faiss")
    for name in ("text_index", "text_valid", "image_index", "image_valid"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.text_valid.all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.sampled_from([0.3, 0.9, 1.0, 2.0]),
       backend=st.sampled_from(["torch", "faiss"]))
def test_false_negative_filter_never_returns_the_anchors_own_pair(seed, threshold, backend):
    image, text = unit(6, D, seed=seed), unit(6, D, seed=seed + 1)
    bank = MemoryBank(30)
    bank.push(unit(12, D, seed=seed + 2), unit(12, D, seed=seed + 3))
    bank.push(image, text)  # the anchors' own pairs sit in the bank (rows 12..17)
    bank.push(unit(12, D, seed=seed + 4), unit(12, D, seed=seed + 5))
    found = mine(image, text, bank.entries(), k=5, false_negative_threshold=threshold, backend=backend)
    own = torch.arange(12, 18).unsqueeze(1)
    for index, valid in ((found.text_index, found.text_valid), (found.image_index, found.image_valid)):
        assert not ((index == own) & valid).any()
        images, texts = bank.images()[index], bank.texts()[index]
        image_cos = torch.einsum("ad,akd->ak", image, images)[valid]
        text_cos = torch.einsum("ad,akd->ak", text, texts)[valid]
        limit = min(threshold, 0.999)
        assert (image_cos < limit).all() and (text_cos < limit).all()


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_near_copies_of_the_anchor_do_not_crowd_out_the_negatives(backend):
    """40 near-copies of the anchor's image (unrelated captions) score highest and are dropped by
    the false-negative filter; the 2k+8 candidates first fetched held 1 valid negative of 16. The
    miner searches further and returns 16, the same as the loop reference."""
    torch.manual_seed(0)
    image, text = unit(1, D, seed=11), unit(1, D, seed=12)
    copies = torch.nn.functional.normalize(image + 0.2 * unit(40, D, seed=13), dim=1)
    bank = MemoryBank(1040)
    bank.push(copies, unit(40, D, seed=14))
    bank.push(unit(1000, D, seed=15), unit(1000, D, seed=16))
    assert ((copies @ image.T) >= 0.9).all()
    found = mine(image, text, bank.entries(), k=16, false_negative_threshold=0.9, backend=backend)
    assert found.text_valid.sum() == 16
    ref_text, ref_image = reference_mine(image, text, bank.images(), bank.texts(), 16, 0.9)
    assert as_lists(found.text_index, found.text_valid) == ref_text
    assert as_lists(found.image_index, found.image_valid) == ref_image


def test_empty_bank_mines_nothing():
    found = mine(unit(3, D, seed=9), unit(3, D, seed=10), MemoryBank(4).entries(), k=2,
                 false_negative_threshold=0.9)
    assert found.text_index.shape == (3, 2) and not found.text_valid.any() and not found.image_valid.any()


def test_a_bank_larger_than_the_device_memory_is_refused_before_training():
    from open_clip_hn.memory_bank import bank_bytes, check_bank_fits

    assert bank_bytes(65536, 512, fp16=False) == 65536 * 2 * 512 * 4
    check_bank_fits(65536, 512, False, available=2**30, where="cpu")  # 256 MiB of 1 GiB: fine
    with pytest.raises(ValueError, match=r"--hn-memory-bank-size 1000000: .*1\.0 GiB free on cuda:0; "
                                         r"use a smaller size or --hn-memory-bank-fp16"):
        check_bank_fits(1_000_000, 512, False, available=2**30, where="cuda:0")
    with pytest.raises(ValueError) as fp16:
        check_bank_fits(1_000_000, 512, True, available=2**30, where="cpu")
    assert "--hn-memory-bank-fp16" not in str(fp16.value)
