"""``r`` copies of one activation, in the folded or the leading layout."""

from __future__ import annotations

import torch

__all__ = ["CHANNELS_LAST", "Activation", "Stacked", "UnsupportedModel", "replicate"]

CHANNELS_LAST = torch.channels_last
"""Memory format of every 4-D folded tensor."""


class UnsupportedModel(Exception):
    """The model uses an operation the direction-batched forward cannot translate.

    ``repeated``: the failure was already reported for a model of the same kind (the fused
    engine caches failures, see :func:`~fedzo_flwr.zo.engines.fused.engine.model_kind`).
    """

    def __init__(self, reason: str, *, repeated: bool = False) -> None:
        super().__init__(reason)
        self.repeated = repeated


class Stacked:
    """``r`` copies of one activation.

    ``folded``: ``(B, r * C, *rest)`` (copy ``j`` = channels ``j*C .. (j+1)*C-1``), channels-last
    when 4-D; otherwise **leading**: ``(r, B, ...)``. ``fresh`` marks a tensor this engine
    allocated (not a view of another value), which may be updated in place by its only user.
    """

    __slots__ = ("data", "folded", "fresh", "rows")

    def __init__(self, data: torch.Tensor, folded: bool, rows: int, fresh: bool = True) -> None:
        self.data = data
        self.folded = folded
        self.rows = rows
        self.fresh = fresh

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one copy."""
        if self.folded:
            b, rc, *rest = self.data.shape
            return (b, rc // self.rows, *rest)
        return tuple(self.data.shape[1:])

    def lead(self) -> torch.Tensor:
        """The ``(r, B, ...)`` layout (a view of a folded tensor)."""
        if not self.folded:
            return self.data
        b, rc, *rest = self.data.shape
        return self.data.view(b, self.rows, rc // self.rows, *rest).movedim(1, 0)

    def fold(self) -> torch.Tensor:
        """The ``(B, r * C, *rest)`` layout (a copy of a leading tensor, channels-last if 4-D)."""
        if self.folded:
            return self.data
        d = self.data
        if d.dim() < 3:
            raise UnsupportedModel("a channel operation on a tensor without a channel dimension")
        r, b, c, *rest = d.shape
        if len(rest) == 2:
            out = torch.empty((b, r * c, *rest), dtype=d.dtype, memory_format=CHANNELS_LAST)
            out.permute(0, 2, 3, 1).view(b, *rest, r, c).copy_(d.permute(1, 3, 4, 0, 2))
            return out
        return d.movedim(0, 1).reshape(b, r * c, *rest)


Activation = torch.Tensor | Stacked
"""What a layer receives: a tensor shared by all copies, or per-copy :class:`Stacked` values."""


def replicate(t: torch.Tensor, rows: int) -> Stacked:
    """Folded copies of a shared ``(B, C, ...)`` tensor (for layers whose input is shared)."""
    if t.dim() < 2:
        raise UnsupportedModel("a per-copy layer applied to a tensor without a channel dimension")
    data = t.repeat(1, rows, *([1] * (t.dim() - 2)))
    if data.dim() == 4:
        data = data.contiguous(memory_format=CHANNELS_LAST)
    return Stacked(data, folded=True, rows=rows)
