"""Cross-modal hard-negative mining from the memory bank (CM-HNCo).

For an image anchor (I, T) a bank pair (I', T') is a hard negative text when I' is close to I
while T' is far from T: score = <I, I'> - <T, T'>. For a text anchor the roles swap and the
score is the negation. With the bank stored as rows [I' | T'], both are one inner-product
search: query [I, -T] (image anchors) or [-I, T] (text anchors) against the bank.

Mining is search (torch or faiss, same protocol) followed by one shared filter, so both
backends return the same indices: the search fetches the top 2k + 8 candidates, the filter drops
likely false negatives (cosine >= `--hn-false-negative-threshold` to the anchor's pair in either
modality; near-copies >= DUPLICATE_COSINE always) and keeps the best k that remain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DUPLICATE_COSINE = 0.999  # a bank entry this close is the anchor's own pair, whatever the flag says
SEARCH_CHUNK_ROWS = 65536  # torch search scans the bank in chunks of this many rows


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
    """Exact top-k inner products (scores, indices) [Q, k], scanning the bank chunk by chunk so
    the score matrix never exceeds Q x SEARCH_CHUNK_ROWS."""
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
    `bank` [M, 2D] rows [image | text]; see the module docstring for the score and filter."""
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
    fetch = candidates_to_fetch(k, bank.shape[0])
    _, candidates = SEARCH_BACKENDS[backend](queries, bank, fetch)
    candidates = candidates.clamp(min=0)  # faiss marks missing results with -1 (never when fetch <= M)
    rows = bank[candidates.flatten()].float().view(2 * anchors, fetch, 2 * dim)
    anchor_image, anchor_text = torch.cat([image, image]), torch.cat([text, text])
    image_cos = torch.einsum("qd,qcd->qc", anchor_image, rows[..., :dim])
    text_cos = torch.einsum("qd,qcd->qc", anchor_text, rows[..., dim:])
    limit = min(false_negative_threshold, DUPLICATE_COSINE)
    keep = (image_cos < limit) & (text_cos < limit)
    index, valid = select_valid(candidates, keep, k)
    return Mined(text_index=index[:anchors], text_valid=valid[:anchors],
                 image_index=index[anchors:], image_valid=valid[anchors:])
