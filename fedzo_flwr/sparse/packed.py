"""A mask tensor as a packed bitmap: one bit per weight, eight times less than ``torch.bool``.

The bit order is the wire's (:func:`fedzo_flwr.protocol.wire.encode_mask`): entries row-major,
eight per byte, the first entry in the most significant bit (``numpy.packbits`` with
``bitorder="big"``), the padding bits of the last byte zero. One tensor's bitmap is therefore
exactly its slice of the mask message, and a client can hold the bytes it received as they are.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["bitmap_bytes", "pack_bits", "popcount", "unpack_bits"]

_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)
_POPCOUNT_PIECE = 1 << 16


def bitmap_bytes(numel: int) -> int:
    """Bytes of the packed bitmap of ``numel`` entries: ``ceil(numel / 8)``."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """The row-major entries of a bool tensor, 8 per ``uint8`` (entry ``8j``: bit 7 of byte j)."""
    flat = mask.detach().reshape(-1).to(torch.bool).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="big"))


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


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits of a ``uint8`` bitmap (its kept entries), counted without unpacking."""
    data = packed.detach().reshape(-1).numpy()
    return int(
        sum(
            int(np.bitwise_count(data[start : start + _POPCOUNT_PIECE]).sum(dtype=np.int64))
            for start in range(0, data.size, _POPCOUNT_PIECE)
        )
    )
