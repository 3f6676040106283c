"""The client's side of a round, without Flower: weights and seeds in, loss differences out."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import batch_tensors, sample_batch
from fedzo_flwr.measure.memory import PeakMemory
from fedzo_flwr.seeding import batch_seed, client_step_seeds
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.local import run_local_steps
from fedzo_flwr.zo.reconstruct import ScalarStep
from fedzo_flwr.zo.settings import zo_settings


@dataclass(frozen=True)
class ClientResult:
    """A client's contribution to one round and what it cost."""

    steps: list[ScalarStep]
    num_examples: int
    base_loss: float
    seconds: float
    peak_mem_bytes: int
    extra_mem_bytes: int


def train_round(
    cfg: RunConfig,
    model: nn.Module,
    space: KeptSpace,
    x_uint8: np.ndarray,
    y: np.ndarray,
    seed_of_round: int,
    partition_id: int,
    *,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ClientResult:
    """Run a client's local zeroth-order steps for one round.

    Parameters
    ----------
    cfg : RunConfig
        Run configuration (K, σ, scheme, batch size, local steps...).
    model : nn.Module
        The global model as received (masked); modified only between local steps.
    space : KeptSpace
        Kept coordinates of ``model``.
    x_uint8, y : np.ndarray
        The client's partition.
    seed_of_round : int
        The seed the server broadcast.
    partition_id : int
        This client's partition (selects its step seeds in per-client mode).
    features : callable, optional
        Applied to each normalised image batch before ``model`` sees it (a progressive
        client's frozen prefix, run once per batch); ``None`` feeds the images themselves.
    """
    seeds = client_step_seeds(seed_of_round, cfg.seed_mode, partition_id, cfg.local_steps)

    def batch_for_step(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = sample_batch(len(y), cfg.batch_size, batch_seed(seeds[j], partition_id))
        x, target = batch_tensors(x_uint8, y, idx, cfg.dataset)
        return (x if features is None else features(x)), target

    start = time.perf_counter()
    with PeakMemory() as memory:
        steps, results = run_local_steps(
            model,
            space,
            batch_for_step,
            seeds,
            zo_settings(cfg),
            cfg.local_lr,
            engine=cfg.engine,
            chunk_size=cfg.chunk_size or None,
            memory_budget_mb=cfg.engine_memory_mb,
            micro_batch=cfg.micro_batch,
        )
    seconds = time.perf_counter() - start
    return ClientResult(
        steps=steps,
        num_examples=len(y),
        base_loss=results[0].base_loss,
        seconds=seconds,
        peak_mem_bytes=memory.peak_bytes,
        extra_mem_bytes=memory.extra_bytes,
    )
