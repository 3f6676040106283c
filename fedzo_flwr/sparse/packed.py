"""A mask tensor as a packed bitmap: one bit per weight, eight times less than ``torch.bool``."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["bitmap_bytes", "pack_bits", "unpack_bits"]

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def bitmap_bytes(numel: int) -> int:
    """Bytes of the packed bitmap of ``numel`` entries: ``ceil(numel / 8)``."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """The row-major entries of a bool tensor, eight per ``uint8`` (bit ``i`` = entry ``8j+i``)."""
    flat = mask.detach().reshape(-1).to(torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack_bits(packed: torch.Tensor, numel: int, out: torch.Tensor) -> torch.Tensor:
    """The first ``numel`` entries of ``packed`` as a bool view of the ``uint8`` buffer ``out``.

    ``out`` needs at least ``8 * packed.numel()`` bytes; nothing else is allocated, so a caller
    that unpacks one tensor at a time into one reused buffer holds one byte per weight of the
    largest tensor only.
    """
    bits = out[: 8 * packed.numel()].view(-1, 8)
    torch.bitwise_right_shift(packed.unsqueeze(1), _SHIFTS, out=bits)
    bits.bitwise_and_(1)
    return out[:numel].view(torch.bool)
