"""Translation rules of the leaf modules: one kernel for all ``r`` copies of a layer.

* A convolution or linear layer whose input is shared by the copies is *one* wide layer with
  ``r * out`` filters (outputs folded); on per-copy inputs a convolution is a grouped
  convolution with ``r * groups`` groups and a linear layer one batched matrix product over the
  leading layout.
* GroupNorm / BatchNorm (eval) are one normalisation with ``r * groups`` groups (or ``r * C``
  channels) and the stacked affine terms.
* Pooling and activations act per channel or per element and run unchanged on folded tensors;
  non-overlapping max-pools are an elementwise maximum of strided views.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.zo.engines.fused.stacked import (
    CHANNELS_LAST,
    Activation,
    Stacked,
    UnsupportedModel,
    replicate,
)
from fedzo_flwr.zo.engines.fused.weights import ChunkWeights

__all__ = [
    "ELEMENTWISE_MODULES",
    "INPLACE",
    "POOL_MODULES",
    "SUPPORTED_MODULES",
    "batch_norm",
    "conv2d",
    "group_norm",
    "linear",
    "max_pool2d",
    "pool",
]

IntOrTuple = int | tuple[int, ...] | list[int]
"""A kernel size, stride, padding or dilation as modules and functions accept it."""


def conv2d(m: nn.Conv2d, v: Activation, rows: int, weights: ChunkWeights) -> Activation:
    """``m`` applied to ``rows`` weight copies (one wide or one grouped convolution)."""
    if m.padding_mode != "zeros":
        raise UnsupportedModel(f"Conv2d with padding_mode={m.padding_mode!r}")
    w, b = weights.get(m.weight), weights.get(m.bias)
    if isinstance(v, torch.Tensor) and w is None and b is None:
        shared: torch.Tensor = m(v)
        return shared
    if w is not None:
        weight = w.view(-1, *w.shape[2:])
    else:
        weight = m.weight.repeat(rows, 1, 1, 1).contiguous(memory_format=CHANNELS_LAST)
    bias: torch.Tensor | None
    if b is not None:
        bias = b.reshape(-1)
    else:
        bias = None if m.bias is None else m.bias.repeat(rows)
    if isinstance(v, torch.Tensor) and m.groups == 1:
        # Shared input: one wide convolution with r * out filters (oneDNN; an explicit
        # im2col + GEMM measured no faster).
        x = v.contiguous(memory_format=CHANNELS_LAST)
        out = F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, 1)
        return Stacked(out, folded=True, rows=rows)
    sv = replicate(v, rows) if isinstance(v, torch.Tensor) else v
    out = F.conv2d(sv.fold(), weight, bias, m.stride, m.padding, m.dilation, rows * m.groups)
    return Stacked(out, folded=True, rows=rows)


def linear(m: nn.Linear, v: Activation, rows: int, weights: ChunkWeights) -> Activation:
    """``m`` applied to ``rows`` weight copies (one batched matrix product)."""
    w, b = weights.get(m.weight), weights.get(m.bias)
    if isinstance(v, torch.Tensor):
        if w is None and b is None:
            shared: torch.Tensor = m(v)
            return shared
        x = v.reshape(1, -1, v.shape[-1]).expand(rows, -1, -1)
        lead_shape = tuple(v.shape[:-1])
    else:
        lead = v.lead()
        lead_shape = tuple(lead.shape[1:-1])
        x = lead.reshape(rows, -1, lead.shape[-1])
    if w is not None:
        wt = w.transpose(1, 2)
        if b is not None:
            out = torch.baddbmm(b.unsqueeze(1), x, wt)
        else:
            out = torch.bmm(x, wt)
            if m.bias is not None:
                out += m.bias
    else:
        out = F.linear(x, m.weight, m.bias if b is None else None)
        if b is not None:
            out += b.unsqueeze(1)
    return Stacked(out.view(rows, *lead_shape, out.shape[-1]), folded=False, rows=rows)


def _affine(p: torch.Tensor | None, rows: int, weights: ChunkWeights) -> torch.Tensor | None:
    if p is None:
        return None
    s = weights.get(p)
    return p.repeat(rows) if s is None else s.reshape(-1)


def group_norm(m: nn.GroupNorm, v: Activation, rows: int, weights: ChunkWeights) -> Activation:
    """``m`` with ``rows`` copies of its affine terms (one GroupNorm of ``r * groups``)."""
    w, b = _affine(m.weight, rows, weights), _affine(m.bias, rows, weights)
    if isinstance(v, torch.Tensor):
        if weights.get(m.weight) is None and weights.get(m.bias) is None:
            shared: torch.Tensor = m(v)
            return shared
        v = replicate(v, rows)
    out = F.group_norm(v.fold(), rows * m.num_groups, w, b, m.eps)
    return Stacked(out, folded=True, rows=rows)


def batch_norm(m: nn.BatchNorm2d, v: Activation, rows: int, weights: ChunkWeights) -> Activation:
    """``m`` in eval mode with ``rows`` copies of its affine terms."""
    if m.training or m.running_mean is None or m.running_var is None:
        raise UnsupportedModel("BatchNorm in training mode or without running statistics")
    w, b = _affine(m.weight, rows, weights), _affine(m.bias, rows, weights)
    if isinstance(v, torch.Tensor):
        if weights.get(m.weight) is None and weights.get(m.bias) is None:
            shared: torch.Tensor = m(v)
            return shared
        v = replicate(v, rows)
    mean, var = m.running_mean.repeat(rows), m.running_var.repeat(rows)
    out = F.batch_norm(v.fold(), mean, var, w, b, False, 0.0, m.eps)
    return Stacked(out, folded=True, rows=rows)


def _pair(v: IntOrTuple) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def max_pool2d(
    x: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None = None,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> torch.Tensor:
    """``F.max_pool2d``; non-overlapping windows as an elementwise maximum of strided views.

    For ``kernel == stride``, no padding or dilation (LeNet's 2x2 pools) the maximum of the
    ``kh * kw`` shifted views is the same number, and on a channels-last tensor it is several
    times faster than the pooling kernel (which also writes int64 indices).
    """
    if return_indices:
        raise UnsupportedModel("max pooling that returns indices")
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None or stride == [] else stride)
    h, w = x.shape[-2:]
    ho, wo = h // kh, w // kw
    simple = (kh, kw) == (sh, sw) and _pair(padding) == (0, 0) and _pair(dilation) == (1, 1)
    if not simple or ceil_mode or kh * kw > 9 or ho == 0 or wo == 0:
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    views = [
        x[..., i : i + kh * (ho - 1) + 1 : kh, j : j + kw * (wo - 1) + 1 : kw]
        for i in range(kh)
        for j in range(kw)
    ]
    if len(views) == 1:
        return views[0].clone()
    out = torch.maximum(views[0], views[1])
    for view in views[2:]:
        torch.maximum(out, view, out=out)
    return out


def pool(fn: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The pooling module or function ``fn`` on the folded tensor ``x`` (per channel)."""
    if fn is F.max_pool2d:
        return max_pool2d(x, *args, **kwargs)
    if isinstance(fn, nn.MaxPool2d):
        return max_pool2d(
            x, fn.kernel_size, fn.stride, fn.padding, fn.dilation, fn.ceil_mode, fn.return_indices
        )
    out: torch.Tensor = fn(x, *args, **kwargs)
    return out


ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Identity,
)
INPLACE: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: torch.relu_,
    nn.Hardswish: lambda t: F.hardswish(t, inplace=True),
    nn.ReLU6: lambda t: F.relu6(t, inplace=True),
    nn.SiLU: lambda t: F.silu(t, inplace=True),
}
"""In-place forms of elementwise modules, used when the input has no other user."""
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.GroupNorm,
    nn.BatchNorm2d,
    nn.Flatten,
    nn.Dropout,
    *ELEMENTWISE_MODULES,
    *POOL_MODULES,
)
"""Leaf modules the fused forward translates (anything else raises :class:`UnsupportedModel`)."""
