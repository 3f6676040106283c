"""One graph node of the model, evaluated for all ``r`` weight copies of a chunk.

Values flowing through the graph are whatever the model's forward produces: tensors shared by
all copies, :class:`~fedzo_flwr.zo.engines.fused.stacked.Stacked` per-copy values, and plain
Python values (sizes, shapes, constants); they are typed ``Any`` for that reason.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.zo.engines.fused import layers, ops
from fedzo_flwr.zo.engines.fused.stacked import Stacked, UnsupportedModel
from fedzo_flwr.zo.engines.fused.weights import ChunkWeights

__all__ = ["call_function", "call_method", "call_module"]

_INPLACE_FUNCTIONS = (F.relu, F.hardswish, F.relu6, F.silu)
"""Elementwise functions switched to ``inplace=True`` when their input has no other user."""


def call_module(mod: nn.Module, v: Any, rows: int, weights: ChunkWeights, reuse: bool) -> Any:
    """Leaf module ``mod`` on input ``v``; ``reuse``: ``v`` has no other user."""
    if isinstance(mod, nn.Conv2d | nn.Linear | nn.GroupNorm | nn.BatchNorm2d) and not isinstance(
        v, torch.Tensor | Stacked
    ):
        raise UnsupportedModel(f"{type(mod).__name__} applied to a {type(v).__name__}")
    if isinstance(mod, nn.Conv2d):
        return layers.conv2d(mod, v, rows, weights)
    if isinstance(mod, nn.Linear):
        return layers.linear(mod, v, rows, weights)
    if isinstance(mod, nn.GroupNorm):
        return layers.group_norm(mod, v, rows, weights)
    if isinstance(mod, nn.BatchNorm2d):
        return layers.batch_norm(mod, v, rows, weights)
    if isinstance(mod, nn.Dropout):
        if mod.training and mod.p > 0:
            raise UnsupportedModel("Dropout in training mode")
        return v
    if not isinstance(v, Stacked):
        return mod(v)
    if isinstance(mod, nn.Flatten):
        return ops.flatten(v, mod.start_dim, mod.end_dim)
    if isinstance(mod, layers.POOL_MODULES):
        if len(v.shape) != 4:
            raise UnsupportedModel("pooling of a tensor that is not (B, C, H, W)")
        return Stacked(layers.pool(mod, v.fold()), folded=True, rows=rows)
    inplace = layers.INPLACE.get(type(mod))
    if reuse and v.fresh and inplace is not None:
        return Stacked(inplace(v.data), folded=v.folded, rows=rows)
    return Stacked(mod(v.data), folded=v.folded, rows=rows)


def call_function(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], reuse: bool) -> Any:
    """Function ``fn(*args, **kwargs)``; ``reuse``: the first argument has no other user."""
    if not any(isinstance(a, Stacked) for a in (*args, *kwargs.values())):
        return fn(*args, **kwargs)
    v = args[0]
    if fn in ops.BINARY:
        if len(args) != 2 or kwargs:
            raise UnsupportedModel(f"{fn} with extra arguments")
        return ops.binary(fn, ops.BINARY[fn], args[0], args[1], reuse)
    if not isinstance(v, Stacked) or any(isinstance(a, Stacked) for a in args[1:]):
        raise UnsupportedModel(f"{fn} with a per-copy tensor in a secondary argument")
    if fn in ops.ELEMENTWISE_FUNCTIONS:
        if kwargs.get("inplace") and not (reuse and v.fresh):
            kwargs = {**kwargs, "inplace": False}
        elif reuse and v.fresh and fn in _INPLACE_FUNCTIONS:
            kwargs = {**kwargs, "inplace": True}
        return Stacked(fn(v.data, *args[1:], **kwargs), folded=v.folded, rows=v.rows)
    if fn in ops.POOL_FUNCTIONS:
        if len(v.shape) != 4 or kwargs.get("return_indices"):
            raise UnsupportedModel(f"{fn.__name__} of this input")
        return Stacked(layers.pool(fn, v.fold(), *args[1:], **kwargs), folded=True, rows=v.rows)
    if fn is torch.flatten:
        return ops.flatten(v, *args[1:], **kwargs)
    if fn is F.pad:
        return ops.pad(v, *args[1:], **kwargs)
    if fn is operator.getitem:
        return ops.getitem(v, args[1])
    raise UnsupportedModel(f"function {fn}")


def call_method(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], reuse: bool) -> Any:
    """Method ``args[0].name(*args[1:], **kwargs)``; ``reuse``: ``args[0]`` has no other user."""
    v = args[0]
    if not isinstance(v, Stacked):
        if any(isinstance(a, Stacked) for a in (*args, *kwargs.values())):
            if name in ops.BINARY_METHODS:
                return ops.binary(ops.BINARY_METHODS[name], "", v, args[1], False)
            raise UnsupportedModel(f".{name}() with a per-copy argument")
        return getattr(v, name)(*args[1:], **kwargs)
    if name == "size":
        shape = torch.Size(v.shape)
        if len(args) == 1 and not kwargs:
            return shape
        return shape[args[1] if len(args) > 1 else kwargs["dim"]]
    if name in ("view", "reshape"):
        one = len(args) == 2 and isinstance(args[1], tuple | list)
        new_shape = args[1] if one else args[1:]
        data = v.lead().reshape(v.rows, *new_shape)
        return Stacked(data, folded=False, rows=v.rows, fresh=False)
    if name == "flatten":
        return ops.flatten(v, *args[1:], **kwargs)
    if name in ("mean", "sum"):
        dims = args[1] if len(args) > 1 else kwargs.pop("dim", None)
        keepdim = bool(args[2]) if len(args) > 2 else bool(kwargs.pop("keepdim", False))
        return ops.reduce(v, name, dims, keepdim, **kwargs)
    if name in ops.BINARY_METHODS:
        fn = ops.BINARY_METHODS[name]
        return ops.binary(fn, name + "_", v, args[1], reuse)
    if name == "contiguous":
        return v
    return Stacked(getattr(v.data, name)(), folded=v.folded, rows=v.rows)
