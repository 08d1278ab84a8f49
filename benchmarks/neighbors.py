"""kNN build time, peak memory and recall@10: exact IndexFlatIP vs IVF-PQ (open_clip_hn.neighbors).

Embeddings are synthetic unit vectors drawn around cluster centres (CLIP image embeddings are
clustered too); recall@10 is measured against brute-force neighbours of a query sample. Each
method runs in a fresh process so its peak RSS is its own. Also measured in the same run: the
throughput of OpenCLIP's own webdataset train loader with and without the neighbour stage.

    python benchmarks/neighbors.py                      # ~2-3 minutes on 2 CPU cores
    python benchmarks/neighbors.py --num 1000000        # the full 1M x 512 (GPU faiss advised)
    python benchmarks/neighbors.py --num 1000000 --skip-exact   # IVF-PQ only
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import numpy as np


def clustered_embeddings(num: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num, 100_000):  # in blocks, so the generator itself stays small
        stop = min(num, start + 100_000)
        block = centres[rng.integers(0, clusters, stop - start)]
        x[start:stop] = block + spread * rng.normal(size=block.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _run_method(args: argparse.Namespace, exact: bool, queries: np.ndarray, queue) -> None:
    from open_clip_hn.neighbors import knn_search

    x = clustered_embeddings(args.num, args.dim, args.clusters, args.spread, args.seed)
    start = time.perf_counter()
    ids, _, description = knn_search(x, args.k, exact_max=args.num if exact else 0,
                                     nlist=args.nlist, nprobe=args.nprobe)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put((description, seconds, peak_mib, ids[queries]))


def _truth(args: argparse.Namespace, queries: np.ndarray) -> np.ndarray:
    x = clustered_embeddings(args.num, args.dim, args.clusters, args.spread, args.seed)
    truth = []
    for start in range(0, len(queries), 256):
        rows = queries[start:start + 256]
        sims = x[rows] @ x.T
        sims[np.arange(len(rows)), rows] = -np.inf
        truth.append(np.argpartition(-sims, args.k, axis=1)[:, :args.k])
    return np.concatenate(truth)


def _loader_throughput(num: int, per_sample: int) -> list[tuple[str, float]]:
    """Samples/s of OpenCLIP's webdataset train loader, plain and with the neighbour stage."""
    import torch
    from open_clip_train.data import get_wds_dataset

    from open_clip_hn.neighbors import build, insert_before_decode, neighbor_stage
    from open_clip_hn.scenes import shards_spec, write_scene_shards

    config = os.path.join(os.path.dirname(__file__), "..", "open_clip_hn", "model_configs", "hn-tiny-vit.json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_scene_shards(os.path.join(tmp, "shards"), num, samples_per_shard=num // 4)
        build(shards_spec(shards), "hn-tiny-vit", os.path.join(tmp, "index"), model_config=config,
              k=8, workers=0)
        for label, stage in (("vanilla OpenCLIP loader", None), (f"+ neighbours ({per_sample}/sample)",
                                                                 per_sample)):
            args = argparse.Namespace(train_data=shards_spec(shards), train_num_samples=num,
                                      dataset_resampled=False, train_data_upsampling_factors=None,
                                      seed=0, batch_size=64, workers=2, world_size=1)
            data = get_wds_dataset(args, lambda image: torch.zeros(3, 32, 32), is_train=True,
                                   tokenizer=lambda text: torch.zeros(1, 32, dtype=torch.long))
            if stage:
                insert_before_decode(data.dataloader, neighbor_stage(os.path.join(tmp, "index"),
                                                                     per_sample, 64, shards))
            start, seen = time.perf_counter(), 0
            for images, _ in data.dataloader:
                seen += len(images)
            rows.append((label, seen / (time.perf_counter() - start)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=50_000, help="Embeddings (default 50000; issue: 1000000).")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.05, help="Noise around each cluster centre.")
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--queries", type=int, default=1000, help="Queries for recall@k.")
    parser.add_argument("--skip-exact", action="store_true", help="Do not time the exact all-pairs build.")
    parser.add_argument("--loader-samples", type=int, default=2000,
                        help="Samples for the loader throughput comparison (0 = skip).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    queries = np.random.default_rng(args.seed + 1).choice(args.num, size=min(args.queries, args.num),
                                                          replace=False)
    truth = _truth(args, queries)
    context = mp.get_context("spawn")
    print(f"kNN over {args.num} x {args.dim} (k={args.k}, {args.clusters} clusters, "
          f"{os.cpu_count()} CPU cores)")
    print(f"data: {args.num * args.dim * 4 / 2**20:.0f} MiB float32; peak RSS is the whole process")
    print(f"{'index':<24}{'build+search s':>16}{'peak RSS MiB':>14}{'recall@' + str(args.k):>11}")
    for exact in ([False] if args.skip_exact else [True, False]):
        queue = context.Queue()
        process = context.Process(target=_run_method, args=(args, exact, queries, queue))
        process.start()
        description, seconds, peak_mib, found = queue.get()
        process.join()
        recall = np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found, truth)])
        print(f"{description:<24}{seconds:>16.1f}{peak_mib:>14.0f}{recall:>11.3f}")
    if args.loader_samples:
        rows = _loader_throughput(args.loader_samples, per_sample=1)
        print(f"\n{'train loader (2 workers)':<34}{'samples/s':>10}{'ratio':>8}")
        for label, rate in rows:
            print(f"{label:<34}{rate:>10.0f}{rate / rows[0][1]:>8.2f}")


if __name__ == "__main__":
    sys.exit(main())
