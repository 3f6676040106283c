"""The ``batched`` engine: chunks of perturbed copies in one ``vmap`` of ``functional_call``.

The model is never modified. Memory grows with the chunk; on CPU it is slower than ``lean``
(kept as a generic reference for the ``fused`` engine).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.engines.base import LossDifferences, batch_loss
from fedzo_flwr.zo.settings import ZOSettings

__all__ = ["DEFAULT_CHUNK_SIZE", "batched_engine"]

DEFAULT_CHUNK_SIZE = 16
"""Directions per vectorised pass of the ``batched`` engine when ``chunk_size`` is not given."""


def batched_engine(
    model: nn.Module,
    space: KeptSpace,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: DirectionGenerator,
    settings: ZOSettings,
    *,
    chunk_size: int | None = None,
    memory_budget_mb: float | None = None,
    micro_batch: int = 0,
) -> LossDifferences:
    """The K loss differences, ``chunk_size`` directions per vectorised pass (budget: unused)."""
    del micro_batch, memory_budget_mb  # the chunk is given or DEFAULT_CHUNK_SIZE
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    batched_names = space.names
    fixed = {n: t for n, t in {**params, **buffers}.items() if n not in set(batched_names)}

    def forward(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        logits: torch.Tensor = functional_call(model, {**fixed, **weights}, (x,))
        return logits

    vectorised = vmap(forward)
    base = float(batch_loss(model(x), y))
    signs = (1.0,) if settings.scheme == "forward" else (1.0, -1.0)
    deltas = np.empty(settings.k, dtype=np.float64)
    rows_buffer = torch.empty(chunk, space.dim, dtype=torch.float32)
    for start in range(0, settings.k, chunk):
        stop = min(start + chunk, settings.k)
        directions = generator.block(start, stop, out=rows_buffer)
        steps = torch.cat([s * settings.sigma * directions for s in signs])
        weights = {}
        for name, idx, part in zip(batched_names, space.indices, space.split(steps)):
            rows = params[name].reshape(1, -1).repeat(steps.shape[0], 1)
            if idx is None:
                rows += part
            else:
                rows[:, idx] += part
            weights[name] = rows.reshape(steps.shape[0], *params[name].shape)
        losses = batch_loss(vectorised(weights), y).numpy()
        count = stop - start
        reference = base if settings.scheme == "forward" else losses[count:]
        deltas[start:stop] = losses[:count] - reference
    return LossDifferences(deltas.astype(np.float32), base, settings.forward_passes)
