"""One client-round of progressive block training, without Flower.

The client holds the whole model but trains only stage ``t``'s tensors (block ``t`` and output
module ``t``; block and head at the last stage) with backprop: the frozen prefix runs under
``torch.no_grad()``, so it keeps no activations, gradients or optimizer state. The mini-batches
are those a FedAvg client of the same partition draws in the same round
(:func:`~fedzo_flwr.fedavg.client.local_batch_indices` seeded with
:func:`~fedzo_flwr.seeding.fedavg_batches_seed`), so the two methods see the same data order.
The optimizer is SGD with momentum 0.9 and weight decay 5e-4 by default [code] (ProFL's released
settings), created fresh every round (stateless clients).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import batch_tensors, check_dataset_name
from fedzo_flwr.errors import ConfigError
from fedzo_flwr.fedavg.client import (
    BackpropRound,
    BackpropSteps,
    backprop_steps,
    local_batch_indices,
)
from fedzo_flwr.measure.memory import PeakMemory
from fedzo_flwr.progressive.staged import StagedModel
from fedzo_flwr.seeding import fedavg_batches_seed

__all__ = [
    "StageTrainResult",
    "StageTrainSettings",
    "stage_batches",
    "stage_optimizer",
    "stage_result",
    "train_stage",
]


@dataclass(frozen=True)
class StageTrainSettings:
    """Local training settings of a progressive client (run-config keys in parentheses).

    Attributes
    ----------
    local_epochs : int
        Epochs over the partition per round (``local-epochs``); ignored if ``local_batches``.
    local_batches : int
        If > 0, exactly this many mini-batches per round (``local-batches``).
    batch_size : int
        Mini-batch size (``batch-size``).
    lr, momentum, weight_decay : float
        SGD settings (``local-lr``, ``momentum``, ``weight-decay``).
    dataset : str
        Normalisation statistics of the images (``dataset``).

    """

    local_epochs: int = 1
    local_batches: int = 0
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dataset: str = "cifar10"

    def __post_init__(self) -> None:
        """Validate every field; the error names the run-config key."""
        for key, value, low in (
            ("local-epochs", self.local_epochs, 1),
            ("local-batches", self.local_batches, 0),
            ("batch-size", self.batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{key} must be an int >= {low}, got {value!r}")
        for key, number, positive in (
            ("local-lr", self.lr, True),
            ("momentum", self.momentum, False),
            ("weight-decay", self.weight_decay, False),
        ):
            bad = isinstance(number, bool) or not isinstance(number, (int, float))
            if bad or not math.isfinite(number) or number < 0 or (positive and number == 0):
                raise ConfigError(
                    f"{key} must be a finite number >= 0 (> 0 for lr), got {number!r}"
                )
        if self.momentum >= 1:
            raise ConfigError(f"momentum must be < 1, got {self.momentum!r}")
        try:
            check_dataset_name(self.dataset)
        except ValueError as exc:
            raise ConfigError(f"dataset: {exc}") from None


@dataclass(frozen=True)
class StageTrainResult(BackpropRound):
    """A progressive client's contribution to one round and what it cost.

    The counts, loss, time and memory of :class:`~fedzo_flwr.fedavg.client.BackpropRound`, and:

    Attributes
    ----------
    stage : int
        The stage trained.
    tensors : dict of str to Tensor
        Stage ``stage``'s trained tensors by name (:meth:`StagedModel.stage_parameters`).

    """

    stage: int
    tensors: dict[str, torch.Tensor]


def stage_batches(
    settings: StageTrainSettings, num_examples: int, seed_of_round: int, partition_id: int
) -> list[np.ndarray]:
    """The round's mini-batches as index arrays: a FedAvg client's batches for the same round."""
    cfg = RunConfig(
        batch_size=settings.batch_size,
        local_epochs=settings.local_epochs,
        local_batches=settings.local_batches,
    )
    return local_batch_indices(cfg, num_examples, fedavg_batches_seed(seed_of_round, partition_id))


def stage_optimizer(
    settings: StageTrainSettings, params: list[torch.nn.Parameter]
) -> torch.optim.SGD:
    """A fresh SGD optimizer over ``params`` with the settings' lr, momentum and weight decay."""
    return torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def stage_result(
    stage: int,
    tensors: dict[str, torch.Tensor],
    num_examples: int,
    run: BackpropSteps,
    seconds: float,
    memory: PeakMemory,
) -> StageTrainResult:
    """The result of one client-round of ``stage``: its tensors, the loop's counts, cost."""
    return StageTrainResult(
        stage=stage,
        tensors=tensors,
        num_examples=num_examples,
        train_examples=run.train_examples,
        steps=run.steps,
        train_loss=run.train_loss,
        seconds=seconds,
        peak_mem_bytes=memory.peak_bytes,
        extra_mem_bytes=memory.extra_bytes,
    )


def train_stage(
    staged: StagedModel,
    stage: int,
    x_uint8: np.ndarray,
    y: np.ndarray,
    settings: StageTrainSettings,
    seed_of_round: int,
    partition_id: int,
) -> StageTrainResult:
    """Run one client-round of stage ``stage`` on ``staged`` (its tensors change in place).

    Parameters
    ----------
    staged : StagedModel
        The staged model holding the received global tensors.
    stage : int
        The active stage.
    x_uint8, y : np.ndarray
        The client's partition: (N, 32, 32, 3) uint8 images and (N,) labels.
    settings : StageTrainSettings
        Local epochs or batches, batch size and SGD settings.
    seed_of_round, partition_id : int
        Select the mini-batch order (:func:`stage_batches`).

    Returns
    -------
    StageTrainResult
        The trained stage tensors (only those), counts, loss, time and memory.

    """
    if len(x_uint8) != len(y):
        raise ValueError(f"{len(x_uint8)} images but {len(y)} labels")
    batches = stage_batches(settings, len(y), seed_of_round, partition_id)

    def loss_of(idx: np.ndarray) -> torch.Tensor:
        x, target = batch_tensors(x_uint8, y, idx, settings.dataset)
        return F.cross_entropy(staged.forward_stage(x, stage), target)

    start = time.perf_counter()
    with PeakMemory() as memory:
        trainable = staged.prepare_stage(stage)
        optimizer = stage_optimizer(settings, list(trainable.values()))
        run = backprop_steps(optimizer, batches, loss_of, set_to_none=True)
        del optimizer
        tensors = staged.stage_tensors(stage)
    seconds = time.perf_counter() - start
    for param in trainable.values():
        param.grad = None
    return stage_result(stage, tensors, len(y), run, seconds, memory)
