"""Client side: several zeroth-order steps of local training, replayable by the server."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedzo_flwr.sparse.layout import PackedLayout
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.engines import LossDifferences, StreamModel
from fedzo_flwr.zo.estimator import loss_differences
from fedzo_flwr.zo.reconstruct import ScalarStep, estimate_gradient, local_sgd_step
from fedzo_flwr.zo.settings import ZOSettings

BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def run_local_steps(
    model: nn.Module,
    space: KeptSpace | PackedLayout,
    batch_for_step: BatchFn,
    step_seeds: Sequence[int],
    settings: ZOSettings,
    local_lr: float,
    engine: str = "lean",
    chunk_size: int | None = None,
    memory_budget_mb: float | None = None,
    micro_batch: int = 0,
) -> tuple[list[ScalarStep], list[LossDifferences]]:
    """Take one zeroth-order step per seed and return the ``(seed, deltas)`` of each.

    Between steps the model moves by local SGD, ``θ ← θ - η ĝ_j``, with ``ĝ_j`` rebuilt from the
    step's own scalars by :func:`~fedzo_flwr.zo.reconstruct.estimate_gradient` — exactly what the
    server's :func:`~fedzo_flwr.zo.reconstruct.replay` does, so the trajectory is reproducible
    from the uploaded scalars alone. The last step's update is not applied (the server computes
    it); with one seed the model is left unchanged.

    A :class:`~fedzo_flwr.zo.engines.stream_model.StreamModel` (``engine="stream"``, sparse at
    rest) takes the same steps on its kept-value vector in place
    (:meth:`~fedzo_flwr.zo.engines.stream_model.StreamModel.sgd_step_`, the same bits): no dense
    tensor and no second copy of the kept values.

    Parameters
    ----------
    model : nn.Module
        The masked model (or a StreamModel), modified in place between steps.
    space : KeptSpace or PackedLayout
        Trainable, unpruned coordinates (a PackedLayout only with a StreamModel).
    batch_for_step : callable
        ``batch_for_step(j) -> (x, y)``: the mini-batch of step ``j``.
    step_seeds : sequence of int
        One seed per local step.
    settings : ZOSettings
        Estimator settings.
    local_lr : float
        Local SGD learning rate η (unused with a single step).
    engine, chunk_size, memory_budget_mb, micro_batch
        Passed to :func:`~fedzo_flwr.zo.estimator.loss_differences`.
    """
    if len(step_seeds) == 0:
        raise ValueError("step_seeds must hold at least one seed")
    steps: list[ScalarStep] = []
    results: list[LossDifferences] = []
    theta = None  # a dense model's kept values between steps (a StreamModel holds its own)
    if not isinstance(model, StreamModel):
        if not isinstance(space, KeptSpace):
            raise TypeError(f"a dense model needs a KeptSpace, got {type(space).__name__}")
        theta = space.gather(model) if len(step_seeds) > 1 else None
    for j, seed in enumerate(step_seeds):
        x, y = batch_for_step(j)
        result = loss_differences(
            model,
            space,
            x,
            y,
            seed,
            settings,
            engine,
            chunk_size,
            memory_budget_mb=memory_budget_mb,
            micro_batch=micro_batch,
        )
        step = ScalarStep(int(seed), result.deltas)
        steps.append(step)
        results.append(result)
        if j == len(step_seeds) - 1:
            break
        grad = estimate_gradient(space.sizes, step, settings)
        if isinstance(model, StreamModel):
            model.sgd_step_(grad, local_lr)  # in place on the kept values
        elif theta is not None and isinstance(space, KeptSpace):
            theta = local_sgd_step(theta, grad, local_lr)
            space.scatter_(model, theta)
        del grad
    return steps, results
