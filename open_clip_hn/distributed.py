"""The one place the objective talks to other ranks: all-gathers along the batch dimension.

Semantics follow OpenCLIP's `gather_features`: with `with_grad` the gather is differentiable
(torch.distributed.nn); otherwise gathered rows are constants and, unless `local_loss`, this
rank's own slot is put back with its gradient. Every rank must pass the same batch size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn


def gather_rows(tensor: torch.Tensor, *, rank: int, world_size: int, with_grad: bool = False,
                keep_local_grad: bool = True) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (rank order); identity for one process."""
    if world_size == 1:
        return tensor
    if with_grad:
        return torch.cat(torch.distributed.nn.all_gather(tensor), dim=0)
    as_bool = tensor.dtype == torch.bool
    payload = tensor.detach().to(torch.uint8) if as_bool else tensor.detach()
    parts = [torch.empty_like(payload) for _ in range(world_size)]
    dist.all_gather(parts, payload.contiguous())
    if as_bool:
        parts = [part.bool() for part in parts]
    if keep_local_grad:
        parts[rank] = tensor
    return torch.cat(parts, dim=0)


def any_rank(flag: bool, *, device, world_size: int) -> bool:
    """True on every rank where `flag` is true on any rank: one all-reduce (none for one process),
    so that a failure one rank meets stops all of them at the same point instead of leaving the
    others waiting at their next collective."""
    if world_size == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
