"""The layout of a KeptSpace read from packed bitmaps: no bool mask, no index tables.

A :class:`~fedzo_flwr.sparse.space.KeptSpace` holds a ``torch.bool`` mask (1 byte per weight)
and an ``int64`` index per kept entry (8 bytes each): what a dense engine needs to gather and
scatter the kept coordinates. A client that holds its model sparse at rest (the ``stream``
engine's :class:`~fedzo_flwr.zo.engines.stream_model.StreamModel`) needs only the layout: the
trainable tensors' names and shapes in canonical order, how many of each are kept (the direction
layout ``sizes``) and, for each partly pruned tensor, its bitmap (1 bit per weight,
:mod:`fedzo_flwr.sparse.packed`). :class:`PackedLayout` is that, built from the model's structure
(which may live on the ``meta`` device) and the per-tensor bitmaps of the wire's mask message, or
from a KeptSpace; both give the same ``names``, ``shapes`` and ``sizes`` as the KeptSpace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedzo_flwr.sparse.mask import prunable_parameters
from fedzo_flwr.sparse.packed import bitmap_bytes, pack_bits, popcount
from fedzo_flwr.sparse.space import KeptSpace

__all__ = ["PackedLayout"]


@dataclass(frozen=True)
class PackedLayout:
    """A KeptSpace's coordinates as names, shapes, kept counts and packed bitmaps.

    Attributes
    ----------
    names : tuple of str
        Trainable parameter names in canonical (``named_parameters``) order.
    shapes : tuple of torch.Size
        Their shapes.
    sizes : tuple of int
        Kept entries per tensor (the direction layout, ``KeptSpace.sizes``).
    bitmaps : tuple of Tensor or None
        Per tensor, its packed ``uint8`` bitmap when partly pruned, ``None`` when every entry
        is kept (as ``KeptSpace.indices`` is ``None`` there).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]
    bitmaps: tuple[torch.Tensor | None, ...]

    @property
    def dim(self) -> int:
        """Total number of kept coordinates."""
        return sum(self.sizes)

    def bitmap_nbytes(self) -> int:
        """Bytes of the bitmaps held (partly pruned tensors only)."""
        return sum(int(b.numel()) for b in self.bitmaps if b is not None)

    @classmethod
    def from_bitmaps(cls, model: nn.Module, bitmaps: Mapping[str, torch.Tensor]) -> PackedLayout:
        """The layout of ``model`` under the mask whose per-tensor bitmaps are ``bitmaps``.

        Parameters
        ----------
        model : nn.Module
            Only names, shapes and ``requires_grad`` are read (``meta`` tensors are fine).
        bitmaps : mapping of str to Tensor
            One ``uint8`` bitmap per prunable weight
            (:func:`~fedzo_flwr.protocol.wire.split_mask`).

        Raises
        ------
        ValueError
            If the bitmaps do not cover exactly the prunable weights, with their sizes.
        """
        prunable = {name for name, _ in prunable_parameters(model)}
        if set(bitmaps) != prunable:
            missing = sorted(prunable - set(bitmaps))
            extra = sorted(set(bitmaps) - prunable)
            raise ValueError(
                f"bitmaps do not match the model's prunable weights: "
                f"missing {missing}, unexpected {extra}"
            )
        names, shapes, sizes, packed = [], [], [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            numel = param.shape.numel()
            bitmap = bitmaps.get(name)
            kept = numel
            if bitmap is not None:
                if bitmap.dtype != torch.uint8 or bitmap.numel() != bitmap_bytes(numel):
                    raise ValueError(
                        f"bitmap of {name!r} must be {bitmap_bytes(numel)} uint8 bytes, "
                        f"got {bitmap.numel()} {bitmap.dtype}"
                    )
                kept = popcount(bitmap)
            names.append(name)
            shapes.append(param.shape)
            sizes.append(kept)
            packed.append(None if kept == numel else bitmap)
        return cls(tuple(names), tuple(shapes), tuple(sizes), tuple(packed))

    @classmethod
    def from_space(cls, space: KeptSpace) -> PackedLayout:
        """The layout of ``space``, its partly pruned tensors' masks packed."""
        bitmaps = tuple(
            None if idx is None else pack_bits(space.mask[name])
            for name, idx in zip(space.names, space.indices, strict=True)
        )
        return cls(tuple(space.names), tuple(space.shapes), tuple(space.sizes), bitmaps)
