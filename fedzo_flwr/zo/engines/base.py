"""What every engine takes and returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.settings import ZOSettings

__all__ = ["Engine", "LossDifferences", "LossFn", "batch_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits (..., B, C), targets (B,))``: the losses of the leading shape, float64."""


@dataclass(frozen=True)
class LossDifferences:
    """What one client step produces.

    Attributes
    ----------
    deltas : np.ndarray
        float32, shape (K,): ``L(w+σu_k) - L(w)`` (forward) or ``L(w+σu_k) - L(w-σu_k)``.
    base_loss : float
        ``L(w)`` on the batch (computed for logging in both schemes).
    forward_passes : int
        Forward passes spent, including the base one
        (:attr:`~fedzo_flwr.zo.settings.ZOSettings.forward_passes`).
    """

    deltas: np.ndarray
    base_loss: float
    forward_passes: int


def batch_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the last-but-one axis, accumulated in float64.

    ``logits`` is ``(..., B, C)``; the result has the leading shape ``(...)``. Summing the
    per-example losses in float64 keeps the tiny differences (~σ|∇L·u|) above rounding noise.
    """
    lead = logits.shape[:-2]
    flat = logits.reshape(-1, logits.shape[-1])
    per_example = F.cross_entropy(
        flat, targets.repeat(flat.shape[0] // targets.shape[0]), reduction="none"
    )
    return per_example.to(torch.float64).reshape(*lead, -1).mean(dim=-1)


class Engine(Protocol):
    """One engine: the K loss differences of a step, the model left bit-identical.

    ``chunk_size``, ``memory_budget_mb`` and ``micro_batch`` (examples per forward pass, 0 =
    the whole batch) are validated by the caller; an engine that has no use for them ignores
    them (only ``stream`` micro-batches). An engine that cannot run a model raises
    :class:`~fedzo_flwr.zo.engines.fused.UnsupportedModel` (the caller falls back to ``lean``).
    """

    def __call__(
        self,
        model: nn.Module,
        space: KeptSpace,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: DirectionGenerator,
        settings: ZOSettings,
        *,
        chunk_size: int | None,
        memory_budget_mb: float | None,
        micro_batch: int = 0,
    ) -> LossDifferences: ...
