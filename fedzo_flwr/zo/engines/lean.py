"""The ``lean`` engine: the model perturbed in place, one direction at a time.

Each kept value is saved once and restored by copy after every perturbation (bit-exact, no
drift). Extra memory: one copy of the kept weights, one direction and one forward pass's
activations — for the smallest boards.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.engines.base import LossDifferences, batch_loss
from fedzo_flwr.zo.settings import ZOSettings

__all__ = ["lean_engine"]


def lean_engine(
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
    """The K loss differences, one direction at a time (``chunk_size``, budget: unused)."""
    del micro_batch, chunk_size, memory_budget_mb  # one direction at a time; nothing to size
    # Extra memory: the saved kept values, one direction (freed before the forward pass of a
    # forward difference) and the activations of one forward pass.
    saved = space.gather(model)

    def loss() -> float:
        return float(batch_loss(model(x), y))

    base = loss()
    deltas = np.empty(settings.k, dtype=np.float64)
    sigma = settings.sigma
    for k in range(settings.k):
        direction = generator.direction(k)
        reference = base
        if settings.scheme == "central":
            space.add_(model, direction, alpha=-sigma)
            reference = loss()
            space.scatter_(model, saved)  # restore by copy: bit-exact, no drift
        space.add_(model, direction, alpha=sigma)
        del direction
        deltas[k] = loss() - reference
        space.scatter_(model, saved)
    return LossDifferences(deltas.astype(np.float32), base, settings.forward_passes)
