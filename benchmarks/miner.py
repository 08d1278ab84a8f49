"""Miner top-k time and bank memory: torch vs faiss, banks of 65k / 262k / 1M pairs of 512-d.

Times one full `open_clip_hn.miner.mine` call (both directions: 2 x batch queries against the
[M, 2*512] bank, over-fetch, false-negative filter) per backend, median of --reps, and the bank's
memory (fp32 and fp16 storage). Same bank and queries for both backends, checked to agree.

    python benchmarks/miner.py                                  # 65k and 262k, ~1-2 min on 2 cores
    python benchmarks/miner.py --sizes 65536,262144,1048576     # add the 1M bank (8 GiB RAM)
    python benchmarks/miner.py --device cuda --sizes 65536,262144,1048576
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from open_clip_hn.memory_bank import MemoryBank
from open_clip_hn.miner import mine


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="65536,262144", help="Comma list of bank sizes (pairs).")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1024, help="Anchor pairs per query batch.")
    p.add_argument("--k", type=int, default=16, help="Mined negatives per anchor (--hn-mined-k).")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--backends", default="torch,faiss")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def timed(fn, reps: int, device: torch.device) -> tuple[float, object]:
    result = fn()  # warmup
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(args.batch_size, args.dim, generator=g), dim=-1).to(device)
    text = F.normalize(torch.randn(args.batch_size, args.dim, generator=g), dim=-1).to(device)
    print(f"\nbatch {args.batch_size} anchors (x2 directions), k {args.k}, dim {args.dim}, device {device}")
    print(f"{'bank':>9}{'fp32 MiB':>10}{'fp16 MiB':>10}" + "".join(f"{b + ' ms':>12}" for b in args.backends.split(","))
          + f"{'agree':>7}")
    for size in (int(s) for s in args.sizes.split(",")):
        bank = MemoryBank(size)
        for start in range(0, size, 65536):  # fill in blocks, like training would
            n = min(65536, size - start)
            bank.push(torch.randn(n, args.dim, generator=g).to(device), torch.randn(n, args.dim, generator=g).to(device))
        fp16_mib = bank.nbytes() / 2 / 2**20
        row, results = f"{size:>9}{bank.nbytes() / 2**20:>10.0f}{fp16_mib:>10.0f}", []
        for backend in args.backends.split(","):
            seconds, found = timed(lambda: mine(image, text, bank.entries(), args.k, 0.9, backend), args.reps, device)
            row += f"{1000 * seconds:>12.1f}"
            results.append(found)
        agree = all(torch.equal(results[0].text_index, r.text_index) and
                    torch.equal(results[0].image_index, r.image_index) for r in results[1:])
        print(row + f"{str(agree):>7}")
        del bank
    print("times: one mine() call = both directions' top-(2k+8) search + false-negative filter "
          "(+ wider searches for anchors the filter left short).")


if __name__ == "__main__":
    main()
