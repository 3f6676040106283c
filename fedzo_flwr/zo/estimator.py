"""Client side: forward-only loss differences along regenerated directions.

The client never runs autograd. For each direction ``u_k`` of the round seed it evaluates the
mini-batch loss at ``w + σu_k`` (and ``w`` or ``w - σu_k``) and returns only the K loss
differences. Two engines compute the same numbers:

* ``lean``: perturbs the model in place, one direction at a time, and restores the saved kept
  values by copy (bit-exact, no drift). Extra memory: one copy of the kept weights, one direction
  and one forward pass's activations — for the smallest boards.
* ``batched``: evaluates ``chunk_size`` perturbed copies in one vectorised forward pass
  (``torch.func.functional_call`` + ``vmap``); the model is never modified. Memory grows with
  the chunk; on CPU it is slower than ``lean`` (kept as a generic reference).
* ``fused``: the fastest. The model's forward pass is rewritten (via :mod:`torch.fx`) so that a
  chunk of perturbed copies runs as one wide first layer, grouped convolutions and batched
  matrix products (see :mod:`fedzo_flwr.zo.fast_engine`). The chunk is derived from
  ``memory_budget_mb`` unless ``chunk_size`` is given; with ``torch.get_num_threads()`` = n > 1,
  n chunks run at once on n single-threaded workers. A model it cannot translate falls back to
  ``lean`` with a warning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo import fast_engine
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.settings import ZOSettings

ENGINES: tuple[str, ...] = ("lean", "batched", "fused")
DEFAULT_CHUNK_SIZE = 16
"""Directions per vectorised pass of the ``batched`` engine when ``chunk_size`` is not given."""

logger = logging.getLogger(__name__)


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
        Forward passes spent, including the base one.
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


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"x and y must hold the same non-zero number of examples, got "
            f"{x.shape[0]} and {y.shape[0]}"
        )


@torch.no_grad()
def loss_differences(
    model: nn.Module,
    space: KeptSpace,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    settings: ZOSettings,
    engine: str = "lean",
    chunk_size: int | None = None,
    *,
    memory_budget_mb: float | None = None,
) -> LossDifferences:
    """Loss differences of ``model`` on batch ``(x, y)`` along the K directions of ``seed``.

    Parameters
    ----------
    model : nn.Module
        The (masked) model, in eval mode; its pruned weights must be zero.
    space : KeptSpace
        The coordinates to perturb (kept weights and other trainable parameters).
    x, y : Tensor
        One mini-batch; the same batch is used for all passes.
    seed : int
        Round/step seed; direction ``k`` is regenerated from ``(seed, k)``.
    settings : ZOSettings
        K, σ, difference scheme and direction distribution.
    engine : {"lean", "batched", "fused"}
        See the module docstring.
    chunk_size : int, optional
        Directions per vectorised forward pass (``batched``: default
        :data:`DEFAULT_CHUNK_SIZE`; ``fused``: default derived from ``memory_budget_mb``).
        Ignored by ``lean``.
    memory_budget_mb : float, optional
        ``fused`` only: ceiling (MiB) on the working set of one chunk (weight copies,
        directions, activations) from which the chunk is derived when ``chunk_size`` is not
        given; default :data:`fedzo_flwr.zo.fast_engine.DEFAULT_MEMORY_BUDGET_MB`.

    Returns
    -------
    LossDifferences
        The K float32 differences and the base loss. The model's weights are bit-identical to
        what they were before the call.
    """
    _check_batch(x, y)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if memory_budget_mb is not None and (
        isinstance(memory_budget_mb, bool)
        or not isinstance(memory_budget_mb, (int, float))
        or not math.isfinite(memory_budget_mb)
        or memory_budget_mb <= 0
    ):
        raise ValueError(
            f"memory_budget_mb must be a finite number > 0 or None, got {memory_budget_mb!r}"
        )
    generator = DirectionGenerator(space.dim, seed, settings.directions)
    if engine == "fused":
        try:
            deltas, base, _ = fast_engine.fused_loss_differences(
                model, space, x, y, generator, settings, batch_loss, chunk_size, memory_budget_mb
            )
        except fast_engine.UnsupportedModel as err:
            logger.warning("fused engine unavailable (%s); using the lean engine", err)
        else:
            return LossDifferences(
                deltas.astype(np.float32),
                base,
                settings.forward_passes + (1 if settings.scheme == "central" else 0),
            )
    if engine == "batched":
        chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
        return _batched(model, space, x, y, generator, settings, chunk)
    return _lean(model, space, x, y, generator, settings)


def _lean(
    model: nn.Module,
    space: KeptSpace,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: DirectionGenerator,
    settings: ZOSettings,
) -> LossDifferences:
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
    return LossDifferences(
        deltas.astype(np.float32),
        base,
        settings.forward_passes + (1 if settings.scheme == "central" else 0),
    )


def _batched(
    model: nn.Module,
    space: KeptSpace,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: DirectionGenerator,
    settings: ZOSettings,
    chunk_size: int,
) -> LossDifferences:
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    batched_names = space.names
    fixed = {n: t for n, t in {**params, **buffers}.items() if n not in set(batched_names)}

    def forward(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, {**fixed, **weights}, (x,))

    vectorised = vmap(forward)
    base = float(batch_loss(model(x), y))
    signs = (1.0,) if settings.scheme == "forward" else (1.0, -1.0)
    deltas = np.empty(settings.k, dtype=np.float64)
    rows_buffer = torch.empty(chunk_size, space.dim, dtype=torch.float32)
    for start in range(0, settings.k, chunk_size):
        stop = min(start + chunk_size, settings.k)
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
    return LossDifferences(
        deltas.astype(np.float32),
        base,
        settings.forward_passes + (1 if settings.scheme == "central" else 0),
    )
