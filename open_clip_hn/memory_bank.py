"""A FIFO memory bank of recent (image, text) embedding pairs from every rank.

Each row holds one pair as [image | text] (2*D wide): the miner then scores "close in one
modality, far in the other" as one inner product against the whole bank without copying it.
Entries are detached and L2-normalised; the caller pushes the globally gathered batch, so the
bank is identical on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bank_bytes(size: int, dim: int, fp16: bool) -> int:
    """Bytes of a bank of `size` [image | text] pairs of width `dim`."""
    return size * 2 * dim * (2 if fp16 else 4)


def check_bank_fits(size: int, dim: int, fp16: bool, available: int, where: str) -> None:
    """Refuse, before training, a bank that would take more than half of the memory `available`
    on its device (`where`): it would fail or swap at the first push, hours into a job."""
    need = bank_bytes(size, dim, fp16)
    if need > available // 2:
        raise ValueError(
            f"--hn-memory-bank-size {size}: the bank of {size} pairs x 2 x {dim} "
            f"{'fp16' if fp16 else 'fp32'} values needs {need / 2**30:.1f} GiB, more than half "
            f"of the {available / 2**30:.1f} GiB free on {where}; use a smaller size"
            f"{'' if fp16 else ' or --hn-memory-bank-fp16 (half the memory)'}")


class MemoryBank:
    """Ring buffer of the last `size` pairs; storage is allocated on the first push (its width
    and device follow the features), in fp16 when `fp16` is set."""

    def __init__(self, size: int, fp16: bool = False):
        if size <= 0:
            raise ValueError(f"memory bank size must be >= 1, got {size} (--hn-memory-bank-size)")
        self.size = size
        self.dtype = torch.float16 if fp16 else torch.float32
        self.storage: torch.Tensor | None = None
        self.pointer = 0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def dim(self) -> int:
        return 0 if self.storage is None else self.storage.shape[1] // 2

    def entries(self) -> torch.Tensor:
        """[count, 2D] filled rows (a view); empty [0, 0] before the first push."""
        if self.storage is None:
            return torch.empty(0, 0, dtype=self.dtype)
        return self.storage[:self.count]

    def images(self) -> torch.Tensor:
        return self.entries()[:, :self.dim]

    def texts(self) -> torch.Tensor:
        return self.entries()[:, self.dim:]

    @torch.no_grad()
    def push(self, image: torch.Tensor, text: torch.Tensor) -> None:
        """Append pairs [n, D] (oldest entries are overwritten once full)."""
        if image.shape != text.shape or image.dim() != 2:
            raise ValueError(f"memory bank push needs image and text features of one shape [n, D], "
                             f"got {tuple(image.shape)} and {tuple(text.shape)}")
        pairs = torch.cat([F.normalize(image.detach().float(), dim=-1),
                           F.normalize(text.detach().float(), dim=-1)], dim=1)[-self.size:]
        if self.storage is None:
            self.storage = torch.zeros(self.size, pairs.shape[1], dtype=self.dtype, device=pairs.device)
        elif self.storage.shape[1] != pairs.shape[1]:
            raise ValueError(f"memory bank holds {self.dim}-d embeddings, got {image.shape[1]}-d")
        pairs = pairs.to(device=self.storage.device, dtype=self.dtype)
        first = min(len(pairs), self.size - self.pointer)
        self.storage[self.pointer:self.pointer + first] = pairs[:first]
        self.storage[:len(pairs) - first] = pairs[first:]
        self.pointer = (self.pointer + len(pairs)) % self.size
        self.count = min(self.size, self.count + len(pairs))

    def to(self, device: torch.device | str) -> "MemoryBank":
        if self.storage is not None:
            self.storage = self.storage.to(device)
        return self

    def nbytes(self) -> int:
        return 0 if self.storage is None else self.storage.numel() * self.storage.element_size()

    def state_dict(self) -> dict[str, object]:
        storage = None if self.storage is None else self.storage.detach().cpu().clone()
        return {"size": self.size, "pointer": self.pointer, "count": self.count, "storage": storage}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["size"] != self.size:
            raise ValueError(f"saved memory bank holds {state['size']} entries but "
                             f"--hn-memory-bank-size is {self.size}; resume with the saved size")
        storage = state["storage"]
        device = self.storage.device if self.storage is not None else "cpu"
        # a copy, as nn.Module.load_state_dict makes: later pushes must not write into the caller's tensor
        self.storage = None if storage is None else storage.to(device=device, dtype=self.dtype, copy=True)
        self.pointer = int(state["pointer"])
        self.count = int(state["count"])
