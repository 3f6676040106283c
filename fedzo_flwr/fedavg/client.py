"""The FedAvg baseline's client side, without Flower: local backprop SGD on a masked model.

``method = "fedavg"`` trains with ordinary first-order local SGD (McMahan et al., 2017): each
sampled client receives the global model's kept coordinates, runs ``local-epochs`` epochs over
its partition (or exactly ``local-batches`` mini-batches when that is > 0) with the client
optimizer (``client-optimizer``: plain SGD, SGD with ``momentum``, or Adam; ``local-lr``,
``weight-decay``), and returns its kept coordinates. The server averages them weighted by
examples (Flower's own ``FedAvg.aggregate_train``).

With a mask (``density`` < 1, any ``prune-method``) the pruned weights stay **exactly 0**:
their gradients are multiplied by the mask before every optimizer step (so the SGD momentum
and Adam moments of pruned entries stay 0 as well) and the mask is re-applied after it. With
density 1 this is dense FedAvg. Optimizer state is created fresh every round (stateless
clients), as in FedAvg.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import batch_tensors
from fedzo_flwr.errors import DataError
from fedzo_flwr.measure.memory import PeakMemory
from fedzo_flwr.seeding import fedavg_batches_seed
from fedzo_flwr.sparse.mask import Mask, apply_mask_
from fedzo_flwr.sparse.space import KeptSpace

__all__ = [
    "BackpropResult",
    "BackpropRound",
    "BackpropSteps",
    "backprop_steps",
    "client_optimizer",
    "local_batch_indices",
    "mask_gradients_",
    "train_round_backprop",
]


@dataclass(frozen=True)
class BackpropRound:
    """The counts and cost of one client-round of local backprop training (any method).

    Attributes
    ----------
    num_examples : int
        Size of the client's partition (the aggregation weight).
    train_examples : int
        Examples processed by forward + backward passes (for the FLOPs count).
    steps : int
        Optimizer steps taken.
    train_loss : float
        Mean mini-batch loss over the round's steps (before each step).
    seconds, peak_mem_bytes, extra_mem_bytes
        Wall time, peak RSS and peak RSS above the entry RSS of the local training.
    """

    num_examples: int
    train_examples: int
    steps: int
    train_loss: float
    seconds: float
    peak_mem_bytes: int
    extra_mem_bytes: int


@dataclass(frozen=True)
class BackpropResult(BackpropRound):
    """A FedAvg client's contribution to one round and what it cost.

    Attributes
    ----------
    weights : Tensor
        The client's kept coordinates after local training (float32, ``space.dim``).
    """

    weights: torch.Tensor


def local_batch_indices(cfg: RunConfig, num_examples: int, seed: int) -> list[np.ndarray]:
    """The mini-batches of one client-round as index arrays (reproducible from ``seed``).

    ``local-batches`` > 0: exactly that many batches of ``batch-size`` drawn from successive
    random permutations of the partition; otherwise ``local-epochs`` permutations, each cut
    into batches of ``batch-size`` (the last one of an epoch may be smaller).
    """
    if num_examples < 1:
        raise DataError("a client needs at least one example")
    rng = np.random.default_rng(seed)
    size = min(cfg.batch_size, num_examples)
    if cfg.local_batches:
        batches: list[np.ndarray] = []
        order = rng.permutation(num_examples)
        cursor = 0
        while len(batches) < cfg.local_batches:
            if cursor + size > num_examples:
                order, cursor = rng.permutation(num_examples), 0
            batches.append(order[cursor : cursor + size])
            cursor += size
        return batches
    batches = []
    for _ in range(cfg.local_epochs):
        order = rng.permutation(num_examples)
        batches.extend(order[i : i + size] for i in range(0, num_examples, size))
    return batches


def client_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """A fresh optimizer for one round of local training (``client-optimizer``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.client_optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.local_lr, weight_decay=cfg.weight_decay)
    momentum = cfg.momentum if cfg.client_optimizer == "momentum" else 0.0
    return torch.optim.SGD(
        params, lr=cfg.local_lr, momentum=momentum, weight_decay=cfg.weight_decay
    )


@torch.no_grad()
def mask_gradients_(model: nn.Module, mask: Mask) -> None:
    """Zero the gradients of pruned weights in place (kept entries untouched)."""
    for name, param in model.named_parameters():
        keep = mask.get(name)
        if keep is not None and param.grad is not None:
            param.grad.mul_(keep.to(param.grad.dtype))


@dataclass(frozen=True)
class BackpropSteps:
    """What a loop of local backprop steps did (:func:`backprop_steps`).

    Attributes
    ----------
    train_examples : int
        Examples processed by forward + backward passes.
    steps : int
        Optimizer steps taken (one per mini-batch).
    train_loss : float
        Mean mini-batch loss over the steps (each before its step).
    """

    train_examples: int
    steps: int
    train_loss: float


def backprop_steps(
    optimizer: torch.optim.Optimizer,
    batches: Sequence[np.ndarray],
    loss_of: Callable[[np.ndarray], torch.Tensor],
    *,
    set_to_none: bool,
    after_backward: Callable[[], object] | None = None,
    after_step: Callable[[], object] | None = None,
) -> BackpropSteps:
    """One optimizer step per mini-batch of ``batches``, gradients enabled.

    Each step: ``optimizer.zero_grad(set_to_none=set_to_none)``, the loss ``loss_of(idx)``,
    its backward pass, ``after_backward()`` (e.g. masking the gradients), ``optimizer.step()``
    and ``after_step()`` (e.g. re-applying the mask). The FedAvg, progressive and ProFL-shrink
    clients all train with this loop.
    """
    losses: list[float] = []
    seen = 0
    with torch.enable_grad():
        for idx in batches:
            optimizer.zero_grad(set_to_none=set_to_none)
            loss = loss_of(idx)
            torch.autograd.backward(loss)
            if after_backward is not None:
                after_backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
            seen += len(idx)
    return BackpropSteps(train_examples=seen, steps=len(batches), train_loss=float(np.mean(losses)))


def train_round_backprop(
    cfg: RunConfig,
    model: nn.Module,
    space: KeptSpace,
    x_uint8: np.ndarray,
    y: np.ndarray,
    seed_of_round: int,
    partition_id: int,
) -> BackpropResult:
    """Run one FedAvg client-round of local backprop SGD on ``model`` (modified in place).

    Parameters
    ----------
    cfg : RunConfig
        Run configuration (batch size, local epochs/batches, client optimizer, lr...).
    model : nn.Module
        The global model as received (pruned weights already 0).
    space : KeptSpace
        Kept coordinates of ``model``; its mask is enforced throughout.
    x_uint8, y : np.ndarray
        The client's partition.
    seed_of_round : int
        The round's seed (selects the client's mini-batch order with ``partition_id``).
    partition_id : int
        This client's partition.
    """
    mask = space.mask
    batches = local_batch_indices(cfg, len(y), fedavg_batches_seed(seed_of_round, partition_id))

    def loss_of(idx: np.ndarray) -> torch.Tensor:
        x, target = batch_tensors(x_uint8, y, idx, cfg.dataset)
        return F.cross_entropy(model(x), target)

    start = time.perf_counter()
    with PeakMemory() as memory:
        optimizer = client_optimizer(cfg, model)
        run = backprop_steps(
            optimizer,
            batches,
            loss_of,
            set_to_none=False,
            after_backward=lambda: mask_gradients_(model, mask),
            after_step=lambda: apply_mask_(model, mask),
        )
        weights = space.gather(model)
        del optimizer
    seconds = time.perf_counter() - start
    for param in model.parameters():
        param.grad = None
    return BackpropResult(
        weights=weights,
        num_examples=len(y),
        train_examples=run.train_examples,
        steps=run.steps,
        train_loss=run.train_loss,
        seconds=seconds,
        peak_mem_bytes=memory.peak_bytes,
        extra_mem_bytes=memory.extra_bytes,
    )
