"""The coordinate space that zeroth-order training perturbs and updates.

A :class:`KeptSpace` lists the **trainable, unpruned** coordinates of a model in a canonical
order: parameters in ``named_parameters()`` order, entries row-major, pruned entries skipped.
Kept prunable weights and every other trainable tensor (biases, GroupNorm affine terms) are in
it; pruned weights are not, so nothing that works in this space can ever make them non-zero.
Directions, gradient estimates, optimizer state and the sparse wire format all live in it.
"""

from __future__ import annotations

import torch
from torch import nn

from fedzo_flwr.sparse.mask import Mask, dense_mask, validate_mask


class KeptSpace:
    """Flat view of a model's trainable, unpruned coordinates.

    Parameters
    ----------
    model : nn.Module
        The model whose parameters define the space (only names and shapes are read).
    mask : Mask or None
        Prunable-weight mask; ``None`` means dense.

    Attributes
    ----------
    names : list of str
        Trainable parameter names in canonical order.
    shapes : list of torch.Size
        Their shapes.
    indices : list of Tensor or None
        For each parameter the flat (row-major) indices of its kept entries, ``None`` when all
        entries are kept.
    sizes : list of int
        Kept entries per parameter.
    dim : int
        Total number of kept coordinates.

    """

    def __init__(self, model: nn.Module, mask: Mask | None = None) -> None:
        mask = dense_mask(model) if mask is None else validate_mask(model, mask)
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.indices: list[torch.Tensor | None] = []
        self.sizes: list[int] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            self.names.append(name)
            self.shapes.append(param.shape)
            m = mask.get(name)
            if m is None or bool(m.all()):
                self.indices.append(None)
                self.sizes.append(param.numel())
            else:
                idx = torch.nonzero(m.reshape(-1), as_tuple=False).reshape(-1)
                self.indices.append(idx)
                self.sizes.append(int(idx.numel()))
        self.dim: int = sum(self.sizes)
        self.mask: Mask = {k: v.clone() for k, v in mask.items()}

    def __repr__(self) -> str:
        return f"KeptSpace(dim={self.dim}, tensors={len(self.names)})"

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        named = dict(model.named_parameters())
        try:
            return [named[n] for n in self.names]
        except KeyError as err:
            raise ValueError(f"model has no parameter {err.args[0]!r} of this space") from None

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat ``(..., dim)`` tensor into per-parameter chunks (views)."""
        if flat.shape[-1] != self.dim:
            raise ValueError(f"flat vector has {flat.shape[-1]} coordinates, space has {self.dim}")
        return list(torch.split(flat, self.sizes, dim=-1))

    @torch.no_grad()
    def gather(self, model: nn.Module) -> torch.Tensor:
        """Copy the kept coordinates of ``model`` into a new flat float32 tensor (``dim``,)."""
        out = torch.empty(self.dim, dtype=torch.float32)
        for param, idx, part in zip(self._params(model), self.indices, self.split(out)):
            flat = param.detach().reshape(-1)
            if idx is None:
                part.copy_(flat)
            elif flat.dtype == torch.float32:
                torch.index_select(flat, 0, idx, out=part)  # no temporary copy
            else:
                part.copy_(flat[idx])
        return out

    @torch.no_grad()
    def scatter_(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Write ``flat`` into the kept coordinates of ``model`` (pruned entries are untouched)."""
        for param, idx, part in zip(self._params(model), self.indices, self.split(flat)):
            view = param.data.view(-1)
            if idx is None:
                view.copy_(part)
            else:
                view[idx] = part.to(view.dtype)

    @torch.no_grad()
    def add_(self, model: nn.Module, flat: torch.Tensor, alpha: float = 1.0) -> None:
        """Add ``alpha * flat`` to the kept coordinates of ``model`` in place."""
        for param, idx, part in zip(self._params(model), self.indices, self.split(flat)):
            view = param.data.view(-1)
            if idx is None:
                view.add_(part, alpha=alpha)
            else:
                view.index_add_(0, idx, part.to(view.dtype), alpha=alpha)

    def expand(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense per-parameter tensors from ``flat`` (zeros at pruned entries).

        Accepts a leading batch dimension: ``(B, dim)`` gives tensors of shape ``(B, *shape)``.
        """
        lead = flat.shape[:-1]
        out: dict[str, torch.Tensor] = {}
        for name, shape, idx, part in zip(self.names, self.shapes, self.indices, self.split(flat)):
            if idx is None:
                out[name] = part.reshape(*lead, *shape)
            else:
                dense = part.new_zeros(*lead, shape.numel())
                dense[..., idx] = part
                out[name] = dense.reshape(*lead, *shape)
        return out
