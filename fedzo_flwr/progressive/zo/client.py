"""The client's side of a ``zo-progressive`` round: the prefix once, K perturbed active passes.

For each mini-batch the client runs the frozen prefix (blocks ``0..t-1``) **once**, under
``torch.no_grad()``, and hands its output to the zeroth-order engine as the input of the active
module (block ``t`` and its output module, :class:`~.active.ActiveStage`). The engine evaluates
the K (+1) perturbed forward passes through the active module only; the prefix's output is the
same for all of them, so caching it changes nothing but the cost. What travels is what every
zeroth-order method uploads: one :class:`~fedzo_flwr.zo.reconstruct.ScalarStep` of K loss
differences per local step, for the step seeds of
:func:`~fedzo_flwr.seeding.client_step_seeds`, on the mini-batches a ``zo-pruned`` client of the
same partition draws (:func:`~fedzo_flwr.seeding.batch_seed`).
"""

from __future__ import annotations

import numpy as np
import torch

from fedzo_flwr.config import RunConfig
from fedzo_flwr.progressive.zo.active import ActiveStage
from fedzo_flwr.zo.client import ClientResult, train_round
from fedzo_flwr.zo.engines import LossDifferences
from fedzo_flwr.zo.estimator import loss_differences
from fedzo_flwr.zo.settings import ZOSettings

__all__ = ["stage_loss_differences", "train_stage_round"]


def stage_loss_differences(
    active: ActiveStage,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    settings: ZOSettings,
    engine: str = "lean",
    chunk_size: int | None = None,
    *,
    memory_budget_mb: float | None = None,
) -> LossDifferences:
    """The K loss differences of stage ``active.stage`` on batch ``(x, y)`` along ``seed``.

    The prefix runs once; the engine (``lean``, ``batched`` or ``fused``, with the arguments of
    :func:`~fedzo_flwr.zo.estimator.loss_differences`) perturbs ``active.space`` only. The
    scalars are those of the staged forward pass ``staged.forward_stage(x, t)`` under the same
    perturbations of the stage's kept coordinates. The weights are bit-identical afterwards.
    """
    return loss_differences(
        active.module,
        active.space,
        active.features(x),
        y,
        seed,
        settings,
        engine,
        chunk_size,
        memory_budget_mb=memory_budget_mb,
    )


def train_stage_round(
    cfg: RunConfig,
    active: ActiveStage,
    x_uint8: np.ndarray,
    y: np.ndarray,
    seed_of_round: int,
    partition_id: int,
) -> ClientResult:
    """Run a client's local zeroth-order steps of stage ``active.stage`` for one round.

    The counterpart of :func:`fedzo_flwr.zo.client.train_round` (same seeds, same batches, same
    local SGD between steps, same :class:`~fedzo_flwr.zo.client.ClientResult`) over the active
    stage's space: it is ``train_round`` on ``active.module`` and ``active.space`` with
    ``features=active.features``, so each step's batch goes through the frozen prefix once.

    Parameters
    ----------
    cfg : RunConfig
        K, σ, scheme, directions, batch size, local steps, engine settings.
    active : ActiveStage
        The stage, over the staged model holding the received weights.
    x_uint8, y : np.ndarray
        The client's partition.
    seed_of_round, partition_id : int
        The broadcast seed and this client's partition.
    """
    if len(x_uint8) != len(y):
        raise ValueError(f"{len(x_uint8)} images but {len(y)} labels")
    return train_round(
        cfg,
        active.module,
        active.space,
        x_uint8,
        y,
        seed_of_round,
        partition_id,
        features=active.features,
    )
