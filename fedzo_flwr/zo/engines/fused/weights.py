"""The weight copies of one chunk: ``w + s σ u_k`` on the kept coordinates, built lazily."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedzo_flwr.sparse.space import KeptSpace

__all__ = ["ChunkWeights", "Layout"]


class Layout:
    """Perturbed parameters of a plan and where their kept coordinates sit in a KeptSpace."""

    def __init__(self, params: Sequence[torch.Tensor], space: KeptSpace) -> None:
        self.params = list(params)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.indices = list(space.indices)
        self.shapes = [tuple(p.shape) for p in self.params]
        self.kept_sizes = list(space.sizes)
        self.kept_offsets = [0]
        for size in self.kept_sizes[:-1]:
            self.kept_offsets.append(self.kept_offsets[-1] + size)
        self.numel = sum(p.numel() for p in self.params)

    def new_blocks(self, rows: int) -> list[torch.Tensor]:
        """One ``(rows, numel)`` block per parameter.

        A partly pruned parameter's block starts with its current values (pruned entries 0) in
        every row and only its kept columns are rewritten per chunk, so pruned entries stay
        exactly 0; a fully kept parameter's block is rewritten whole and starts uninitialised.
        """
        return [
            torch.empty(rows, p.numel(), dtype=p.dtype)
            if idx is None
            else p.detach().reshape(1, -1).repeat(rows, 1)
            for p, idx in zip(self.params, self.indices)
        ]


class ChunkWeights:
    """The ``r`` weight copies of one chunk, built per parameter when a layer asks for them.

    Row ``j * count + i`` holds ``w + signs[j] * σ * u_i`` on the kept coordinates (``u_i`` the
    chunk's ``i``-th direction) and the current values elsewhere (0 at pruned entries). Each
    parameter's copies live in a contiguous ``(r, *shape)`` block of a preallocated buffer, so
    ``(r * out, in, kh, kw)`` conv weights are free views; built lazily, a block is still in
    cache when its layer runs.
    """

    def __init__(
        self,
        layout: Layout,
        blocks: list[torch.Tensor],
        kept: torch.Tensor,
        directions: torch.Tensor,
        sigma: float,
        signs: tuple[float, ...],
    ) -> None:
        self.layout = layout
        self.blocks = blocks
        self.kept = kept
        self.directions = directions
        self.sigma = sigma
        self.signs = signs
        self.count = directions.shape[0]
        self.rows = self.count * len(signs)
        self._built: dict[int, torch.Tensor] = {}

    def get(self, p: torch.Tensor | None) -> torch.Tensor | None:
        """``(r, *p.shape)`` copies of parameter ``p``; ``None`` if ``p`` is not perturbed."""
        if p is None:
            return None
        i = self.layout.index.get(id(p))
        if i is None:
            return None
        built = self._built.get(i)
        if built is not None:
            return built
        plan = self.layout
        start, size = plan.kept_offsets[i], plan.kept_sizes[i]
        part = self.directions[:, start : start + size]
        kept = self.kept[start : start + size]
        block = self.blocks[i][: self.rows]
        idx = plan.indices[i]
        for j, sign in enumerate(self.signs):
            dst = block[j * self.count : (j + 1) * self.count]
            if idx is None:
                torch.add(kept, part, alpha=sign * self.sigma, out=dst)
            else:
                dst.index_copy_(1, idx, torch.add(kept, part, alpha=sign * self.sigma))
        built = block.view(self.rows, *plan.shapes[i])
        self._built[i] = built
        return built

    def copy(self, p: torch.Tensor, row: int) -> torch.Tensor:
        """Row ``row`` of the copies of the perturbed parameter ``p`` (shape of ``p``)."""
        built = self.get(p)
        if built is None:
            raise KeyError("not a perturbed parameter of this chunk")
        return built[row]
