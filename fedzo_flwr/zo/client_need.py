"""What a zeroth-order client needs in memory for one step with the configured engine (analytic).

The server admits a node of a memory-heterogeneous population (``memory-profile``) to a
zeroth-order run only if its budget covers this figure times ``1 + memory-margin``
(``server_app/memory_gate.py``; the rule and its unit are in ``docs/progressive.md``). The
figure is the ``total_bytes`` of :mod:`fedzo_flwr.measure.memory_model` (weights, mask and
batch included, the Python/torch runtime not), for ``batch-size`` examples, plus the working
memory the engine adds on top of one forward pass:

============  ==================================================================================
engine        need
============  ==================================================================================
``stream``    :func:`~fedzo_flwr.measure.memory_model.stream_breakdown` at ``micro-batch``: the
              model sparse at rest, one layer's scratch buffers, one micro-batch's activations
``lean``      :func:`~fedzo_flwr.measure.memory_model.zo_breakdown`: in place, one direction at
              a time
``fused``     ``zo_breakdown`` + a chunk of perturbed copies: ``chunk x rows x per-copy``,
              the chunk ``chunk-size`` or else the largest that keeps the copies under
              ``engine-memory-mb`` (the engine's own rule,
              :func:`~fedzo_flwr.zo.engines.fused.chunk_for_budget`), at most K
``batched``   ``zo_breakdown`` + ``chunk x rows x per-copy``, the chunk ``chunk-size`` or 16,
              at most K
============  ==================================================================================

``rows`` is 1 for forward differences and 2 for central ones. A copy (``per_copy_bytes``) is
one float32 copy of every perturbed parameter, one direction over the kept coordinates and one
forward pass's peak activations (the largest input + output of one layer at the batch). The
fused engine measures a copy's activations on the traced graph; this count is the analytic
stand-in (and over-counts for a model the fused engine cannot translate, which then runs
``lean``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedzo_flwr.config import RunConfig
from fedzo_flwr.measure.memory_model import (
    MemoryBreakdown,
    activation_bytes,
    stream_breakdown,
    zo_breakdown,
)
from fedzo_flwr.sparse.mask import Mask
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.engines.batched import DEFAULT_CHUNK_SIZE
from fedzo_flwr.zo.engines.fused import chunk_for_budget

__all__ = ["ZOClientNeed", "zo_client_need"]


@dataclass(frozen=True)
class ZOClientNeed:
    """The analytic need of one zeroth-order client step.

    Attributes
    ----------
    engine : str
        The ``engine`` it was computed for.
    breakdown : MemoryBreakdown
        The forward-only step (``stream_breakdown`` or ``zo_breakdown``).
    chunk : int
        Directions evaluated at once (1 for ``lean`` and ``stream``).
    working_bytes : int
        The chunk's perturbed copies (0 for ``lean`` and ``stream``).
    """

    engine: str
    breakdown: MemoryBreakdown
    chunk: int
    working_bytes: int

    @property
    def total_bytes(self) -> int:
        """The need: the breakdown's total plus the chunk's working memory."""
        return self.breakdown.total_bytes + self.working_bytes

    def as_dict(self) -> dict[str, object]:
        """Plain dict (what ``results.json`` records)."""
        return {
            "engine": self.engine,
            "kind": self.breakdown.kind,
            "breakdown": self.breakdown.as_dict(),
            "chunk": self.chunk,
            "working_bytes": self.working_bytes,
            "total_bytes": self.total_bytes,
        }


def per_copy_bytes(model: nn.Module, space: KeptSpace, x: torch.Tensor) -> int:
    """One perturbed copy: its parameters, its direction and one forward pass's activations."""
    params = dict(model.named_parameters())
    weights = sum(4 * params[name].numel() for name in space.names)
    _, activations = activation_bytes(model, x)
    return weights + 4 * space.dim + activations


def zo_client_need(
    cfg: RunConfig,
    model: nn.Module,
    mask: Mask | None,
    input_shape: tuple[int, ...] = (3, 32, 32),
) -> ZOClientNeed:
    """The analytic memory need of one client step of ``cfg``'s engine (module docstring).

    Parameters
    ----------
    cfg : RunConfig
        ``engine``, ``batch-size``, ``micro-batch``, ``chunk-size``, ``engine-memory-mb``, ``k``
        and ``fd``.
    model : nn.Module
        The (masked) model the client trains; only its shapes are read.
    mask : Mask or None
        Its mask (``None``: dense).
    input_shape : tuple of int
        One example's shape (CHW).
    """
    x = torch.zeros(cfg.batch_size, *input_shape)
    if cfg.engine == "stream":
        return ZOClientNeed("stream", stream_breakdown(model, mask, x, cfg.micro_batch), 1, 0)
    breakdown = zo_breakdown(model, mask, x)
    if cfg.engine == "lean":
        return ZOClientNeed("lean", breakdown, 1, 0)
    rows = 1 if cfg.fd == "forward" else 2
    copy = per_copy_bytes(model, KeptSpace(model, mask), x)
    if cfg.chunk_size:
        chunk = min(cfg.k, cfg.chunk_size)
    elif cfg.engine == "fused":
        chunk = chunk_for_budget(copy, rows, cfg.engine_memory_mb, cfg.k)
    else:
        chunk = min(cfg.k, DEFAULT_CHUNK_SIZE)
    return ZOClientNeed(cfg.engine, breakdown, chunk, chunk * rows * copy)
