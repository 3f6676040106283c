"""Translation rules of functions and tensor methods on per-copy values.

Elementwise functions run unchanged on either layout. Shape functions (``flatten``, slicing,
``pad``, reductions) keep a folded tensor folded when they leave the batch and channel
dimensions alone and otherwise work on the leading layout ``(r, B, ...)``; binary operations
between copies, or between copies and a shared tensor, pick the layout both sides agree on.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from fedzo_flwr.zo.engines.fused.stacked import CHANNELS_LAST, Stacked, UnsupportedModel

__all__ = [
    "BINARY",
    "BINARY_METHODS",
    "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_METHODS",
    "POOL_FUNCTIONS",
    "SUPPORTED_FUNCTIONS",
    "SUPPORTED_METHODS",
    "binary",
    "flatten",
    "getitem",
    "pad",
    "reduce",
]

ELEMENTWISE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.relu,
        torch.relu,
        F.relu6,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.leaky_relu,
        F.elu,
        F.gelu,
        F.silu,
        F.mish,
        torch.sigmoid,
        torch.tanh,
        F.sigmoid,
        F.tanh,
        F.softplus,
    }
)
POOL_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.max_pool2d,
        F.avg_pool2d,
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d,
    }
)
BINARY: dict[Callable[..., Any], str] = {
    operator.add: "add_",
    operator.sub: "sub_",
    operator.mul: "mul_",
    operator.truediv: "div_",
    torch.add: "add_",
    torch.sub: "sub_",
    torch.mul: "mul_",
    torch.div: "div_",
}
"""Binary functions and the name of their in-place tensor method."""
BINARY_METHODS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
}
ELEMENTWISE_METHODS = frozenset({"relu", "sigmoid", "tanh", "contiguous"})

SUPPORTED_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {*ELEMENTWISE_FUNCTIONS, *POOL_FUNCTIONS, *BINARY, torch.flatten, F.pad, operator.getitem}
)
"""Functions the fused forward translates; methods: ``size``, ``view``, ``reshape``,
``flatten``, ``mean``, ``sum``, ``add``, ``sub``, ``mul`` and elementwise activations."""
SUPPORTED_METHODS = frozenset(
    {"size", "view", "reshape", "flatten", "mean", "sum", *BINARY_METHODS, *ELEMENTWISE_METHODS}
)
"""Tensor methods the fused forward translates."""


def _per_copy_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def flatten(v: Stacked, start: int = 0, end: int = -1) -> Stacked:
    """``torch.flatten`` of every copy (dimensions counted per copy)."""
    ndim = len(v.shape)
    s, e = _per_copy_dim(start, ndim), _per_copy_dim(end, ndim)
    return Stacked(v.lead().flatten(s + 1, e + 1), folded=False, rows=v.rows, fresh=False)


def getitem(v: Stacked, index: Any) -> Stacked:
    """``copy[index]`` of every copy (a view)."""
    idx = index if isinstance(index, tuple) else (index,)
    full = slice(None)
    if (
        v.folded
        and len(idx) >= 2
        and idx[0] == full
        and idx[1] == full
        and all(isinstance(i, (slice, int)) for i in idx[2:])
    ):
        return Stacked(v.data[idx], folded=True, rows=v.rows, fresh=False)
    return Stacked(v.lead()[(full, *idx)], folded=False, rows=v.rows, fresh=False)


def pad(
    v: Stacked, pad: Sequence[int], mode: str = "constant", value: float | None = None
) -> Stacked:
    """``F.pad`` of every copy (over the channel dimension in the folded layout, too)."""
    ndim = len(v.shape)
    touched = len(pad) // 2
    if v.folded and touched <= ndim - 2:
        return Stacked(F.pad(v.data, pad, mode, value), folded=True, rows=v.rows)
    if mode != "constant":
        raise UnsupportedModel(f"pad mode {mode!r} over the channel or batch dimension")
    if v.folded and touched == ndim - 1:
        b, rc, *rest = v.data.shape
        five = v.data.view(b, v.rows, rc // v.rows, *rest)
        padded = F.pad(five, pad, mode, value)
        out = padded.reshape(b, -1, *padded.shape[3:])
        if out.dim() == 4:
            out = out.contiguous(memory_format=CHANNELS_LAST)
        return Stacked(out, folded=True, rows=v.rows)
    return Stacked(F.pad(v.lead(), pad, mode, value), folded=False, rows=v.rows)


def reduce(
    v: Stacked, method: str, dims: int | Sequence[int] | None, keepdim: bool, **kwargs: Any
) -> Stacked:
    """``copy.mean(dims)`` or ``copy.sum(dims)`` of every copy."""
    if dims is None:
        raise UnsupportedModel(f"{method}() over all dimensions")
    ndim = len(v.shape)
    dim_list = [dims] if isinstance(dims, int) else list(dims)
    dim_list = [_per_copy_dim(d, ndim) for d in dim_list]
    if v.folded and all(d >= 2 for d in dim_list):
        data: torch.Tensor = getattr(v.data, method)(dim_list, keepdim=keepdim, **kwargs)
        return Stacked(data, folded=True, rows=v.rows)
    data = getattr(v.lead(), method)([d + 1 for d in dim_list], keepdim=keepdim, **kwargs)
    return Stacked(data, folded=False, rows=v.rows)


def binary(fn: Callable[[Any, Any], Any], inplace: str, a: Any, b: Any, reuse: bool) -> Any:
    """``fn(a, b)`` where either side may hold copies; in place (``inplace``) when allowed."""
    sa, sb = isinstance(a, Stacked), isinstance(b, Stacked)
    if not sa and not sb:
        return fn(a, b)
    if sa and sb:
        rows = a.rows
        if len(a.shape) != len(b.shape):
            raise UnsupportedModel("a binary op between copies of different ranks")
        same_channels = len(a.shape) >= 2 and a.shape[1] == b.shape[1]
        if a.folded and b.folded and same_channels:
            x, y, folded = a.data, b.data, True
        elif len(a.shape) == 4 and same_channels:
            x, y, folded = a.fold(), b.fold(), True
        else:
            x, y, folded = a.lead(), b.lead(), False
    else:
        s = a if sa else b
        other = b if sa else a
        rows = s.rows
        if isinstance(other, torch.Tensor) and other.dim() > len(s.shape):
            raise UnsupportedModel("a shared tensor broadcast over more dimensions than a copy")
        if isinstance(other, torch.Tensor) and other.dim() > 0:
            x, y = (s.lead(), other) if sa else (other, s.lead())
            folded = False
        else:
            x, y = (s.data, other) if sa else (other, s.data)
            folded = s.folded
    if reuse and sa and a.fresh and isinstance(x, torch.Tensor):
        y_shape = y.shape if isinstance(y, torch.Tensor) else ()
        # torch.broadcast_shapes is not annotated.
        out_shape = torch.broadcast_shapes(x.shape, y_shape)  # type: ignore[no-untyped-call]
        if out_shape == x.shape and x.data_ptr() == a.data.data_ptr():
            return Stacked(getattr(x, inplace)(y), folded=folded, rows=rows)
    return Stacked(fn(x, y), folded=folded, rows=rows)
