"""The ``fused`` engine: many perturbed forward passes as one direction-batched forward.

A zeroth-order client step evaluates the same mini-batch under ``R`` perturbed copies of the
weights (``R = K`` forward differences, ``2K`` central). Done one copy at a time this is ``R``
small forward passes, each too small to keep a CPU busy (LeNet-5 at batch 32: ~11 GFLOP/s). This
engine evaluates a chunk of ``r`` copies at once by rewriting the model's forward pass so that
every layer works on all ``r`` copies in one large kernel:

* **The first layer sees the same input for every copy.** Its ``r`` weight copies are stacked
  along the output channels, so ``conv(x, W_1) ... conv(x, W_r)`` is *one* wide convolution with
  ``r * out_channels`` filters (for a linear layer, one matrix product). Activations then live in
  the **folded** layout ``(B, r * C, H, W)`` (copy ``j`` owns channels ``j*C .. (j+1)*C - 1``),
  stored channels-last.
* **Later convolutions** take a different input *and* different weights for each copy: in the
  folded layout that is exactly a grouped convolution with ``groups = r * groups`` and the ``r``
  weight copies stacked along the output channels — one oneDNN call for the whole chunk.
* **GroupNorm / BatchNorm (eval)** become one normalisation with ``r * groups`` groups and the
  stacked affine terms; **pooling and activations** act per channel or per element, so they run
  unchanged on the folded tensor.
* **Linear layers** on per-copy inputs are one batched matrix product (``baddbmm``) over the
  **leading** layout ``(r, B, features)``; flattening moves from folded to leading.

Which layer does what is read from the model's structure, never from its name: the model is
traced once with :mod:`torch.fx` and every node is translated by the rules above (see
:data:`SUPPORTED_MODULES` and :data:`SUPPORTED_FUNCTIONS`). A model that uses anything else
(a module, function or layout the rules do not cover) raises :class:`UnsupportedModel` when its
plan is built, and :func:`~fedzo_flwr.zo.estimator.loss_differences` falls back to the ``lean``
engine with a warning. Each plan is also **verified** before first use: two weight copies (the
current weights and a random perturbation of the kept coordinates) are run through the translated
forward on one example and compared with the ordinary forward pass under those weights
(:func:`torch.func.functional_call`); a mismatch means the translation is wrong for this model
and triggers the same fallback.

Two more rewrites keep the memory-bound work small: a monotone activation (ReLU, ReLU6, ...)
followed by a max-pool is applied after the pool (same numbers, a quarter of the values), and
non-overlapping max-pools are an elementwise maximum of strided views.

The weights of a chunk live in one preallocated ``(r, numel)`` block per parameter, reused by
every chunk of a step. A partly pruned parameter's block holds its current values (pruned
entries 0) and only its kept columns are overwritten, with ``w + s σ u_k`` computed for the kept
coordinates only (``u_k`` is the direction over the KeptSpace, never expanded to the dense
shape). Pruned weights are therefore exactly 0 in every forward pass, the model itself is never
modified, and the perturbed weights are bit-identical to those of the ``lean`` engine (the same
``torch.add(w, u, alpha=s σ)``). Directions come from
:meth:`~fedzo_flwr.zo.directions.DirectionGenerator.block`, one chunk at a time.

**Threads.** With ``n = torch.get_num_threads()`` > 1, ``n`` workers (threads with one
intra-op thread each) take chunks from a shared queue, instead of one chunk at a time on ``n``
OpenMP threads: every kernel of a chunk is large enough for one core, independent workers need
no barrier per kernel, and a worker that loses its core to another process simply takes fewer
chunks. The ``K`` directions are cut into chunks of equal size (±1) whose number is a multiple
of ``n`` (:func:`balanced_chunks`), so no worker waits on a last, lone chunk. torch is set to
one intra-op thread for the duration of the call. Which worker evaluates a chunk does not
change its numbers: the result is deterministic.

**Memory.** A chunk of ``r`` copies holds ``r`` weight copies, ``r`` directions and ``r``
copies of the live activations; ``workers`` chunks are in flight at once. The per-copy
activation bytes are measured while the plan is verified (peak of the live folded/leading
tensors on one example, scaled by the batch size), and the chunk is the largest that keeps the
total of all workers under ``memory_budget_mb`` (:func:`chunk_for_budget`). The default budget
(:data:`DEFAULT_MEMORY_BUDGET_MB`) is set where larger chunks stop paying off on a 2-core CPU
(see ``docs/performance.md``).
"""

from __future__ import annotations

import logging
import operator
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn
from torch.func import functional_call
from torch.nn import functional as F

from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.settings import ZOSettings

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "SUPPORTED_FUNCTIONS",
    "SUPPORTED_MODULES",
    "FusedPlan",
    "UnsupportedModel",
    "balanced_chunks",
    "chunk_for_budget",
    "fused_loss_differences",
    "get_plan",
    "planned_chunk",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET_MB = 32.0
"""Default ceiling (MiB) on the chunk's working set: weights, directions and activations."""

_CL = torch.channels_last

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class UnsupportedModel(Exception):
    """The model uses an operation the direction-batched forward cannot translate."""


# --------------------------------------------------------------------------- stacked values


class _Stacked:
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
            out = torch.empty((b, r * c, *rest), dtype=d.dtype, memory_format=_CL)
            out.permute(0, 2, 3, 1).view(b, *rest, r, c).copy_(d.permute(1, 3, 4, 0, 2))
            return out
        return d.movedim(0, 1).reshape(b, r * c, *rest)


def _replicate(t: torch.Tensor, rows: int) -> _Stacked:
    """Folded copies of a shared ``(B, C, ...)`` tensor (for layers whose input is shared)."""
    if t.dim() < 2:
        raise UnsupportedModel("a per-copy layer applied to a tensor without a channel dimension")
    data = t.repeat(1, rows, *([1] * (t.dim() - 2)))
    if data.dim() == 4:
        data = data.contiguous(memory_format=_CL)
    return _Stacked(data, folded=True, rows=rows)


# ------------------------------------------------------------------------- layer rules


class _ChunkWeights:
    """The ``r`` weight copies of one chunk, built per parameter when a layer asks for them.

    Row ``j * count + i`` holds ``w + signs[j] * σ * u_i`` on the kept coordinates (``u_i`` the
    chunk's ``i``-th direction) and the current values elsewhere (0 at pruned entries). Each
    parameter's copies live in a contiguous ``(r, *shape)`` block of a preallocated buffer, so
    ``(r * out, in, kh, kw)`` conv weights are free views; built lazily, a block is still in
    cache when its layer runs.
    """

    def __init__(
        self,
        layout: _Layout,
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


def _conv2d(m: nn.Conv2d, v: object, rows: int, weights: _ChunkWeights) -> object:
    if m.padding_mode != "zeros":
        raise UnsupportedModel(f"Conv2d with padding_mode={m.padding_mode!r}")
    w, b = weights.get(m.weight), weights.get(m.bias)
    if isinstance(v, torch.Tensor) and w is None and b is None:
        return m(v)
    if w is not None:
        weight = w.view(-1, *w.shape[2:])
    else:
        weight = m.weight.repeat(rows, 1, 1, 1).contiguous(memory_format=_CL)
    if b is not None:
        bias = b.reshape(-1)
    else:
        bias = None if m.bias is None else m.bias.repeat(rows)
    if isinstance(v, torch.Tensor) and m.groups == 1:
        # Shared input: one wide convolution with r * out filters (oneDNN; an explicit
        # im2col + GEMM measured no faster).
        x = v.contiguous(memory_format=_CL)
        out = F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, 1)
        return _Stacked(out, folded=True, rows=rows)
    sv = _replicate(v, rows) if isinstance(v, torch.Tensor) else v
    out = F.conv2d(sv.fold(), weight, bias, m.stride, m.padding, m.dilation, rows * m.groups)
    return _Stacked(out, folded=True, rows=rows)


def _linear(m: nn.Linear, v: object, rows: int, weights: _ChunkWeights) -> object:
    w, b = weights.get(m.weight), weights.get(m.bias)
    if isinstance(v, torch.Tensor):
        if w is None and b is None:
            return m(v)
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
    return _Stacked(out.view(rows, *lead_shape, out.shape[-1]), folded=False, rows=rows)


def _affine(p: torch.Tensor | None, rows: int, weights: _ChunkWeights) -> torch.Tensor | None:
    if p is None:
        return None
    s = weights.get(p)
    return p.repeat(rows) if s is None else s.reshape(-1)


def _group_norm(m: nn.GroupNorm, v: object, rows: int, weights: _ChunkWeights) -> object:
    w, b = _affine(m.weight, rows, weights), _affine(m.bias, rows, weights)
    if isinstance(v, torch.Tensor):
        if weights.get(m.weight) is None and weights.get(m.bias) is None:
            return m(v)
        v = _replicate(v, rows)
    out = F.group_norm(v.fold(), rows * m.num_groups, w, b, m.eps)
    return _Stacked(out, folded=True, rows=rows)


def _batch_norm(m: nn.BatchNorm2d, v: object, rows: int, weights: _ChunkWeights) -> object:
    if m.training or m.running_mean is None or m.running_var is None:
        raise UnsupportedModel("BatchNorm in training mode or without running statistics")
    w, b = _affine(m.weight, rows, weights), _affine(m.bias, rows, weights)
    if isinstance(v, torch.Tensor):
        if weights.get(m.weight) is None and weights.get(m.bias) is None:
            return m(v)
        v = _replicate(v, rows)
    mean, var = m.running_mean.repeat(rows), m.running_var.repeat(rows)
    out = F.batch_norm(v.fold(), mean, var, w, b, False, 0.0, m.eps)
    return _Stacked(out, folded=True, rows=rows)


def _pair(v: object) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v  # type: ignore[misc]
    return (int(a), int(b))


def _max_pool2d(
    x: torch.Tensor,
    kernel_size: object,
    stride: object = None,
    padding: object = 0,
    dilation: object = 1,
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


def _pool(fn: object, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    if fn is F.max_pool2d:
        return _max_pool2d(x, *args, **kwargs)
    if isinstance(fn, nn.MaxPool2d):
        return _max_pool2d(
            x, fn.kernel_size, fn.stride, fn.padding, fn.dilation, fn.ceil_mode, fn.return_indices
        )
    return fn(x, *args, **kwargs)  # type: ignore[operator]


# Activations f with f(max(a, b)) == max(f(a), f(b)) exactly (non-decreasing): applied after a
# max-pool instead of before it, they touch a quarter of the values (same numbers).
_MONOTONE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
)
_MONOTONE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.sigmoid, torch.tanh}


def _is_max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A max-pool node that returns one tensor (no indices)."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return isinstance(mod, nn.MaxPool2d) and not mod.return_indices
    if node.op != "call_function" or node.target is not F.max_pool2d:
        return False
    return len(node.args) < 7 and not node.kwargs.get("return_indices", False)


def _is_monotone(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.LeakyReLU):
            return mod.negative_slope >= 0
        return isinstance(mod, _MONOTONE_MODULES)
    return node.op == "call_function" and node.target in _MONOTONE_FUNCTIONS


def _pool_before_activation(gm: fx.GraphModule) -> int:
    """Rewrite ``maxpool(act(z))`` as ``act(maxpool(z))`` for monotone ``act``; return count."""
    graph = gm.graph
    swapped = 0
    for pool in list(graph.nodes):
        if not _is_max_pool(gm, pool) or not pool.args or not isinstance(pool.args[0], fx.Node):
            continue
        act = pool.args[0]
        if len(act.users) != 1 or not _is_monotone(gm, act) or act.kwargs.get("inplace"):
            continue
        with graph.inserting_after(pool):
            moved = graph.create_node(act.op, act.target, (pool, *act.args[1:]), dict(act.kwargs))
        pool.replace_all_uses_with(moved, delete_user_cb=lambda user, m=moved: user is not m)
        pool.args = (act.args[0], *pool.args[1:])
        graph.erase_node(act)
        swapped += 1
    if swapped:
        graph.lint()
        gm.recompile()
    return swapped


_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
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
_INPLACE: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: torch.relu_,
    nn.Hardswish: lambda t: F.hardswish(t, inplace=True),
    nn.ReLU6: lambda t: F.relu6(t, inplace=True),
    nn.SiLU: lambda t: F.silu(t, inplace=True),
}
_POOL_MODULES: tuple[type[nn.Module], ...] = (
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
    *_ELEMENTWISE_MODULES,
    *_POOL_MODULES,
)
"""Leaf modules the fused forward translates (anything else raises :class:`UnsupportedModel`)."""

_ELEMENTWISE_FUNCTIONS = {
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
_POOL_FUNCTIONS = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
_BINARY = {
    operator.add: "add_",
    operator.sub: "sub_",
    operator.mul: "mul_",
    operator.truediv: "div_",
    torch.add: "add_",
    torch.sub: "sub_",
    torch.mul: "mul_",
    torch.div: "div_",
}
_BINARY_METHODS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}

SUPPORTED_FUNCTIONS = frozenset(
    {*_ELEMENTWISE_FUNCTIONS, *_POOL_FUNCTIONS, *_BINARY, torch.flatten, F.pad, operator.getitem}
)
"""Functions the fused forward translates; methods: ``size``, ``view``, ``reshape``,
``flatten``, ``mean``, ``sum``, ``add``, ``sub``, ``mul`` and elementwise activations."""


def _per_copy_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _flatten(v: _Stacked, start: int = 0, end: int = -1) -> _Stacked:
    ndim = len(v.shape)
    s, e = _per_copy_dim(start, ndim), _per_copy_dim(end, ndim)
    return _Stacked(v.lead().flatten(s + 1, e + 1), folded=False, rows=v.rows, fresh=False)


def _getitem(v: _Stacked, index: object) -> _Stacked:
    idx = index if isinstance(index, tuple) else (index,)
    full = slice(None)
    if (
        v.folded
        and len(idx) >= 2
        and idx[0] == full
        and idx[1] == full
        and all(isinstance(i, (slice, int)) for i in idx[2:])
    ):
        return _Stacked(v.data[idx], folded=True, rows=v.rows, fresh=False)
    return _Stacked(v.lead()[(full, *idx)], folded=False, rows=v.rows, fresh=False)


def _pad(v: _Stacked, pad: tuple[int, ...], mode: str = "constant", value: object = None) -> object:
    ndim = len(v.shape)
    touched = len(pad) // 2
    if v.folded and touched <= ndim - 2:
        return _Stacked(F.pad(v.data, pad, mode, value), folded=True, rows=v.rows)
    if mode != "constant":
        raise UnsupportedModel(f"pad mode {mode!r} over the channel or batch dimension")
    if v.folded and touched == ndim - 1:
        b, rc, *rest = v.data.shape
        five = v.data.view(b, v.rows, rc // v.rows, *rest)
        padded = F.pad(five, pad, mode, value)
        out = padded.reshape(b, -1, *padded.shape[3:])
        if out.dim() == 4:
            out = out.contiguous(memory_format=_CL)
        return _Stacked(out, folded=True, rows=v.rows)
    return _Stacked(F.pad(v.lead(), pad, mode, value), folded=False, rows=v.rows)


def _reduce(v: _Stacked, method: str, dims: object, keepdim: bool, **kwargs: object) -> _Stacked:
    if dims is None:
        raise UnsupportedModel(f"{method}() over all dimensions")
    ndim = len(v.shape)
    dim_list = [dims] if isinstance(dims, int) else list(dims)
    dim_list = [_per_copy_dim(d, ndim) for d in dim_list]
    if v.folded and all(d >= 2 for d in dim_list):
        data = getattr(v.data, method)(dim_list, keepdim=keepdim, **kwargs)
        return _Stacked(data, folded=True, rows=v.rows)
    data = getattr(v.lead(), method)([d + 1 for d in dim_list], keepdim=keepdim, **kwargs)
    return _Stacked(data, folded=False, rows=v.rows)


def _binary(fn: Callable, inplace: str, a: object, b: object, reuse: bool) -> object:
    sa, sb = isinstance(a, _Stacked), isinstance(b, _Stacked)
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
        out_shape = torch.broadcast_shapes(x.shape, y.shape if isinstance(y, torch.Tensor) else ())
        if out_shape == x.shape and x.data_ptr() == a.data.data_ptr():
            return _Stacked(getattr(x, inplace)(y), folded=folded, rows=rows)
    return _Stacked(fn(x, y), folded=folded, rows=rows)


# ----------------------------------------------------------------------------- the plan


def _node_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    return gm.get_submodule(str(node.target))


@dataclass
class _Measured:
    act_bytes_per_example: float


class FusedPlan:
    """A model's forward pass, translated to run ``r`` weight copies at once.

    Parameters
    ----------
    model : nn.Module
        The model (float32, a single tensor input, one tensor output). Not modified.
    space : KeptSpace
        The perturbed coordinates; trainable parameters outside it are shared by all copies.

    Raises
    ------
    UnsupportedModel
        If tracing fails or the graph uses anything outside the supported rules.
    """

    def __init__(self, model: nn.Module, space: KeptSpace) -> None:
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as err:  # any tracing failure means "not translatable"
            raise UnsupportedModel(f"torch.fx cannot trace the model: {err}") from err
        params = dict(model.named_parameters())
        self.space_params = [params[n] for n in space.names]
        if any(p.dtype != torch.float32 for p in self.space_params):
            raise UnsupportedModel("the fused engine supports float32 parameters only")
        self.nodes = list(self.gm.graph.nodes)
        self._check_graph()
        self.pools_moved = _pool_before_activation(self.gm)
        self.nodes = list(self.gm.graph.nodes)
        position = {n: i for i, n in enumerate(self.nodes)}
        last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in self.nodes}
        self.free_after: list[list[fx.Node]] = [[] for _ in self.nodes]
        for n, i in last_use.items():
            self.free_after[i].append(n)
        self.measured: dict[tuple[int, ...], _Measured] = {}

    def _check_graph(self) -> None:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedModel(f"forward must take one tensor, got {len(placeholders)} inputs")
        space_ids = {id(p) for p in self.space_params}
        methods = {"size", "view", "reshape", "flatten", "mean", "sum"}
        methods |= set(_BINARY_METHODS) | _ELEMENTWISE_METHODS
        for node in self.nodes:
            if node.op == "call_module":
                mod = _node_module(self.gm, node)
                if not isinstance(mod, SUPPORTED_MODULES):
                    raise UnsupportedModel(f"module {type(mod).__name__} ({node.target})")
            elif node.op == "call_function":
                if node.target not in SUPPORTED_FUNCTIONS:
                    raise UnsupportedModel(f"function {node.target}")
            elif node.op == "call_method":
                if node.target not in methods:
                    raise UnsupportedModel(f"method .{node.target}()")
            elif node.op == "get_attr":
                target = getattr_path(self.gm, str(node.target))
                if isinstance(target, torch.Tensor) and id(target) in space_ids:
                    raise UnsupportedModel(f"direct use of perturbed parameter {node.target}")

    def layout(self, space: KeptSpace) -> _Layout:
        """Where each perturbed parameter's kept coordinates sit in ``space``."""
        return _Layout(self.space_params, space)

    # -- forward ------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, weights: _ChunkWeights, track: list[int] | None = None
    ) -> torch.Tensor:
        """Logits ``(r, B, classes)`` of the chunk's ``r`` weight copies on batch ``x``.

        With ``track`` (a one-element list), ``track[0]`` receives the peak bytes of the live
        per-copy activations (tensors this forward allocated, views not double counted).
        """
        rows = weights.rows
        env: dict[fx.Node, object] = {}
        live = 0
        result = None
        for i, node in enumerate(self.nodes):
            value = self._run(node, env, x, rows, weights)
            env[node] = value
            if track is not None and isinstance(value, _Stacked) and value.fresh:
                if not _aliases(value, [env[n] for n in node.all_input_nodes if n in env]):
                    live += value.data.numel() * value.data.element_size()
                    track[0] = max(track[0], live)
            if node.op == "output":
                result = value
            for dead in self.free_after[i]:
                gone = env.pop(dead, None)
                if track is not None and isinstance(gone, _Stacked) and gone.fresh:
                    if not _aliases(gone, env.values()):
                        live -= gone.data.numel() * gone.data.element_size()
        if isinstance(result, torch.Tensor):  # no perturbed parameter reaches the output
            return result.unsqueeze(0).expand(rows, *result.shape)
        if not isinstance(result, _Stacked):
            raise UnsupportedModel("the model output must be one tensor")
        return result.lead()

    def _run(
        self,
        node: fx.Node,
        env: dict[fx.Node, object],
        x: torch.Tensor,
        rows: int,
        weights: _ChunkWeights,
    ) -> object:
        op = node.op
        if op == "placeholder":
            return x
        if op == "get_attr":
            return getattr_path(self.gm, str(node.target))
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = dict(fx.node.map_arg(node.kwargs, lambda n: env[n]))
        if op == "output":
            return args[0]
        first = args[0] if args else None
        reuse = bool(node.args) and isinstance(node.args[0], fx.Node)
        reuse = reuse and len(node.args[0].users) == 1
        if op == "call_module":
            mod = _node_module(self.gm, node)
            return self._module(mod, first, rows, weights, reuse)
        if op == "call_function":
            return self._function(node.target, args, kwargs, reuse)
        return self._method(str(node.target), args, kwargs, reuse)

    def _module(
        self,
        mod: nn.Module,
        v: object,
        rows: int,
        weights: _ChunkWeights,
        reuse: bool,
    ) -> object:
        if isinstance(mod, nn.Conv2d):
            return _conv2d(mod, v, rows, weights)
        if isinstance(mod, nn.Linear):
            return _linear(mod, v, rows, weights)
        if isinstance(mod, nn.GroupNorm):
            return _group_norm(mod, v, rows, weights)
        if isinstance(mod, nn.BatchNorm2d):
            return _batch_norm(mod, v, rows, weights)
        if isinstance(mod, nn.Dropout):
            if mod.training and mod.p > 0:
                raise UnsupportedModel("Dropout in training mode")
            return v
        if not isinstance(v, _Stacked):
            return mod(v)
        if isinstance(mod, nn.Flatten):
            return _flatten(v, mod.start_dim, mod.end_dim)
        if isinstance(mod, _POOL_MODULES):
            if len(v.shape) != 4:
                raise UnsupportedModel("pooling of a tensor that is not (B, C, H, W)")
            return _Stacked(_pool(mod, v.fold()), folded=True, rows=rows)
        inplace = _INPLACE.get(type(mod))
        if reuse and v.fresh and inplace is not None:
            return _Stacked(inplace(v.data), folded=v.folded, rows=rows)
        return _Stacked(mod(v.data), folded=v.folded, rows=rows)

    def _function(self, fn: object, args: tuple, kwargs: dict[str, object], reuse: bool) -> object:
        if not any(isinstance(a, _Stacked) for a in (*args, *kwargs.values())):
            return fn(*args, **kwargs)
        v = args[0]
        if fn in _BINARY:
            if len(args) != 2 or kwargs:
                raise UnsupportedModel(f"{fn} with extra arguments")
            return _binary(fn, _BINARY[fn], args[0], args[1], reuse)
        if not isinstance(v, _Stacked) or any(isinstance(a, _Stacked) for a in args[1:]):
            raise UnsupportedModel(f"{fn} with a per-copy tensor in a secondary argument")
        if fn in _ELEMENTWISE_FUNCTIONS:
            if kwargs.get("inplace") and not (reuse and v.fresh):
                kwargs = {**kwargs, "inplace": False}
            elif reuse and v.fresh and fn in (F.relu, F.hardswish, F.relu6, F.silu):
                kwargs = {**kwargs, "inplace": True}
            return _Stacked(fn(v.data, *args[1:], **kwargs), folded=v.folded, rows=v.rows)
        if fn in _POOL_FUNCTIONS:
            if len(v.shape) != 4 or kwargs.get("return_indices"):
                raise UnsupportedModel(f"{fn.__name__} of this input")
            return _Stacked(_pool(fn, v.fold(), *args[1:], **kwargs), folded=True, rows=v.rows)
        if fn is torch.flatten:
            return _flatten(v, *args[1:], **kwargs)
        if fn is F.pad:
            return _pad(v, *args[1:], **kwargs)
        if fn is operator.getitem:
            return _getitem(v, args[1])
        raise UnsupportedModel(f"function {fn}")

    def _method(self, name: str, args: tuple, kwargs: dict[str, object], reuse: bool) -> object:
        v = args[0]
        if not isinstance(v, _Stacked):
            if any(isinstance(a, _Stacked) for a in (*args, *kwargs.values())):
                if name in _BINARY_METHODS:
                    return _binary(_BINARY_METHODS[name], "", v, args[1], False)
                raise UnsupportedModel(f".{name}() with a per-copy argument")
            return getattr(v, name)(*args[1:], **kwargs)
        if name == "size":
            shape = torch.Size(v.shape)
            if len(args) == 1 and not kwargs:
                return shape
            return shape[args[1] if len(args) > 1 else kwargs["dim"]]
        if name in ("view", "reshape"):
            one = len(args) == 2 and isinstance(args[1], (tuple, list))
            shape = args[1] if one else args[1:]
            data = v.lead().reshape(v.rows, *shape)
            return _Stacked(data, folded=False, rows=v.rows, fresh=False)
        if name == "flatten":
            return _flatten(v, *args[1:], **kwargs)
        if name in ("mean", "sum"):
            dims = args[1] if len(args) > 1 else kwargs.pop("dim", None)
            keepdim = bool(args[2]) if len(args) > 2 else bool(kwargs.pop("keepdim", False))
            return _reduce(v, name, dims, keepdim, **kwargs)
        if name in _BINARY_METHODS:
            fn = _BINARY_METHODS[name]
            return _binary(fn, name + "_", v, args[1], reuse)
        if name == "contiguous":
            return v
        return _Stacked(getattr(v.data, name)(), folded=v.folded, rows=v.rows)

    # -- verification and memory --------------------------------------------------------

    def verify(self, model: nn.Module, space: KeptSpace, x: torch.Tensor) -> _Measured:
        """Check the translation on one example against ``functional_call``; measure memory.

        Two copies are run: the current weights and a random perturbation of the kept
        coordinates (scale 0.1 of the mean magnitude). Both must match the ordinary forward
        pass under the same weights, or :class:`UnsupportedModel` is raised. Cached per input
        shape (the translation does not depend on the weights or on the mask).
        """
        key = tuple(x.shape[1:])
        if key in self.measured:
            return self.measured[key]
        one = x[:1].contiguous(memory_format=_CL) if x.dim() == 4 else x[:1]
        layout = self.layout(space)
        kept = space.gather(model)
        noise = torch.randn(1, space.dim, generator=torch.Generator().manual_seed(0))
        scale = 0.1 * float(kept.abs().mean()) + 1e-3
        weights = _ChunkWeights(layout, layout.new_blocks(2), kept, noise, scale, (0.0, 1.0))
        track = [0]
        try:
            logits = self.forward(one, weights, track)
        except UnsupportedModel:
            raise
        except Exception as err:  # a translation rule does not fit this model
            raise UnsupportedModel(f"fused forward failed: {type(err).__name__}: {err}") from err
        for row in range(2):
            state = {n: weights.get(p)[row] for n, p in zip(space.names, self.space_params)}
            expected = functional_call(model, state, (x[:1],))
            if not torch.allclose(logits[row], expected, rtol=1e-3, atol=1e-4):
                err = float((logits[row] - expected).abs().max())
                raise UnsupportedModel(
                    f"verification failed: fused forward differs from the model by {err:.3g}"
                )
        measured = _Measured(act_bytes_per_example=track[0] / 2)
        self.measured[key] = measured
        return measured


class _Layout:
    """Perturbed parameters of a plan and where their kept coordinates sit in a KeptSpace."""

    def __init__(self, params: list[torch.Tensor], space: KeptSpace) -> None:
        self.params = params
        self.index = {id(p): i for i, p in enumerate(params)}
        self.indices = list(space.indices)
        self.shapes = [tuple(p.shape) for p in params]
        self.kept_sizes = list(space.sizes)
        self.kept_offsets = [0]
        for size in self.kept_sizes[:-1]:
            self.kept_offsets.append(self.kept_offsets[-1] + size)
        self.numel = sum(p.numel() for p in params)

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


def _aliases(v: _Stacked, others: object) -> bool:
    ptr = v.data.untyped_storage().data_ptr()
    return any(
        isinstance(o, _Stacked) and o.data.untyped_storage().data_ptr() == ptr for o in others
    )


def getattr_path(root: nn.Module, path: str) -> object:
    """``root.a.b.c`` for ``path = "a.b.c"``."""
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], FusedPlan]] = (
    weakref.WeakKeyDictionary()
)


def get_plan(model: nn.Module, space: KeptSpace) -> FusedPlan:
    """The (cached) :class:`FusedPlan` of ``model`` for the parameters of ``space``.

    Plans are cached per model object and set of perturbed parameters; the cache does not keep
    models alive. Kept indices may change between calls (they are read from ``space`` each
    time): only the traced graph is cached.
    """
    per_model = _PLANS.setdefault(model, {})
    key = tuple(space.names)
    plan = per_model.get(key)
    if plan is None:
        plan = FusedPlan(model, space)
        per_model[key] = plan
    return plan


# --------------------------------------------------------------------------- the engine


def chunk_for_budget(
    per_row_bytes: float, rows_per_direction: int, memory_budget_mb: float, k: int
) -> int:
    """Directions per chunk so that ``chunk * rows_per_direction * per_row_bytes`` ≤ budget.

    At least 1 (a budget below one copy's needs still runs, one direction at a time) and at
    most ``k``.
    """
    budget = memory_budget_mb * 2**20
    chunk = int(budget // (per_row_bytes * rows_per_direction))
    return max(1, min(k, chunk))


def balanced_chunks(k: int, chunk: int, workers: int = 1) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``0..k-1`` in chunks of at most ``chunk`` directions.

    The chunks have equal sizes (±1), and their number is a multiple of ``workers`` where ``k``
    allows it, so that no worker is left with a last, lone chunk: 200 directions in chunks of
    at most 16 on 2 workers are 14 chunks of 14 or 15, not 12 of 16 and one of 8.
    """
    if k < 1 or chunk < 1 or workers < 1:
        raise ValueError(f"k, chunk and workers must be >= 1, got {k}, {chunk}, {workers}")
    count = -(-k // chunk)
    if workers > 1:
        count = min(k, -(-count // workers) * workers)
    size, extra = divmod(k, count)
    bounds, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _per_row_bytes(measured: _Measured, layout: _Layout, dim: int, batch: int) -> float:
    # Activations of one copy, its weight copy, and its direction row.
    return measured.act_bytes_per_example * batch + 4 * layout.numel + 4 * dim


def planned_chunk(
    model: nn.Module,
    space: KeptSpace,
    x: torch.Tensor,
    settings: ZOSettings,
    memory_budget_mb: float | None = None,
    workers: int = 1,
) -> int:
    """The chunk :func:`fused_loss_differences` derives from ``memory_budget_mb`` for ``x``.

    The budget is shared by ``workers`` chunks in flight at once.
    """
    plan = get_plan(model, space)
    measured = plan.verify(model, space, x)
    per_row = _per_row_bytes(measured, plan.layout(space), space.dim, x.shape[0])
    budget = DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else memory_budget_mb
    rows_per_direction = 1 if settings.scheme == "forward" else 2
    return chunk_for_budget(per_row, rows_per_direction, budget / workers, settings.k)


@torch.no_grad()
def fused_loss_differences(
    model: nn.Module,
    space: KeptSpace,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: DirectionGenerator,
    settings: ZOSettings,
    loss_fn: LossFn,
    chunk_size: int | None = None,
    memory_budget_mb: float | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, float, int]:
    """``(deltas float64 (K,), base_loss, chunk)`` of one step with the fused forward.

    ``loss_fn(logits (..., B, C), y)`` must return the per-copy losses (float64). The base loss
    is computed by the model's own forward pass, exactly as in the ``lean`` engine.

    ``workers`` chunks run at once on their own threads, each with one intra-op thread
    (default: ``torch.get_num_threads()``). On a small CPU this scales better than one chunk at
    a time on several OpenMP threads: no barrier per kernel, and a worker that loses its core
    to another process delays only its own chunks. For the duration of the call torch is set to
    one intra-op thread (restored on return). The memory budget is shared by the workers.

    Raises
    ------
    UnsupportedModel
        If the model cannot be translated (the caller falls back to another engine).
    """
    if x.dtype != torch.float32:
        raise UnsupportedModel("the fused engine supports float32 inputs only")
    plan = get_plan(model, space)
    plan.verify(model, space, x)
    workers = torch.get_num_threads() if workers is None else workers
    if chunk_size is None:
        chunk_size = planned_chunk(model, space, x, settings, memory_budget_mb, workers)
    bounds = balanced_chunks(settings.k, chunk_size, workers)
    chunk = max(stop - start for start, stop in bounds)
    signs = (1.0,) if settings.scheme == "forward" else (1.0, -1.0)

    base = float(loss_fn(model(x), y))
    xin = x.contiguous(memory_format=_CL) if x.dim() == 4 else x
    layout = plan.layout(space)
    kept = space.gather(model)
    deltas = np.empty(settings.k, dtype=np.float64)
    workers = max(1, min(workers, len(bounds)))
    pending = iter(bounds)
    lock = threading.Lock()

    def run(worker: int) -> None:
        if workers > 1:
            torch.set_num_threads(1)
            gen = DirectionGenerator(space.dim, generator.seed, generator.kind)
        else:
            gen = generator
        blocks = layout.new_blocks(chunk * len(signs))
        directions = torch.empty(chunk, space.dim, dtype=torch.float32)
        while True:
            with lock:  # dynamic scheduling: a worker slowed by another process does less
                item = next(pending, None)
            if item is None:
                return
            start, stop = item
            count = stop - start
            dirs = gen.block(start, stop, out=directions, threads=1 if workers > 1 else None)
            weights = _ChunkWeights(layout, blocks, kept, dirs, settings.sigma, signs)
            losses = loss_fn(plan.forward(xin, weights), y).numpy()
            reference = base if len(signs) == 1 else losses[count:]
            deltas[start:stop] = losses[:count] - reference

    if workers == 1:
        run(0)
    else:
        threads = torch.get_num_threads()
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="fedzo-fused") as pool:
                for future in [pool.submit(run, w) for w in range(workers)]:
                    future.result()
        finally:
            torch.set_num_threads(threads)
    return deltas, base, chunk
