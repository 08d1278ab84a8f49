"""Cross-modal hard-negative mining from the memory bank (CM-HNCo).

For an image anchor (I, T) a bank pair (I', T') is a hard negative text when I' is close to I
while T' is far from T: score = <I, I'> - <T, T'>. For a text anchor the roles swap and the
score is the negation. With the bank stored as rows [I' | T'], both are one inner-product
search: query [I, -T] (image anchors) or [-I, T] (text anchors) against the bank.

Mining is search (torch or faiss, same protocol) followed by one shared filter, so both
backends return the same indices up to ties of equal scores: the search fetches the top 2k + 8
candidates, the filter drops likely false negatives (cosine >= `--hn-false-negative-threshold` to
the anchor's pair in either modality; near-copies >= DUPLICATE_COSINE always) and keeps the best
k that remain. An anchor left with fewer than k (near-copies of its image fill the top of its
ranking: they score highest and are what the filter drops) is searched again with 4x the
candidates, up to MAX_FETCH_FACTOR x (2k + 8), so the k found are the best k that pass the
filter wherever that many lie within that reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DUPLICATE_COSINE = 0.999  # a bank entry this close is the anchor's own pair, whatever the flag says
SEARCH_CHUNK_ROWS = 65536  # torch search scans the bank in chunks of this many rows
MAX_FETCH_FACTOR = 16  # an anchor short of k after the filter is searched again, up to this x (2k + 8)
FILTER_CHUNK_BYTES = 1 << 28  # candidate rows gathered for the filter at once
FAISS_GPU_MAX_K = 2048  # faiss' GPU k-selection takes no more candidates per query


@dataclass(frozen=True)
class Mined:
    """Mined negatives of A anchors: for image anchors the bank texts, for text anchors the bank
    images; indices into the bank [A, k] and which of them are valid [A, k]."""

    text_index: torch.Tensor
    text_valid: torch.Tensor
    image_index: torch.Tensor
    image_valid: torch.Tensor


def candidates_to_fetch(k: int, bank_rows: int) -> int:
    return min(bank_rows, 2 * k + 8)


def torch_search(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products (scores, indices) [Q, k], scanning the bank chunk by chunk and
    the queries block by block, so a score matrix never exceeds FILTER_CHUNK_BYTES (a global
    batch of 32k anchors against a 64k bank would otherwise take 16 GiB at once)."""
    block = max(1, FILTER_CHUNK_BYTES // (4 * max(1, min(bank.shape[0], SEARCH_CHUNK_ROWS))))
    if queries.shape[0] > block:
        found = [_torch_search(queries[i:i + block], bank, k) for i in range(0, queries.shape[0], block)]
        return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
    return _torch_search(queries, bank, k)


def _torch_search(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    best_scores = queries.new_empty(queries.shape[0], 0)
    best_index = torch.empty(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for begin in range(0, bank.shape[0], SEARCH_CHUNK_ROWS):
        chunk = bank[begin:begin + SEARCH_CHUNK_ROWS].to(queries.dtype)
        scores, index = (queries @ chunk.T).topk(min(k, chunk.shape[0]), dim=1)
        best_scores = torch.cat([best_scores, scores], dim=1)
        best_index = torch.cat([best_index, index + begin], dim=1)
        best_scores, order = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
        best_index = best_index.gather(1, order)
    return best_scores, best_index


def faiss_search(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products with faiss' brute-force kNN (GPU build when the tensors are on
    a GPU and faiss sees one; otherwise on CPU). The bank changes every step, so no index is kept."""
    import faiss

    if queries.is_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take torch tensors)

        resources = faiss.StandardGpuResources()
        scores, index = faiss.knn_gpu(resources, queries.float().contiguous(), bank.contiguous(), k,
                                      metric=faiss.METRIC_INNER_PRODUCT)
        return scores, index.long()
    query_np = queries.detach().float().cpu().contiguous().numpy()
    bank_np = bank.detach().float().cpu().contiguous().numpy()
    scores, index = faiss.knn(query_np, bank_np, k, metric=faiss.METRIC_INNER_PRODUCT)
    return (torch.from_numpy(scores).to(queries.device),
            torch.from_numpy(index).long().to(queries.device))


SEARCH_BACKENDS = {"torch": torch_search, "faiss": faiss_search}


def select_valid(candidates: torch.Tensor, keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k kept candidates of each row, in rank order: (indices [A, k], valid [A, k]).
    Rows with fewer survivors are padded with index 0, marked invalid."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    index = candidates.gather(1, order)
    valid = keep.gather(1, order)
    if index.shape[1] < k:
        pad = k - index.shape[1]
        index = torch.cat([index, index.new_zeros(index.shape[0], pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], pad)], dim=1)
    return index.masked_fill(~valid, 0), valid


@torch.no_grad()
def mine(image: torch.Tensor, text: torch.Tensor, bank: torch.Tensor, k: int,
         false_negative_threshold: float, backend: str = "torch") -> Mined:
    """Mine k cross-modal hard negatives per anchor pair (image [A, D], text [A, D]) from
    `bank` [M, 2D] rows [image | text]; see the module docstring for the score and filter.
    Scores are inner products: pass L2-normalised features (OpenCLIP's are; `MemoryBank.push`
    normalises what it stores), else the threshold does not compare cosines."""
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"unknown miner backend {backend!r}; use {' or '.join(SEARCH_BACKENDS)}")
    anchors, dim = image.shape
    if bank.shape[0] == 0:
        empty = torch.zeros(anchors, k, dtype=torch.long, device=image.device)
        return Mined(empty, empty.bool(), empty, empty.bool())
    if bank.shape[1] != 2 * dim:
        raise ValueError(f"memory bank rows are {bank.shape[1] // 2}-d pairs but the features are {dim}-d")
    image, text = image.detach().float(), text.detach().float()
    queries = torch.cat([torch.cat([image, -text], dim=1), torch.cat([-image, text], dim=1)])
    anchor_image, anchor_text = torch.cat([image, image]), torch.cat([text, text])
    limit = min(false_negative_threshold, DUPLICATE_COSINE)
    fetch = candidates_to_fetch(k, bank.shape[0])
    reach = min(bank.shape[0], MAX_FETCH_FACTOR * fetch, FAISS_GPU_MAX_K if backend == "faiss" else bank.shape[0])
    index, valid = _search_and_filter(queries, anchor_image, anchor_text, bank, fetch, k, limit, backend)
    while fetch < reach:
        short = (valid.sum(dim=1) < k).nonzero().flatten()
        if short.numel() == 0:
            break
        fetch = min(reach, 4 * fetch)
        index[short], valid[short] = _search_and_filter(queries[short], anchor_image[short],
                                                        anchor_text[short], bank, fetch, k, limit, backend)
    return Mined(text_index=index[:anchors], text_valid=valid[:anchors],
                 image_index=index[anchors:], image_valid=valid[anchors:])


def _search_and_filter(queries: torch.Tensor, anchor_image: torch.Tensor, anchor_text: torch.Tensor,
                       bank: torch.Tensor, fetch: int, k: int, limit: float, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `fetch` candidates of each query, then the first k whose image and text are both
    below `limit` in cosine to the anchor's (`select_valid`). The candidates' rows are gathered
    a chunk of queries at a time, FILTER_CHUNK_BYTES at most."""
    dim = anchor_image.shape[1]
    _, candidates = SEARCH_BACKENDS[backend](queries, bank, fetch)
    candidates = candidates.clamp(min=0)  # faiss marks missing results with -1 (never when fetch <= M)
    keep = torch.empty(candidates.shape, dtype=torch.bool, device=candidates.device)
    step = max(1, FILTER_CHUNK_BYTES // (fetch * 2 * dim * 4))
    for begin in range(0, len(queries), step):
        part = slice(begin, begin + step)
        rows = bank[candidates[part]].float()  # [q, fetch, 2D]
        image_cos = torch.einsum("qd,qcd->qc", anchor_image[part], rows[..., :dim])
        text_cos = torch.einsum("qd,qcd->qc", anchor_text[part], rows[..., dim:])
        keep[part] = (image_cos < limit) & (text_cos < limit)
    return select_valid(candidates, keep, k)
