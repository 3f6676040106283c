"""The client's side of a round, without Flower: weights and seeds in, loss differences out.

A dense client holds the model with its pruned weights at zero and a
:class:`~fedzo_flwr.sparse.space.KeptSpace`; a ``stream`` client holds a
:class:`~fedzo_flwr.zo.engines.stream_model.StreamModel` built by :func:`stream_model` straight
from the mask message (kept values and packed bitmaps: no dense weights, no bool mask).
"""

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
from fedzo_flwr.models import build_skeleton
from fedzo_flwr.protocol.wire import split_mask
from fedzo_flwr.seeding import batch_seed, client_step_seeds
from fedzo_flwr.sparse.layout import PackedLayout
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.engines import StreamModel
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


def stream_model(model_name: str, num_classes: int, mask_bytes: bytes) -> StreamModel:
    """The model of a ``stream`` client, from the mask message alone: sparse at rest.

    The model's structure is built on the ``meta`` device (no storage), the mask bitmap is cut
    into per-tensor bitmaps without unpacking (:func:`~fedzo_flwr.protocol.wire.split_mask`), and
    the kept values start at zero: load the received weights with
    :meth:`~fedzo_flwr.zo.engines.stream_model.StreamModel.load_values_`. No dense weight tensor,
    bool mask or index table is ever allocated.

    Raises
    ------
    ValueError
        If ``mask_bytes`` is not a valid bitmap for the model (length, padding bits).
    UnsupportedModel
        If the stream engine cannot run the model (the caller falls back to a dense model).
    """
    skeleton = build_skeleton(model_name, num_classes)
    layout = PackedLayout.from_bitmaps(skeleton, split_mask(mask_bytes, skeleton))
    return StreamModel(skeleton, layout)


def train_round(
    cfg: RunConfig,
    model: nn.Module,
    space: KeptSpace | PackedLayout,
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
        The global model as received (masked, or a StreamModel holding the received kept
        values); modified only between local steps.
    space : KeptSpace or PackedLayout
        Kept coordinates of ``model`` (a PackedLayout: a StreamModel's ``layout``).
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
