"""Client side: forward-only loss differences along regenerated directions.

The client never runs autograd. For each direction ``u_k`` of the round seed it evaluates the
mini-batch loss at ``w + σu_k`` (and ``w`` or ``w - σu_k``) and returns only the K loss
differences. Four engines compute the same numbers (:mod:`fedzo_flwr.zo.engines`, looked up
by name in :data:`~fedzo_flwr.zo.engines.ENGINES`):

* ``stream``: materialises each layer's perturbed weights in one scratch buffer while that
  layer runs (the stored weights are never written), draws each direction layer by layer and
  can evaluate the batch in micro-batches (``micro_batch``). Extra memory: the largest layer's
  weights and one forward pass of a micro-batch — the least (see
  :mod:`fedzo_flwr.zo.engines.stream`). The only engine that runs a
  :class:`~fedzo_flwr.zo.engines.stream_model.StreamModel` (a model sparse at rest, with its
  :class:`~fedzo_flwr.sparse.layout.PackedLayout` as the space).
* ``lean``: perturbs the model in place, one direction at a time, and restores the saved kept
  values by copy (bit-exact, no drift). Extra memory: one copy of the kept weights, one direction
  and one forward pass's activations. Runs any model.
* ``batched``: evaluates ``chunk_size`` perturbed copies in one vectorised forward pass
  (``torch.func.functional_call`` + ``vmap``); the model is never modified. Memory grows with
  the chunk; on CPU it is slower than ``lean`` (kept as a generic reference).
* ``fused``: the fastest. The model's forward pass is rewritten (via :mod:`torch.fx`) so that a
  chunk of perturbed copies runs as one wide first layer, grouped convolutions and batched
  matrix products (see :mod:`fedzo_flwr.zo.engines.fused`). The chunk is derived from
  ``memory_budget_mb`` unless ``chunk_size`` is given; chunks run one after another on the
  caller's torch threads. A model it cannot translate falls back to ``lean`` with a warning,
  logged once per model kind.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from fedzo_flwr.sparse.layout import PackedLayout
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.engines import (
    ENGINES,
    FALLBACK_ENGINE,
    LossDifferences,
    StreamModel,
    UnsupportedModel,
    batch_loss,
)
from fedzo_flwr.zo.settings import ZOSettings

__all__ = ["ENGINES", "LossDifferences", "batch_loss", "loss_differences"]

logger = logging.getLogger(__name__)


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
    space: KeptSpace | PackedLayout,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    settings: ZOSettings,
    engine: str = "lean",
    chunk_size: int | None = None,
    *,
    memory_budget_mb: float | None = None,
    micro_batch: int = 0,
) -> LossDifferences:
    """Loss differences of ``model`` on batch ``(x, y)`` along the K directions of ``seed``.

    Parameters
    ----------
    model : nn.Module
        The (masked) model, in eval mode; its pruned weights must be zero. A
        :class:`~fedzo_flwr.zo.engines.stream_model.StreamModel` runs the ``stream`` engine only.
    space : KeptSpace or PackedLayout
        The coordinates to perturb (kept weights and other trainable parameters): a PackedLayout
        (or a KeptSpace of the same layout) for a StreamModel, a KeptSpace otherwise.
    x, y : Tensor
        One mini-batch; the same batch is used for all passes.
    seed : int
        Round/step seed; direction ``k`` is regenerated from ``(seed, k)``.
    settings : ZOSettings
        K, σ, difference scheme and direction distribution.
    engine : {"lean", "batched", "fused", "stream"}
        See the module docstring.
    chunk_size : int, optional
        Directions per vectorised forward pass (``batched``: default
        :data:`~fedzo_flwr.zo.engines.batched.DEFAULT_CHUNK_SIZE`; ``fused``: default derived
        from ``memory_budget_mb``). Ignored by ``lean``.
    memory_budget_mb : float, optional
        ``fused`` only: ceiling (MiB) on the working set of one chunk (weight copies,
        directions, activations) from which the chunk is derived when ``chunk_size`` is not
        given; default :data:`fedzo_flwr.zo.engines.fused.DEFAULT_MEMORY_BUDGET_MB`.
    micro_batch : int
        ``stream`` only: examples per forward pass (0: the whole batch); the loss is the same
        mean (:func:`~fedzo_flwr.zo.engines.stream.micro_batch_loss`).

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
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 0:
        raise ValueError(f"micro_batch must be an int >= 0, got {micro_batch!r}")
    generator = DirectionGenerator(space.sizes, seed, settings.directions)
    if isinstance(model, StreamModel):  # sparse at rest: no dense weights to hand another engine
        if engine != "stream":
            raise ValueError(f"a StreamModel runs the stream engine only, not {engine!r}")
        if tuple(space.sizes) != model.sizes:
            raise ValueError("space does not match the StreamModel's layout")
        return model.loss_differences(x, y, generator, settings, micro_batch)
    if not isinstance(space, KeptSpace):
        raise TypeError(f"a dense model needs a KeptSpace, got {type(space).__name__}")

    def run(name: str) -> LossDifferences:
        return ENGINES[name](
            model,
            space,
            x,
            y,
            generator,
            settings,
            chunk_size=chunk_size,
            memory_budget_mb=memory_budget_mb,
            micro_batch=micro_batch,
        )

    try:
        return run(engine)
    except UnsupportedModel as err:
        log = logger.debug if err.repeated else logger.warning
        log("%s engine unavailable (%s); using the %s engine", engine, err, FALLBACK_ENGINE)
    return run(FALLBACK_ENGINE)
