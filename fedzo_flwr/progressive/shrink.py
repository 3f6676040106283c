"""One client-round of ProFL's shrinking phase (our reconstruction), without Flower.

ProFL's "model shrinking" runs back to front and builds the output modules before the blocks
are grown [paper]; its released code distils each replaced block's logits with an MSE loss at
learning rate 1e-5 [code]. Our reconstruction, kept as simple as the sources allow: at shrink
step ``t`` the **teacher** is step ``t + 1``'s model (blocks ``0..t+1`` and output module
``t+1``, or the head when ``t + 1`` is the last stage) and the **student** is blocks ``0..t``
and output module ``t``; only output module ``t`` trains, on ``MSE(student, teacher)`` logits,
with SGD (``profl-shrink-lr``, momentum, weight decay). Blocks and teacher run under
``torch.no_grad()``. The mini-batches are those of a FedAvg client of the same round
(:func:`~fedzo_flwr.progressive.client.stage_batches`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn import functional as F

from fedzo_flwr.data import to_tensor
from fedzo_flwr.fedavg.client import backprop_steps
from fedzo_flwr.measure.memory import PeakMemory
from fedzo_flwr.progressive.client import (
    StageTrainResult,
    StageTrainSettings,
    stage_batches,
    stage_optimizer,
    stage_result,
)
from fedzo_flwr.progressive.staged import OUTPUT_PREFIX, StagedModel

__all__ = ["distil_output_module"]


def distil_output_module(
    staged: StagedModel,
    stage: int,
    x_uint8: np.ndarray,
    y: np.ndarray,
    settings: StageTrainSettings,
    seed_of_round: int,
    partition_id: int,
) -> StageTrainResult:
    """Train output module ``stage`` to imitate stage ``stage + 1``'s logits (see module doc).

    Returns the trained output-module tensors (``output.<stage>.<name>``); ``train_loss`` is
    the mean MSE over the round's steps (before each step).
    """
    if not 0 <= stage < staged.num_stages - 1:
        raise ValueError(f"shrink stage must be in [0, {staged.num_stages - 1}), got {stage}")
    if len(x_uint8) != len(y):
        raise ValueError(f"{len(x_uint8)} images but {len(y)} labels")
    batches = stage_batches(settings, len(y), seed_of_round, partition_id)
    module = staged.output_modules[stage]

    def loss_of(idx: np.ndarray) -> torch.Tensor:
        x = to_tensor(x_uint8[idx], settings.dataset)
        with torch.no_grad():
            teacher = staged.forward_stage(x, stage + 1)
            features = staged.blocks[stage](staged.features(x, stage))
        return F.mse_loss(module(features), teacher)

    start = time.perf_counter()
    with PeakMemory() as memory:
        for param in staged.parameters():
            param.requires_grad_(False)
        trainable = list(module.parameters())
        for param in trainable:
            param.requires_grad_(True)
        optimizer = stage_optimizer(settings, trainable)
        run = backprop_steps(optimizer, batches, loss_of, set_to_none=True)
        del optimizer
        prefix = f"{OUTPUT_PREFIX}{stage}."
        tensors = {prefix + n: p.detach().clone() for n, p in module.named_parameters()}
    seconds = time.perf_counter() - start
    for param in trainable:
        param.grad = None
    return stage_result(stage, tensors, len(y), run, seconds, memory)
