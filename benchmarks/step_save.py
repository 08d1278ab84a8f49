"""How long the save at the preemption signal takes for a real-sized model (issue 19).

SLURM sends `--signal=USR2@delay` `delay` seconds before the time limit (submit.py's default:
120 s; SLURM's own KillWait after SIGTERM: 30 s); the step in flight plus this save must fit.
Builds an OpenCLIP model with random weights and AdamW state after one step, then times what a
step checkpoint costs: OpenCLIP's checkpoint dict (state_dict + optimizer) plus the position and
RNG states, written through a temp file with fsync (`state.atomic_torch_save`), against a plain
`torch.save` of the same dict (what OpenCLIP's epoch save does), in the same run.

    python benchmarks/step_save.py --model ViT-B-32 --repeats 3 --dir /tmp
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import open_clip
import torch

from open_clip_hn.preemption import EpochPosition, rng_state
from open_clip_hn.state import atomic_torch_save


def checkpoint_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    position = EpochPosition(0, 100, 1000, 100 * 256, rng_state(), rng_state())
    return {"epoch": 0, "name": "bench", "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "hn_position": position.to_dict()}


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="OpenCLIP model name. Default: ViT-B-32.")
    parser.add_argument("--repeats", type=int, default=3, help="Saves per variant. Default: 3.")
    parser.add_argument("--model-config", default=None, metavar="PATH.json",
                        help="Register a model config first (e.g. the package's "
                             "model_configs/hn-tiny-vit.json, then --model hn-tiny-vit).")
    parser.add_argument("--dir", default=None, help="Folder to write into (default: a temp folder).")
    args = parser.parse_args()
    if args.dir is not None and not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir}: no such folder; create it or leave --dir out")
    if args.model_config:
        open_clip.add_model_config(args.model_config)
    if open_clip.get_model_config(args.model) is None:
        parser.error(f"--model {args.model}: OpenCLIP has no model of that name; pass --model-config "
                     "PATH.json for a config of your own")

    model = open_clip.create_model(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.randn(2, 3, *model.visual.image_size)
    text = torch.randint(0, 100, (2, model.context_length))
    out = model(image, text)
    (out[0].sum() + out[1].sum()).backward()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = os.path.join(folder, "epoch_0_step_100.pt")
        plain = timed(lambda: torch.save(checkpoint_of(model, optimizer), path), args.repeats)
        size = os.path.getsize(path)
        step = timed(lambda: atomic_torch_save(checkpoint_of(model, optimizer), path), args.repeats)

    print(f"{args.model}: {params / 1e6:.1f}M parameters, checkpoint {size / 2**20:.0f} MiB "
          f"(weights + AdamW state), {os.cpu_count()} CPUs")
    print("| save | median s | min s | MiB/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, times in (("torch.save (OpenCLIP's epoch save)", plain),
                        ("step checkpoint (temp + fsync + rename)", step)):
        median = statistics.median(times)
        print(f"| {name} | {median:.2f} | {min(times):.2f} | {size / 2**20 / median:.0f} |")
    print(f"ratio step/plain: {statistics.median(step) / statistics.median(plain):.2f}")


if __name__ == "__main__":
    main()
