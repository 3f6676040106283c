"""Data-dependent foresight pruning done federatedly, without Flower: the two halves.

``snip`` and ``ntk-local`` score weights on **client** data, and the server never reads client
data. So the server runs a pruning phase before round 1 (``server_app/federated_pruning.py``
carries it over Flower messages):

1. for each iteration ``t = 1..T`` (``T = prune-iterations`` for ``ntk-local``, 1 for ``snip``)
   the server sends every node the current mask, ``t`` and a scoring seed (``snip``: also the
   initial weights θ0, whose gradients it scores);
2. each client computes its **signed** mask gradients ``G_c`` on ``prune-samples`` examples of
   its partition (:func:`client_prune_gradients`) and uploads them as float32 bytes
   (``4 · n_w`` bytes);
3. the server forms ``S = |Σ_c p_c G_c| · [m = 1]`` with ``p_c`` proportional to the clients'
   example counts (:func:`aggregate_scores`) and keeps the global top ``kept_target(d_t, n)``
   with ``d_t = d^(t/T)`` (:func:`fedzo_flwr.pruning.common.iterative_prune`; SNIP is one-shot).

``ntk-local`` is exactly :func:`fedzo_flwr.pruning.federated.federated_ntk_mask` with client
``c`` scoring its own batch with seed ``scoring_seed(seed, c, t)``; ``snip`` is SNIP
(:func:`fedzo_flwr.pruning.snip_mask`) with the per-client gradients of the mean cross-entropy
added with weights ``p_c`` before ``|·|``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import sample_batch, to_tensor
from fedzo_flwr.protocol.wire import decode_scalars, encode_scalars
from fedzo_flwr.pruning import NTKSAPConfig, client_ntk_gradients, scoring_seed
from fedzo_flwr.pruning.common import float_mask, mask_gradient, masked_forward, working_copy
from fedzo_flwr.pruning.ntk_sap import scores_from_gradients
from fedzo_flwr.seeding import prune_batch_seed, pruning_seed
from fedzo_flwr.sparse.mask import Mask, prunable_parameters

__all__ = [
    "DATA_PRUNERS",
    "GRADIENTS_KEY",
    "ITERATION_KEY",
    "PRUNE_ACTION",
    "PRUNE_KEY",
    "SCORING_SEED_KEY",
    "WEIGHTS_KEY",
    "aggregate_scores",
    "client_prune_gradients",
    "decode_gradients",
    "encode_gradients",
    "needs_client_data",
    "ntk_config",
    "prune_batch",
    "prune_iterations",
    "prune_seed",
    "scoring_seed_for",
    "snip_gradients",
]

#: Pruners that score on client data (run as a federated phase before round 1).
DATA_PRUNERS: frozenset[str] = frozenset({"ntk-local", "snip"})

# Wire keys of the phase (Flower-free strings, shared by the ServerApp and the ClientApp).
#: The ClientApp handles message type ``query.prune`` (``@app.query(PRUNE_ACTION)``).
PRUNE_ACTION = "prune"
PRUNE_KEY = "prune"  # ConfigRecord in both directions
WEIGHTS_KEY = "weights"  # ArrayRecord with θ0 (snip only)
ITERATION_KEY = "iteration"
SCORING_SEED_KEY = "scoring-seed"
GRADIENTS_KEY = "gradients"  # float32 bytes, 4 · n_w


def needs_client_data(cfg: RunConfig) -> bool:
    """Whether the run prunes with a data-dependent pruner (a federated pruning phase)."""
    return cfg.pruned and cfg.prune_method in DATA_PRUNERS


def prune_iterations(cfg: RunConfig) -> int:
    """Scoring iterations of the phase: ``prune-iterations`` for ``ntk-local``, 1 for ``snip``."""
    return cfg.prune_iterations if cfg.prune_method == "ntk-local" else 1


def prune_seed(cfg: RunConfig) -> int:
    """Base seed of the pruning draws (the same one the data-free pruners use)."""
    return pruning_seed(cfg.seed)


def ntk_config(cfg: RunConfig) -> NTKSAPConfig:
    """NTK-SAP settings of the run (``prune-iterations``, ``prune-repeats``)."""
    return NTKSAPConfig.for_run(cfg)


def scoring_seed_for(cfg: RunConfig, stream: int, iteration: int) -> int:
    """The seed the server assigns to client ``stream`` at ``iteration`` (ntk-local draws)."""
    return scoring_seed(prune_seed(cfg), stream, iteration)


def prune_batch(
    cfg: RunConfig, x_uint8: np.ndarray, y: np.ndarray, partition_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``prune-samples`` examples a client scores on (fixed for the whole phase)."""
    idx = np.sort(
        sample_batch(len(y), cfg.prune_samples, prune_batch_seed(prune_seed(cfg), partition_id))
    )
    return to_tensor(x_uint8[idx], cfg.dataset), torch.as_tensor(y[idx], dtype=torch.long)


def snip_gradients(
    model: nn.Module, mask: Mask, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Signed SNIP mask gradients ``∂L/∂m`` at ``mask`` (= ``w ⊙ ∂L/∂w``), ``L`` = mean CE.

    ``model`` holds the weights to score (θ0); it is not modified.
    """
    work = working_copy(model)
    params = {k: v.detach() for k, v in work.named_parameters()}
    dtype = next(p for _, p in prunable_parameters(work)).dtype
    m = float_mask(mask, dtype)
    loss = F.cross_entropy(masked_forward(work, params, m, x.to(dtype)), y)
    return mask_gradient(loss, m)


def client_prune_gradients(
    cfg: RunConfig,
    model: nn.Module,
    mask: Mask,
    x_uint8: np.ndarray,
    y: np.ndarray,
    partition_id: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """A client's share of one scoring iteration: signed mask gradients on its own data.

    Parameters
    ----------
    cfg : RunConfig
        ``prune-method`` (``ntk-local`` or ``snip``), ``prune-samples``, ``prune-repeats``.
    model : nn.Module
        The architecture; for ``snip`` it must hold θ0 (SNIP scores the initial weights).
    mask : Mask
        The current global mask (dense for ``snip``).
    x_uint8, y : np.ndarray
        The client's partition.
    partition_id : int
        Selects which examples are scored.
    seed : int
        Scoring seed assigned by the server (``ntk-local``'s weight draws; unused by ``snip``).
    """
    x, target = prune_batch(cfg, x_uint8, y, partition_id)
    if cfg.prune_method == "snip":
        return snip_gradients(model, mask, x, target)
    if cfg.prune_method == "ntk-local":
        return client_ntk_gradients(model, cfg.model, mask, [x], ntk_config(cfg), seed)
    raise ValueError(f"prune_method {cfg.prune_method!r} does not score on client data")


def encode_gradients(grads: dict[str, torch.Tensor], mask: Mask) -> bytes:
    """Signed gradients as little-endian float32 bytes, tensors in mask order."""
    return encode_scalars(torch.cat([grads[n].reshape(-1).to(torch.float32) for n in mask]))


def decode_gradients(data: bytes, mask: Mask) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_gradients` (checks the length: ``4 · n_w`` bytes)."""
    total = sum(m.numel() for m in mask.values())
    flat = torch.from_numpy(decode_scalars(data, expected_count=total))
    out, offset = {}, 0
    for name, m in mask.items():
        out[name] = flat[offset : offset + m.numel()].reshape(m.shape)
        offset += m.numel()
    if not all(bool(torch.isfinite(g).all()) for g in out.values()):
        raise ValueError("gradients contain NaN or inf")
    return out


def aggregate_scores(
    grads: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], mask: Mask
) -> dict[str, torch.Tensor]:
    """``|Σ_c p_c G_c| · [m = 1]`` with ``p_c = weights_c / Σ weights`` (summed in order)."""
    if not grads or len(grads) != len(weights):
        raise ValueError(f"need one weight per client, got {len(grads)} and {len(weights)}")
    total_weight = float(sum(weights))
    if total_weight <= 0:
        raise ValueError("client weights must not all be zero")
    total: dict[str, torch.Tensor] | None = None
    for g, w in zip(grads, weights):
        p = float(w) / total_weight
        if total is None:
            total = {n: p * g[n] for n in mask}
        else:
            for n in mask:
                total[n] += p * g[n]
    assert total is not None
    return scores_from_gradients(total, mask)
