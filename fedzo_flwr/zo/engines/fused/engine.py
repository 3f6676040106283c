"""The ``fused`` engine's step: plan, chunking, workers, and the cache of models it cannot run."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np
import torch
from torch import nn

from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.engines.base import LossDifferences, LossFn, batch_loss
from fedzo_flwr.zo.engines.fused.plan import FusedPlan, Measured, get_plan
from fedzo_flwr.zo.engines.fused.schedule import balanced_chunks, chunk_for_budget, run_chunks
from fedzo_flwr.zo.engines.fused.stacked import CHANNELS_LAST, UnsupportedModel
from fedzo_flwr.zo.engines.fused.weights import ChunkWeights, Layout
from fedzo_flwr.zo.settings import ZOSettings

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "FAILURE_CACHE_SIZE",
    "fused_engine",
    "fused_loss_differences",
    "model_kind",
    "planned_chunk",
]

DEFAULT_MEMORY_BUDGET_MB = 32.0
"""Default ceiling (MiB) on the chunk's working set: weights, directions and activations."""

FAILURE_CACHE_SIZE = 32
"""Model kinds remembered as untranslatable (least recently seen forgotten first)."""

_FAILURES: OrderedDict[Hashable, str] = OrderedDict()


def model_kind(model: nn.Module, space: KeptSpace, x: torch.Tensor) -> Hashable:
    """What decides whether the fused forward can run ``model`` on batches like ``x``.

    The model's class, its parameters and buffers (names, shapes, dtypes), the train/eval mode
    of its modules, the perturbed parameters and the shape and dtype of one example. Two model
    objects of the same kind translate alike: a simulation that builds a new model every round
    traces an untranslatable model once, not once per step.
    """
    return (
        type(model),
        tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()),
        tuple((n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()),
        tuple(m.training for m in model.modules()),
        tuple(space.names),
        tuple(x.shape[1:]),
        x.dtype,
    )


def _checked_plan(
    model: nn.Module, space: KeptSpace, x: torch.Tensor
) -> tuple[FusedPlan, Measured]:
    """The verified plan of ``model`` for ``x``; a known failure is raised without retracing."""
    kind = model_kind(model, space, x)
    reason = _FAILURES.get(kind)
    if reason is not None:
        _FAILURES.move_to_end(kind)
        raise UnsupportedModel(reason, repeated=True)
    try:
        if x.dtype != torch.float32:
            raise UnsupportedModel("the fused engine supports float32 inputs only")
        plan = get_plan(model, space)
        return plan, plan.verify(model, space, x)
    except UnsupportedModel as err:
        _FAILURES[kind] = str(err)
        if len(_FAILURES) > FAILURE_CACHE_SIZE:
            _FAILURES.popitem(last=False)
        raise


def _per_row_bytes(measured: Measured, layout: Layout, dim: int, batch: int) -> float:
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

    ``workers`` (default 1) chunks run at once on their own threads; the memory budget is
    shared by them. This function never changes torch's thread settings: the caller owns
    them. One worker runs its kernels on the caller's intra-op threads; each of several
    workers on the intra-op threads torch gives a new thread (the process's
    ``torch.set_num_threads`` value), so ``n`` single-threaded workers are
    ``torch.set_num_threads(1)`` and ``workers=n``. The result does not depend on which worker
    evaluates a chunk.

    Raises
    ------
    UnsupportedModel
        If the model cannot be translated (the caller falls back to another engine). A model
        kind (:func:`model_kind`) that failed once fails again at once, without a new trace,
        with ``repeated=True``.
    """
    plan, _ = _checked_plan(model, space, x)
    workers = 1 if workers is None else workers
    if chunk_size is None:
        chunk_size = planned_chunk(model, space, x, settings, memory_budget_mb, workers)
    bounds = balanced_chunks(settings.k, chunk_size, workers)
    chunk = max(stop - start for start, stop in bounds)
    signs = (1.0,) if settings.scheme == "forward" else (1.0, -1.0)

    base = float(loss_fn(model(x), y))
    xin = x.contiguous(memory_format=CHANNELS_LAST) if x.dim() == 4 else x
    layout = plan.layout(space)
    kept = space.gather(model)
    deltas = np.empty(settings.k, dtype=np.float64)
    workers = max(1, min(workers, len(bounds)))

    def work(take: Callable[[], tuple[int, int] | None]) -> None:
        gen = (
            generator
            if workers == 1
            else DirectionGenerator(generator.sizes, generator.seed, generator.kind)
        )
        blocks = layout.new_blocks(chunk * len(signs))
        directions = torch.empty(chunk, space.dim, dtype=torch.float32)
        while (item := take()) is not None:
            start, stop = item
            count = stop - start
            dirs = gen.block(start, stop, out=directions, threads=1 if workers > 1 else None)
            weights = ChunkWeights(layout, blocks, kept, dirs, settings.sigma, signs)
            losses = loss_fn(plan.forward(xin, weights), y).numpy()
            reference = base if len(signs) == 1 else losses[count:]
            deltas[start:stop] = losses[:count] - reference

    run_chunks(bounds, workers, work)
    return deltas, base, chunk


def fused_engine(
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
    """:func:`fused_loss_differences` with :func:`~fedzo_flwr.zo.engines.base.batch_loss`."""
    del micro_batch  # the whole batch in every pass
    deltas, base, _ = fused_loss_differences(
        model, space, x, y, generator, settings, batch_loss, chunk_size, memory_budget_mb
    )
    return LossDifferences(deltas.astype(np.float32), base, settings.forward_passes)
