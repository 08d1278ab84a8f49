"""Hard image negatives: a kNN index over webdataset shards and a stage that groups batches by it.

NegCLIP's gain from hard *image* negatives needs batches that hold visually similar images. On
webdataset shards the loader only sees a shuffled stream, so similar images almost never meet.
`python -m open_clip_hn.neighbors build` embeds every image once with an OpenCLIP model, finds
each image's k nearest neighbours with faiss, and records where each sample's tar members lie
(byte offsets). `write_given` writes the same index from neighbours chosen another way (e.g.
samples whose caption is another's hard negative: the dataset's own image-side negatives);
`python -m open_clip_hn.neighbors rebinding` chooses, without a model, the samples whose captions
hold the same words bound differently (`rebinding_neighbors`).
During training `NeighborStage` follows each sample of the shuffled stream with some of its
neighbours, read straight from their shards by offset, so every batch holds small groups of
look-alike images while the order of the groups stays webdataset's shuffle.

Output directory:
  build.json                 model the embeddings come from, a checkpoint by path and content (a
                             resumed build must match it), or for `write_given` the description
                             of the given neighbours
  catalog/<shard>.json       per shard: identity (size and a digest of its ends: content, not
                             name), sample keys, member offsets
  scanned/<shard>.json       the same, written as each shard is scanned (a killed scan resumes
                             where it stopped); moved into catalog/ once the work starts, so a
                             refused or failed rerun leaves a finished index's files as they were
  embeddings/<shard>.npy     per shard: L2-normalised image embeddings, float16 (`build` only)
  neighbors.npy, similarities.npy   [N, k] global sample ids (-1 = none, at the end of a row) and
                             cosine similarities (`write_given`: 1 for a neighbour, 0 for none)
  index.json                 manifest: shards (name, identity, count) in id order, k, index
                             type, samples with a neighbour; written last, so its presence means
                             the index is complete. Training refuses shards whose content differs
                             from the identity, and an index in which no sample has a neighbour.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .argtypes import non_negative_int, positive_int, torch_device, unit_float
from .eval import IMAGE_ERRORS, check_model, fetch_pretrained, load_model, trained_as_problems
from . import files
from .files import atomic_write_bytes, atomic_write_json, content_identity
from .negatives.shards import compression, member_end, trailing_damage
from .sample_order import find_stages, is_filter

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the extensions OpenCLIP's pipeline renames to image
MANIFEST = "index.json"
FORMAT_VERSION = 2  # 2: shards identified by content (files.content_identity), not by size
CHECKPOINT_CONTENT = "pretrained_identity"  # build.json: a --pretrained file's content_identity
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key.ext split


# ---------------------------------------------------------------------------- files


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def local_shards(spec: str) -> list[str]:
    """The shard files of `--shards`, all present, uncompressed and with unique names
    (`files.local_shards`): the index reads images back by byte offset, which a compressed
    tar does not allow."""
    paths = files.local_shards(spec, unique_because="the index names shards by file name")
    compressed = [path for path in paths if compression(path)]
    if compressed:
        raise ValueError(f"--shards: {len(compressed)} of {len(paths)} shard(s) are compressed "
                         f"({compressed[0]} is {compression(compressed[0])}); the index reads "
                         "images back by byte offset, so it needs plain tars: decompress them "
                         "(e.g. `gunzip -k` and rename to .tar) and index those")
    return paths


def scan_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Samples of one tar in stream order: (key, {ext: (byte offset, size)}) for those that
    have a caption and an image, the ones OpenCLIP's pipeline keeps."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            end = 0
            for member in tar:
                end = member_end(member)
                match = _MEMBER.match(member.name) if member.isfile() else None
                if match:
                    samples.setdefault(match.group(1), {})[match.group(2).lower()] = (member.offset_data,
                                                                             member.size)
        damage = trailing_damage(path, end, os.path.getsize(path))
    except (tarfile.TarError, EOFError) as err:
        raise ValueError(f"shard {path} cannot be read as an uncompressed tar ({err}); is it "
                         "damaged, or not a webdataset shard?") from None
    if damage:
        raise ValueError(f"shard {path} is damaged: {damage[0]}; re-create or re-download it")
    return [(key, members) for key, members in samples.items()
            if "txt" in members and any(ext in members for ext in IMAGE_EXTS)]


def read_member(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


# ---------------------------------------------------------------------------- kNN (pure)


def _pq_subquantizers(dim: int) -> int:
    """Largest divisor of dim that is <= dim / 8 (8-bit codes of ~8 dims each)."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def knn_search(embeddings: np.ndarray, k: int, exact_max: int = 1_000_000, nlist: int | None = None,
               nprobe: int = 32, refine: int = 4, use_gpu: bool | None = None, chunk: int = 4096,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """k nearest neighbours (inner product) of every row among the other rows.

    Exact `IndexFlatIP` up to `exact_max` rows; beyond, all-pairs search grows as N^2, so an
    IVF-PQ index (4-bit fast-scan codes: cheap to train) proposes `refine * k` candidates that
    are re-ranked exactly against the embeddings, which are in memory anyway. Returns ids
    [N, k] (int64, -1 where fewer exist), similarities [N, k] and the index description. Uses
    every GPU when faiss has GPU support and `use_gpu` allows.
    """
    import faiss
    from tqdm import tqdm

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = x.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n <= exact_max:
        nlist, description = None, "Flat"
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = nlist or int(2 ** round(math.log2(4 * math.sqrt(n))))
        description = f"IVF{nlist},PQ{_pq_subquantizers(dim)}x4fs"
        index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
    on_gpu = use_gpu is not False and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0
    if on_gpu:
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = True  # PQ lookup tables above 48 sub-quantizers need float16 on GPU
        index = faiss.index_cpu_to_all_gpus(index, co=options)
        description += " (GPU)"
    if not index.is_trained:
        rng = np.random.default_rng(0)
        index.train(x[rng.choice(n, size=min(n, 64 * nlist), replace=False)])  # ~64 per list
    index.add(x)
    if nlist is not None:
        space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
        space.set_index_parameter(index, "nprobe", nprobe)
    search_k = min(n, k + 1 if nlist is None else refine * k + 1)
    ids = np.full((n, k), -1, dtype=np.int64)
    sims = np.zeros((n, k), dtype=np.float32)
    for start in tqdm(range(0, n, chunk), desc="kNN search", unit="chunk", disable=not progress):
        queries = x[start:start + chunk]
        found_sims, found_ids = index.search(queries, search_k)
        if nlist is not None:
            found_ids, found_sims = _rerank(x, queries, found_ids)
        for row, (row_ids, row_sims) in enumerate(zip(found_ids, found_sims)):
            keep = (row_ids != start + row) & (row_ids >= 0)  # drop self, keep order
            row_ids, row_sims = row_ids[keep][:k], row_sims[keep][:k]
            ids[start + row, :len(row_ids)] = row_ids
            sims[start + row, :len(row_sims)] = row_sims
    return ids, sims, description


_WORD = re.compile(r"[a-z0-9]+")
PAIR_WEIGHT = 0.25  # shared word pairs weigh a quarter of shared words, so shared words lead


def _tfidf_rows(rows: list[list[Any]]) -> tuple[torch.Tensor, list[dict[int, float]], torch.Tensor]:
    """Rows of features as a sparse [N, V] tf-idf matrix, the same rows as dicts, and
    each row's L2 norm: function words that every caption has weigh next to nothing."""
    vocab: dict[Any, int] = {}
    counts = []
    for feats in rows:
        row: dict[int, float] = {}
        for feat in feats:
            column = vocab.setdefault(feat, len(vocab))
            row[column] = row.get(column, 0.0) + 1.0
        counts.append(row)
    df = np.zeros(max(1, len(vocab)))
    for row in counts:
        df[list(row)] += 1
    idf = np.log(len(rows) / np.maximum(df, 1))
    weighted = [{j: x * float(idf[j]) for j, x in row.items()} for row in counts]
    places = [(i, j) for i, row in enumerate(weighted) for j in row]
    values = [x for row in weighted for x in row.values()]
    matrix = torch.sparse_coo_tensor(torch.tensor(places, dtype=torch.int64).reshape(-1, 2).T,
                                     torch.tensor(values, dtype=torch.float32),
                                     (len(rows), max(1, len(vocab))), check_invariants=True).coalesce()
    norms = torch.tensor([math.sqrt(sum(x * x for x in row.values())) for row in weighted]).clamp_min(1e-12)
    return matrix, weighted, norms


def _dense_rows(rows: list[dict[int, float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        if row:
            out[i, list(row)] = torch.tensor(list(row.values()), dtype=torch.float32)
    return out


def rebinding_neighbors(captions: list[str], k: int = 4, min_word_overlap: float = 0.5,
                        chunk_cells: int = 1 << 25) -> np.ndarray:
    """For each caption, the k others with many words in common and few adjacent word pairs in
    common (the words weigh four times the pairs): "a red cube left of a blue ball" finds "a blue
    cube left of a red ball".
    Their images hold the same things bound differently, the image-side counterpart of a swap
    negative, which an image tower cannot tell apart by its bag of features.

    Score = cos(tf-idf words) - PAIR_WEIGHT * cos(tf-idf word pairs) among captions whose word
    cosine is at least `min_word_overlap` (and above 0: one word in common at least); captions
    with the same words in the same order (duplicates) never count.
    Exact all-pairs, O(N^2) time in chunks of `chunk_cells` scores: minutes at 10^5 captions; for
    millions, choose neighbours with a kNN over text embeddings instead. Returns [N, k] ids, -1
    at the end of a row that has fewer.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tokens = [_WORD.findall(caption.lower()) for caption in captions]
    n = len(tokens)
    words = _tfidf_rows(tokens)
    pairs = _tfidf_rows([list(zip(t, t[1:])) for t in tokens])
    # one id per distinct word sequence: duplicates share it and are masked in one comparison
    groups: dict[str, int] = {}
    group = torch.tensor([groups.setdefault(" ".join(t), len(groups)) for t in tokens], dtype=torch.int64)
    ids = np.full((n, k), -1, dtype=np.int64)
    step = max(1, chunk_cells // max(1, n, words[0].shape[1], pairs[0].shape[1]))
    for start in range(0, n, step):
        stop = min(n, start + step)
        word_cos, pair_cos = (
            (matrix @ _dense_rows(rows[start:stop], matrix.shape[1]).T).T / norms[None] / norms[start:stop, None]
            for matrix, rows, norms in (words, pairs))
        score = word_cos - PAIR_WEIGHT * pair_cos
        # a hair below the threshold (float32 puts equal bags at 0.9999999, not 1) but never
        # captions without a word in common
        score[(word_cos < min_word_overlap - 1e-6) | (word_cos <= 0)] = -math.inf
        score[group[start:stop, None] == group[None]] = -math.inf
        top = torch.topk(score, min(k, n), dim=1)
        found = torch.where(torch.isfinite(top.values), top.indices, -1).numpy()
        ids[start:stop, :found.shape[1]] = found  # -inf sorts last, so -1 only ends a row
    return ids


def _rerank(x: np.ndarray, queries: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates sorted by their exact inner product with each query (-1 slots last)."""
    exact = np.einsum("qd,qcd->qc", queries, x[np.maximum(candidates, 0)])
    exact[candidates < 0] = -np.inf
    order = np.argsort(-exact, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(exact, order, 1)


# ---------------------------------------------------------------------------- build (I/O)


class _ShardImages(torch.utils.data.IterableDataset):
    """Iterable dataset: each worker decodes whole shards and yields (shard, images, last);
    an image that cannot be decoded yields (shard, message, True) instead, so the main process
    raises one clean error naming the shard and sample (not a worker's traceback)."""

    def __init__(self, paths: list[str], catalogs: list[list], preprocess: Callable, batch_size: int):
        self.paths, self.catalogs = paths, catalogs
        self.preprocess, self.batch_size = preprocess, batch_size

    def __iter__(self) -> Iterator[tuple[int, Any, bool]]:
        from PIL import Image

        info = torch.utils.data.get_worker_info()
        mine = range(len(self.paths)) if info is None else range(info.id, len(self.paths), info.num_workers)
        for shard in mine:
            samples = self.catalogs[shard]
            if not samples:
                yield shard, torch.empty(0), True
                continue
            with open(self.paths[shard], "rb") as handle:
                for start in range(0, len(samples), self.batch_size):
                    images = []
                    for key, members in samples[start:start + self.batch_size]:
                        offset, size = members[next(e for e in IMAGE_EXTS if e in members)]
                        handle.seek(offset)
                        try:
                            image = Image.open(io.BytesIO(handle.read(size))).convert("RGB")
                        except IMAGE_ERRORS as err:
                            yield shard, (f"shard {self.paths[shard]}: the image of sample {key} "
                                          f"cannot be decoded ({err}); fix or drop the sample "
                                          "(its shard is damaged)"), True
                            return
                        images.append(self.preprocess(image))
                    yield shard, torch.stack(images), start + self.batch_size >= len(samples)


def _build_identity(model_name: str, pretrained: str | None, model_config: str | None
                    ) -> dict[str, Any]:
    """What `build` embeds with: a --pretrained checkpoint file by path and by content
    (`content_identity`), as one overwritten in place (epoch_latest.pt) holds another model.
    A tag or no checkpoint records no content, so their build.json of older versions match."""
    identity = {"model": model_name, "pretrained": pretrained,
                "model_config": os.path.basename(model_config) if model_config else None}
    if pretrained and os.path.isfile(pretrained):
        identity[CHECKPOINT_CONTENT] = content_identity(pretrained)
    return identity


def _setting_change(key: str, built: Any, now: Any) -> str:
    """One setting of build.json that differs: "--model ViT-B-32 (index: RN50)"."""
    if key == "given":
        return f"the neighbours: {now or 'embedded'!r} (index: {built or 'embedded'!r})"
    flag = "--model-config" if key == "model_config" else f"--{key}"
    return f"{flag} {now if now is not None else 'none'} (index: {built if built is not None else 'none'})"


def _check_build_identity(output: str, identity: dict[str, Any]) -> None:
    """A resumed build must embed with the same model, or its rows would not be comparable (and
    an index of given neighbours is never mixed with one of embeddings). An older version's index
    of a checkpoint file, with no record of its content, is resumed with a warning rather than
    embedded again: `_claim_output` records the content from then on."""
    path = os.path.join(output, "build.json")
    previous = _read_json(path) if os.path.exists(path) else identity
    if previous == identity:
        return
    settings = [{k: v for k, v in d.items() if k != CHECKPOINT_CONTENT}
                for d in (previous, identity) if isinstance(d, dict)]
    if len(settings) < 2 or settings[0] != settings[1]:
        differing = "; ".join(_setting_change(key, settings[0].get(key), settings[1].get(key))
                              for key in sorted(set(settings[0]) | set(settings[1]))
                              if settings[0].get(key) != settings[1].get(key)) \
            if len(settings) == 2 else f"{previous!r} (unreadable), not {identity!r}"
        raise ValueError(f"--output {output} was built with other settings: {differing}; use a "
                         "fresh --output, or the same --model/--pretrained/--model-config (build), "
                         "--k/--min-word-overlap (rebinding) or description (write_given)")
    built, now = previous.get(CHECKPOINT_CONTENT), identity.get(CHECKPOINT_CONTENT)
    where = f"--output {output} was built from --pretrained {identity['pretrained']}"
    if built is None:  # an older version's build.json: it recorded nothing else to compare
        logging.warning("%s by an older version, which did not record the checkpoint's content: it "
                        "could not be compared with the one the existing embeddings were made "
                        "with. Resuming with them; if the file was overwritten since (as "
                        "epoch_latest.pt is), stop and use a fresh --output", where)
        return
    raise ValueError(f"{where} when it held {_content(built)}; it now holds "
                     f"{_content(now) if now else 'no file'}. Its embeddings would mix two models' "
                     "(a checkpoint overwritten in place, as epoch_latest.pt is): use a fresh "
                     "--output, or pass the checkpoint the index was built from")


def _content(identity: dict[str, Any]) -> str:
    return f"{identity['size']} bytes (sha256 of its ends {identity['sha256_ends'][:12]}…)"


def _load_model(model_name: str, pretrained: str | None, model_config: str | None, device: str):
    """The image encoder and its preprocessing; bad names, unknown tags and unloadable
    checkpoints are ValueErrors naming them (the evaluation's loader, `eval.check_model`)."""
    model, preprocess, _ = load_model(model_name, pretrained, device,
                                      [model_config] if model_config else [])
    return model, preprocess


def _embeddings_usable(path: str, rows: int) -> bool:
    """A shard's embeddings file exists, reads and holds one row per sample; a damaged one (the
    writes are atomic, so damaged afterwards) is removed, with a warning, to be embedded again."""
    if not os.path.exists(path):
        return False
    try:
        usable = np.load(path, mmap_mode="r").shape[0] == rows
    except (ValueError, OSError, EOFError):
        usable = False
    if not usable:
        logging.warning("neighbors build: %s is damaged (unreadable or not %d rows); embedding "
                        "its shard again", path, rows)
        os.remove(path)
    return usable


def _embed_pending(paths: list[str], catalogs: list[list], output: str, model, preprocess,
                   device: str, batch_size: int, workers: int) -> None:
    """Embed the shards without an embeddings file yet; each shard's file lands when complete."""
    from tqdm import tqdm

    pending = [i for i, path in enumerate(paths)
               if not _embeddings_usable(os.path.join(output, "embeddings", os.path.basename(path) + ".npy"),
                                         len(catalogs[i]))]
    total = sum(len(catalogs[i]) for i in pending)
    dataset = _ShardImages([paths[i] for i in pending], [catalogs[i] for i in pending], preprocess,
                           batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    parts: dict[int, list[np.ndarray]] = {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else \
        torch.autocast("cpu", enabled=False)
    with tqdm(total=total, desc="embedding images", unit="img") as bar, torch.inference_mode(), autocast:
        for local, images, last in loader:
            if isinstance(images, str):
                raise ValueError(images)
            if len(images):
                features = model.encode_image(images.to(device), normalize=True).float().cpu().numpy()
                parts.setdefault(local, []).append(features)
                bar.update(len(images))
            if last:
                name = os.path.basename(paths[pending[local]])
                rows = parts.pop(local, [])
                embedding = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
                _atomic_save_npy(os.path.join(output, "embeddings", name + ".npy"),
                                 embedding.astype(np.float16))


def _cached_catalog(output: str, folder: str, name: str, identity: dict) -> dict | None:
    """The catalog of shard `name` in `output/folder`, if one is there for this content; an
    unreadable one is a cache to rebuild, not an error (the shard is scanned again)."""
    path = os.path.join(output, folder, name + ".json")
    try:
        stored = _read_json(path) if os.path.exists(path) else None
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("identity") == identity else None


def _scan_catalog(output: str, path: str, name: str, identity: dict) -> dict:
    """Scan a shard and keep its catalog in `output/scanned` at once: a build killed during a
    long scan loses at most this shard's, while `catalog/` stays as it was."""
    samples = scan_shard(path)
    stored = {"name": name, "identity": identity, "keys": [key for key, _ in samples],
              "members": [members for _, members in samples]}
    atomic_write_json(os.path.join(output, "scanned", name + ".json"), stored)
    return stored


def _catalog_shards(paths: list[str], output: str) -> tuple[list[list[tuple[str, dict]]], list[str]]:
    """Each shard's (key, members) in stream order, from `output/catalog` while its identity
    matches, else from `output/scanned` (scanned by an earlier, stopped run) or scanned now; and
    the names of the shards not from `catalog/`, for `_claim_output` to move there."""
    from tqdm import tqdm

    catalogs, scanned = [], []
    for path in tqdm(paths, desc="scanning shards", unit="shard"):
        name, identity = os.path.basename(path), content_identity(path)
        stored = _cached_catalog(output, "catalog", name, identity)
        if stored is None:
            stored = (_cached_catalog(output, "scanned", name, identity)
                      or _scan_catalog(output, path, name, identity))
            scanned.append(name)
        catalogs.append(list(zip(stored["keys"], stored["members"])))
    return catalogs, scanned


def _start(shards: str, output: str, identity: dict[str, Any]) -> tuple[list[str], list[list], list[str]]:
    """Expand the shards, check the output's identity, catalogue the shards; writes only to
    `output/scanned`, which a finished index does not read."""
    paths = local_shards(shards)
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output} is a file, not an index folder; pass a new folder")
    _check_build_identity(output, identity)
    return (paths, *_catalog_shards(paths, output))


def _claim_output(output: str, identity: dict[str, Any], scanned: list[str]) -> None:
    """The first write outside `scanned/`: mark the index unfinished (no manifest until it is
    rewritten), record what it is built from, move the shards scanned anew into `catalog/`
    (dropping a changed shard's stale embeddings first) and drop what is left in `scanned/`
    (other shards' or content's). Called once the work can start (model loaded, neighbours
    chosen), so a refused build leaves a finished index finished and a fresh --output free for
    other settings."""
    if os.path.exists(os.path.join(output, MANIFEST)):
        os.remove(os.path.join(output, MANIFEST))
    atomic_write_json(os.path.join(output, "build.json"), identity)
    os.makedirs(os.path.join(output, "catalog"), exist_ok=True)
    for name in scanned:
        embedding = os.path.join(output, "embeddings", name + ".npy")
        if os.path.exists(embedding):
            os.remove(embedding)
        os.replace(os.path.join(output, "scanned", name + ".json"),
                   os.path.join(output, "catalog", name + ".json"))
    shutil.rmtree(os.path.join(output, "scanned"), ignore_errors=True)


def _write_index(output: str, paths: list[str], catalogs: list[list], ids: np.ndarray,
                 sims: np.ndarray, description: str, identity: dict[str, Any]) -> str:
    """neighbors.npy, similarities.npy, then the manifest (its presence marks a finished index)."""
    _atomic_save_npy(os.path.join(output, "neighbors.npy"), ids.astype(np.int32))
    _atomic_save_npy(os.path.join(output, "similarities.npy"), sims.astype(np.float16))
    manifest = {
        "version": FORMAT_VERSION, "k": int(ids.shape[1]), "index": description,
        "num_samples": int(len(ids)), "with_neighbors": int((ids[:, 0] >= 0).sum()), **identity,
        "shards": [{"name": os.path.basename(p), "path": os.path.abspath(p),
                    "identity": content_identity(p), "num_samples": len(c)}
                   for p, c in zip(paths, catalogs)],
    }
    manifest_path = os.path.join(output, MANIFEST)
    atomic_write_json(manifest_path, manifest)
    return manifest_path


def build(shards: str, model_name: str, output: str, pretrained: str | None = None,
          model_config: str | None = None, k: int = 8, batch_size: int = 256, workers: int = 0,
          device: str | None = None, exact_max: int = 1_000_000, nlist: int | None = None,
          nprobe: int = 32) -> str:
    """Build (or resume) a neighbour index of `shards` in `output`; return the manifest path."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_model(model_name, pretrained, [model_config] if model_config else [])  # before the scan
    fetch_pretrained(model_name, pretrained)
    identity = _build_identity(model_name, pretrained, model_config)
    paths, catalogs, scanned = _start(shards, output, identity)
    if not any(catalogs):  # before the model: the refusal costs no model load
        raise ValueError(f"--shards {shards}: none of the {len(paths)} shard(s) holds a sample "
                         f"with an image ({'/'.join(IMAGE_EXTS)}) and a .txt caption")
    model, preprocess = _load_model(model_name, pretrained, model_config, device)
    _claim_output(output, identity, scanned)
    os.makedirs(os.path.join(output, "embeddings"), exist_ok=True)
    _embed_pending(paths, catalogs, output, model, preprocess, device, batch_size, workers)

    embeddings = np.concatenate([
        np.load(os.path.join(output, "embeddings", os.path.basename(p) + ".npy"))
        for p, c in zip(paths, catalogs) if c]).astype(np.float32)  # empty shards hold no rows
    ids, sims, description = knn_search(embeddings, k, exact_max=exact_max, nlist=nlist,
                                        nprobe=nprobe, progress=True)
    return _write_index(output, paths, catalogs, ids, sims, description, identity)


def write_given(shards: str, output: str, choose: Callable[[list[str]], np.ndarray],
                description: str) -> str:
    """An index whose neighbours you choose: `choose(captions)` gets every sample's caption in
    id order and returns [N, k] global ids (-1 = no neighbour), e.g. samples whose caption is
    another's hard negative, or a kNN computed elsewhere. Same format and checks as `build`."""
    identity = {"model": None, "pretrained": None, "model_config": None, "given": description}
    paths, catalogs, scanned = _start(shards, output, identity)
    captions = []
    for path, catalog in zip(paths, catalogs):
        with open(path, "rb") as handle:
            for _, members in catalog:
                offset, size = members["txt"]
                handle.seek(offset)
                captions.append(handle.read(size).decode("utf-8", "replace"))
    if not captions:
        raise ValueError(f"--shards {shards}: no sample with both a caption (.txt) and an image to "
                         "choose neighbours for; pass the training shards, whose samples carry both")
    ids = np.asarray(choose(captions))
    problem = _given_problem(ids, len(captions))
    if problem:
        raise ValueError(f"the neighbours chosen for {output} must be an [N={len(captions)}, k>=1] "
                         f"integer array of other samples' ids, -1 (none) only at the end of a "
                         f"row: {problem}")
    if not (ids[:, 0] >= 0).any():  # the stage would add nothing: training would be plain shuffle
        raise ValueError(f"no sample of the {len(captions)} got a neighbour ({description}), so "
                         f"{output} was not written; choose looser (`rebinding`: lower "
                         "--min-word-overlap) or pass more shards, so captions can pair up")
    _claim_output(output, identity, scanned)  # only now: a failed choice leaves the index as it was
    sims = np.where(ids >= 0, 1.0, 0.0)
    return _write_index(output, paths, catalogs, ids, sims, description, identity)


def write_rebinding(shards: str, output: str, k: int = 4, min_word_overlap: float = 0.5) -> str:
    """An index of rebinding neighbours (`rebinding_neighbors`) of the shards' captions."""
    return write_given(shards, output, lambda captions: rebinding_neighbors(captions, k, min_word_overlap),
                       f"rebinding neighbours: most words, fewest word pairs in common (k {k}, "
                       f"min word overlap {min_word_overlap}, pair weight {PAIR_WEIGHT})")


def _given_problem(ids: np.ndarray, count: int) -> str | None:
    """What is wrong with given neighbour ids for `count` samples (None if nothing)."""
    if ids.ndim != 2 or len(ids) != count or ids.shape[1] < 1:
        return f"got shape {ids.shape}"
    if not np.issubdtype(ids.dtype, np.integer):
        return f"got dtype {ids.dtype}"
    if ids.min() < -1 or ids.max() >= count:
        return f"ids range over [{ids.min()}, {ids.max()}]"
    selfs = np.flatnonzero((ids == np.arange(count)[:, None]).any(axis=1))
    if len(selfs):
        return f"row {selfs[0]} names its own sample"
    gaps = np.flatnonzero(((ids[:, 1:] >= 0) & (ids[:, :-1] < 0)).any(axis=1))
    if len(gaps):
        return f"row {gaps[0]} has an id after a -1 (the stage stops at the first -1)"
    return None


# ---------------------------------------------------------------------------- training side


@dataclass
class _Shard:
    name: str
    path: str
    first_id: int
    keys: list[str] | None = None
    ids: dict[str, int] | None = None
    members: list[dict[str, list[int]]] | None = None


class NeighborIndex:
    """A built index: maps (shard, key) to a global id, gives neighbours, fetches samples."""

    def __init__(self, index_dir: str, shards: list[str] | None = None, check: bool = True):
        manifest_path = os.path.join(index_dir, MANIFEST)
        if not os.path.exists(manifest_path):
            raise ValueError(f"--hn-image-neighbors {index_dir}: no {MANIFEST} (the build did not "
                             "finish); run `python -m open_clip_hn.neighbors build ... --output "
                             f"{index_dir}` again, it resumes (or `neighbors.write_given` for an "
                             "index of given neighbours)")
        try:
            manifest = _read_json(manifest_path)
        except (OSError, ValueError) as err:
            raise ValueError(f"--hn-image-neighbors {index_dir}: {manifest_path} cannot be read "
                             f"({err}); rebuild the index (`python -m open_clip_hn.neighbors build "
                             f"... --output {index_dir}` resumes)") from None
        if not isinstance(manifest, dict) or manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"--hn-image-neighbors {index_dir}: index format "
                             f"{manifest.get('version')} identifies shards by name and size only "
                             f"(this version needs {FORMAT_VERSION}: by content); rebuild it with "
                             f"`python -m open_clip_hn.neighbors build ... --output {index_dir}`")
        self.index_dir = index_dir
        self.k = manifest["k"]
        built = {s["name"]: s for s in manifest["shards"]}
        paths = {s["name"]: s["path"] for s in manifest["shards"]}
        if shards is not None:
            if check:
                _check_same_shards(index_dir, built, shards)
            paths.update({os.path.basename(p): p for p in shards})
        self._shards: list[_Shard] = []
        first = 0
        for entry in manifest["shards"]:
            self._shards.append(_Shard(entry["name"], paths[entry["name"]], first))
            first += entry["num_samples"]
        self._by_name = {s.name: s for s in self._shards}
        self._starts = np.array([s.first_id for s in self._shards])
        try:
            self.neighbors = np.load(os.path.join(index_dir, "neighbors.npy"), mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ValueError(f"--hn-image-neighbors {index_dir}: neighbors.npy cannot be read "
                             f"({err}); rebuild the index") from None
        if check:
            self._check_contents(first, {e["name"]: e["num_samples"] for e in manifest["shards"]})
        if check and not _has_neighbor(self.neighbors):
            raise ValueError(f"--hn-image-neighbors {index_dir}: no sample of the {len(self)} has a "
                             "neighbour, so batches would not change; write it again with looser "
                             "settings (`rebinding`: lower --min-word-overlap; `build`: more images)")

    def __len__(self) -> int:
        return len(self.neighbors)

    CHECKED_ROWS = 1_000_000  # neighbour ids checked at each end of a larger index

    def _check_contents(self, samples: int, per_shard: dict[str, int]) -> None:
        """neighbors.npy fits the manifest (one row of k ids in [-1, samples) per sample) and every
        shard has a readable catalog of its samples: a damaged index would fail inside a loader
        worker, mid-epoch (each catalog is read here once; the workers read them again)."""
        where = f"--hn-image-neighbors {self.index_dir}"
        shape = self.neighbors.shape
        if len(shape) != 2 or shape[0] != samples or shape[1] < self.k:
            raise ValueError(f"{where}: neighbors.npy holds an array of shape {shape}, the manifest "
                             f"{samples} samples x {self.k} neighbours; rebuild the index")
        rows = self.neighbors if samples <= 2 * self.CHECKED_ROWS else np.concatenate(
            [self.neighbors[:self.CHECKED_ROWS], self.neighbors[-self.CHECKED_ROWS:]])
        if rows.size and (rows.min() < -1 or rows.max() >= samples):
            raise ValueError(f"{where}: neighbors.npy holds ids outside [-1, {samples}) "
                             f"({int(rows.min())} to {int(rows.max())}); rebuild the index")
        missing = [s.name for s in self._shards
                   if not os.path.isfile(os.path.join(self.index_dir, "catalog", s.name + ".json"))]
        if missing:
            raise ValueError(f"{where}: no catalog for {len(missing)} shard(s) (e.g. catalog/"
                             f"{missing[0]}.json); rebuild the index")
        for name, count in per_shard.items():
            path = os.path.join(self.index_dir, "catalog", name + ".json")
            try:
                stored = _read_json(path)
                fits = len(stored["keys"]) == len(stored["members"]) == count
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{where}: catalog/{name}.json cannot be read ({type(err).__name__}: "
                                 f"{err}); rebuild the index (`python -m open_clip_hn.neighbors "
                                 f"build ... --output {self.index_dir}` resumes)") from None
            if not fits:
                raise ValueError(f"{where}: catalog/{name}.json does not list the {count} samples "
                                 "the manifest gives its shard; rebuild the index")

    def _catalog(self, shard: _Shard) -> _Shard:
        """Load a shard's keys and offsets on first use (a worker touches few shards as anchors)."""
        if shard.keys is None:
            stored = _read_json(os.path.join(self.index_dir, "catalog", shard.name + ".json"))
            shard.keys, shard.members = stored["keys"], stored["members"]
            shard.ids = {key: shard.first_id + i for i, key in enumerate(shard.keys)}
        return shard

    def id_of(self, url: str, key: str) -> int | None:
        """Global id of the sample `key` of the shard at `url`, None if the index lacks it."""
        shard = self._by_name.get(os.path.basename(url))
        return None if shard is None else self._catalog(shard).ids.get(key)

    def fetch(self, sample_id: int) -> dict[str, Any]:
        """The raw sample (as webdataset's tar reader yields it) read by byte offset."""
        shard = self._catalog(self._shards[int(np.searchsorted(self._starts, sample_id, "right")) - 1])
        position = sample_id - shard.first_id
        sample: dict[str, Any] = {"__key__": shard.keys[position], "__url__": shard.path}
        with open(shard.path, "rb") as handle:
            for ext, (offset, size) in shard.members[position].items():
                handle.seek(offset)
                sample[ext] = handle.read(size)
        return sample


def _has_neighbor(neighbors: np.ndarray, rows: int = 1 << 16) -> bool:
    """Whether any row has a neighbour (-1 only ends a row, so column 0 tells); read in
    chunks that stop at the first hit, since the array is memory-mapped and may be large."""
    return any((neighbors[start:start + rows, 0] >= 0).any() for start in range(0, len(neighbors), rows))


def check_index(index_dir: str, shards: list[str] | None = None, per_sample: int | None = None) -> None:
    """Refuse an `--hn-image-neighbors` folder that training cannot use (absent, unfinished,
    of an old format, without neighbours, built for other `shards`, or with fewer neighbours per
    sample than `per_sample` asks for), as a ValueError naming it and the fix: call it where the
    flags are read, before the model is built."""
    if not os.path.isdir(index_dir):
        raise ValueError(f"--hn-image-neighbors {index_dir}: no such folder; build it with "
                         "`python -m open_clip_hn.neighbors build` (image kNN) or `... rebinding` "
                         "(captions with the same words bound differently)")
    index = NeighborIndex(index_dir, shards)
    if per_sample is not None and per_sample > index.k:
        raise ValueError(f"--hn-image-neighbors-per-sample {per_sample}: the index {index_dir} "
                         f"holds {index.k} neighbour(s) per sample; pass at most {index.k}, or "
                         f"build it again with --k {per_sample}")


def _check_same_shards(index_dir: str, built: dict[str, dict], shards: list[str]) -> None:
    """Refuse an index built for other shards: names must match, and for local files the
    content (size and digest of the ends), so a regenerated shard of the same name and size
    cannot pair samples with another image's neighbours."""
    names = {os.path.basename(p): p for p in shards}
    missing = sorted(set(names) - set(built))
    extra = sorted(set(built) - set(names))
    changed = sorted(n for n, p in names.items()
                     if n in built and os.path.isfile(p) and content_identity(p) != built[n]["identity"])
    if missing or extra or changed:
        detail = "; ".join(part for part in (
            f"not in the index: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"in the index but not in --train-data: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}"
            if extra else "",
            f"changed since the build: {', '.join(changed[:3])}" if changed else "") if part)
        raise ValueError(f"--hn-image-neighbors {index_dir} was built for other shards ({detail}); "
                         "rebuild it with `python -m open_clip_hn.neighbors build --shards "
                         f"'<your --train-data>' --output {index_dir}`")


class NeighborStage:
    """Webdataset stage: each sample is followed by up to `per_sample` of its kNN neighbours.

    Groups never straddle a batch boundary and a batch never holds the same sample twice (a
    duplicate would be its own false negative), so the stage must sit where every sample it
    emits reaches `batched`: after OpenCLIP's caption/image filter, before decoding. Picklable
    and lazy, so each loader worker opens the index itself.
    """

    def __init__(self, index_dir: str, per_sample: int, batch_size: int, shards: list[str] | None = None):
        if per_sample < 1 or per_sample + 1 > batch_size:
            raise ValueError(f"--hn-image-neighbors-per-sample {per_sample} must be in [1, "
                             f"batch size - 1 = {batch_size - 1}]")
        self.index_dir, self.per_sample, self.batch_size = index_dir, per_sample, batch_size
        self.shards = shards
        self._index: NeighborIndex | None = None
        if shards is not None:
            check_index(index_dir, shards)  # fail in the main process, before workers start

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None}

    @property
    def index(self) -> NeighborIndex:
        if self._index is None:  # in a loader worker: the main process checked the shards
            self._index = NeighborIndex(self.index_dir, self.shards, check=False)
        return self._index

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        index, slot, in_batch = self.index, 0, set()
        for sample in samples:
            anchor = index.id_of(sample.get("__url__", ""), sample.get("__key__", ""))
            if anchor is not None and anchor in in_batch:
                continue  # already in this batch as someone's neighbour
            group = [sample]
            if anchor is not None:
                in_batch.add(anchor)
                room = min(self.per_sample, self.batch_size - slot - 1)
                for neighbor in index.neighbors[anchor]:
                    if room == 0 or neighbor < 0:
                        break
                    if int(neighbor) not in in_batch:
                        in_batch.add(int(neighbor))
                        group.append(index.fetch(int(neighbor)))
                        room -= 1
            for item in group:
                yield item
                slot += 1
                if slot == self.batch_size:
                    slot, in_batch = 0, set()


def neighbor_stage(index_dir: str, per_sample: int, batch_size: int,
                   shards: list[str] | None = None) -> NeighborStage:
    """The stage for `--hn-image-neighbors DIR`; `shards` (the expanded --train-data) are
    checked against the index now, so a mismatch fails before training starts."""
    return NeighborStage(index_dir, per_sample, batch_size, shards)


def insert_before_decode(pipeline, stage: Callable) -> None:
    """Put `stage` right before the `decode` stage of a webdataset pipeline: OpenCLIP's train
    pipeline becomes ... shuffle, select(caption and image), STAGE, decode, ..., batched.

    `pipeline` may be the DataPipeline or the WebLoader that OpenCLIP's `get_wds_dataset`
    returns (`data["train"].dataloader`); call it before the loader is first iterated.
    """
    stages = find_stages(pipeline, lambda step: is_filter(step, "_decode"))
    if not stages:
        raise ValueError("no decode stage found in the webdataset pipeline; --hn-image-neighbors "
                         "needs OpenCLIP's webdataset train pipeline (--dataset-type webdataset)")
    decode_pipeline, position = stages[0]
    decode_pipeline.insert(position, stage)


# ---------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m open_clip_hn.neighbors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="Embed the images of shards and find each one's kNN.")
    b.add_argument("--shards", required=True, help="Local shards, as --train-data ('dir/{000..099}.tar').")
    b.add_argument("--model", required=True, help="OpenCLIP model name (e.g. ViT-B-32).")
    b.add_argument("--model-config", default=None, metavar="PATH.json",
                   help="Register this OpenCLIP model config first (custom or tiny models).")
    b.add_argument("--pretrained", default=None,
                   help="Pretrained tag or checkpoint path (e.g. openai, or logs/run/checkpoints/epoch_5.pt).")
    b.add_argument("--allow-model-mismatch", action="store_true",
                   help="Build even when the --pretrained checkpoint's record (CHECKPOINT.json, "
                        "written by runs with --hn-* flags) names another --model; warn instead.")
    b.add_argument("--output", required=True, help="Index directory (resumes when it exists).")
    b.add_argument("--k", type=positive_int, default=8, help="Neighbours kept per image. Default: 8.")
    b.add_argument("--batch-size", type=positive_int, default=256,
                   help="Images per forward. Default: 256.")
    b.add_argument("--workers", type=non_negative_int, default=4,
                   help="Image decoding processes. Default: 4.")
    b.add_argument("--device", type=torch_device, default=None,
                   help="Torch device. Default: cuda when available, else cpu.")
    b.add_argument("--exact-max", type=positive_int, default=1_000_000,
                   help="Largest N searched exactly (IndexFlatIP); IVF-PQ beyond. Default: 1000000.")
    b.add_argument("--nlist", type=positive_int, default=None, help="IVF lists. Default: ~4*sqrt(N), a power of 2.")
    b.add_argument("--nprobe", type=positive_int, default=32, help="IVF lists visited per query. Default: 32.")
    r = commands.add_parser("rebinding", help="Neighbours whose captions hold the same words bound "
                                              "differently (image-side swap negatives); no model.")
    r.add_argument("--shards", required=True, help="Local shards, as --train-data ('dir/{000..099}.tar').")
    r.add_argument("--output", required=True, help="Index directory (rewritten when it was made "
                                                  "with the same settings; one made with other "
                                                  "settings is refused: use a fresh folder).")
    r.add_argument("--k", type=positive_int, default=4, help="Neighbours kept per sample. Default: 4.")
    r.add_argument("--min-word-overlap", type=unit_float, default=0.5,
                   help="Least tf-idf cosine of two captions' words for them to be neighbours. "
                        "Default: 0.5.")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        local_shards(args.shards)  # a usage error (exit 2), before the output or a model is made
    except ValueError as err:
        parser.error(str(err))
    if args.command == "build" and args.pretrained:  # as eval: the model the weights were trained as
        try:
            problems = trained_as_problems([args.model], [args.pretrained],
                                           [args.model_config] if args.model_config else [])
        except ValueError as err:  # an unreadable record, named
            parser.error(str(err))
        for problem in problems:
            if not args.allow_model_mismatch:
                parser.error(f"{problem}; pass the --model it was trained as (or "
                             "--allow-model-mismatch to build anyway)")
            logging.warning("neighbors build: %s (building anyway: --allow-model-mismatch)", problem)
    try:
        if args.command == "rebinding":
            manifest = write_rebinding(args.shards, args.output, k=args.k,
                                       min_word_overlap=args.min_word_overlap)
        else:
            manifest = build(args.shards, args.model, args.output, pretrained=args.pretrained,
                             model_config=args.model_config, k=args.k, batch_size=args.batch_size,
                             workers=args.workers, device=args.device, exact_max=args.exact_max,
                             nlist=args.nlist, nprobe=args.nprobe)
    except (ValueError, OSError) as err:  # bad shards, output or model: named in the message
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted: every file of {args.output} is written whole or not at all; the same "
              "command resumes (a build keeps the shards it embedded)", file=sys.stderr)
        sys.exit(130)
    written = _read_json(manifest)
    print(f"wrote {manifest}: {written['with_neighbors']} of {written['num_samples']} samples "
          f"({written['with_neighbors'] / written['num_samples']:.1%}) have a neighbour")


if __name__ == "__main__":
    main()
