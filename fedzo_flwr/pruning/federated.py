"""Federated form of NTK-SAP: clients score, the server sums signed mask gradients.

At every iteration ``t`` of the exponential schedule, client ``c`` computes the signed NTK-SAP
mask gradient ``G_c`` on its own input batches (:func:`client_ntk_gradients`, the same scoring
loop as the data-free pruner) with weight draws from a server-assigned seed
(:func:`~fedzo_flwr.pruning.ntk_sap.scoring_seed` ``(seed, c, t)``). The server forms
``S = |Σ_c p_c G_c| · [m = 1]`` and keeps the global top ``kept_target(d_t, n)``.

This is our reconstruction (method note (a), "Federated form"): the NTK trace over the union
of client data is the sum of local traces, so local scores add; with data-dependent inputs the
cross-client terms are dropped. Upload per client and iteration: ``4 · n_w`` bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fedzo_flwr.pruning.common import check_result, iterative_prune, reject_batchnorm
from fedzo_flwr.pruning.ntk_sap import (
    NTKSAPConfig,
    gaussian_inputs,
    model_reinit,
    ntk_mask_gradients,
    scores_from_gradients,
    scoring_seed,
)
from fedzo_flwr.sparse.mask import Mask

__all__ = ["client_ntk_gradients", "federated_ntk_mask", "normalise_weights"]


def normalise_weights(weights: Sequence[float] | None, num_clients: int) -> list[float]:
    """Client weights ``p_c`` normalised to sum 1 (uniform when ``weights`` is None).

    Raises
    ------
    ValueError
        If the length differs from ``num_clients``, a weight is negative or not finite, or all
        weights are zero.

    """
    if num_clients < 1:
        raise ValueError("federated NTK pruning needs at least one client")
    if weights is None:
        return [1.0 / num_clients] * num_clients
    values = [float(w) for w in weights]
    if len(values) != num_clients:
        raise ValueError(f"weights has {len(values)} entries for {num_clients} clients")
    if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {values}")
    total = sum(values)
    return [w / total for w in values]


def client_ntk_gradients(
    model: nn.Module,
    model_name: str,
    mask: Mask,
    batches: Iterable[torch.Tensor],
    config: NTKSAPConfig,
    seed: int,
) -> dict[str, torch.Tensor]:
    """A client's share of one federated NTK-SAP iteration: its signed mask gradients.

    Parameters
    ----------
    model : nn.Module
        Model at θ0 (never modified); with ``config.reinit == "weights"`` its biases and
        normalisation parameters are used as they are, so every client must hold the same θ0.
    model_name : str
        Registry name (initialiser of the weight draws).
    mask : Mask
        Current global mask, broadcast by the server.
    batches : iterable of Tensor
        The client's input batches (or ``(x, y)`` pairs); re-iterable, ``config.repeats`` passes.
    config : NTKSAPConfig
        ``epsilon``, ``repeats`` and ``reinit`` are used (batch layout comes from ``batches``).
    seed : int
        Server-assigned seed of the weight draws and perturbations for this client and iteration.

    Returns
    -------
    dict of str to Tensor
        Signed gradient sums (what the client uploads).

    """
    return ntk_mask_gradients(
        model,
        mask,
        batches,
        reinit=model_reinit(model_name, config.reinit),
        generator=torch.Generator().manual_seed(seed),
        epsilon=config.epsilon,
        passes=config.repeats,
    )


def federated_ntk_mask(
    model: nn.Module,
    model_name: str,
    density: float,
    client_batches: Sequence[Iterable[torch.Tensor]] | None,
    weights: Sequence[float] | None = None,
    config: NTKSAPConfig | None = None,
    seed: int = 0,
) -> Mask:
    """NTK-SAP mask from client-side scoring, aggregated as ``|Σ_c p_c G_c|``.

    Parameters
    ----------
    model : nn.Module
        Model to prune (at θ0); not modified.
    model_name : str
        Registry name (initialiser of the weight draws).
    density : float
        Final kept fraction in (0, 1]; exact count ``kept_target(density, n)``.
    client_batches : sequence of iterables of Tensor, or None
        One re-iterable of input batches per client (e.g. its DataLoader; ``(x, y)`` pairs are
        accepted and ``y`` ignored). ``None``: data-free federated mode, where client ``c``
        scores on the Gaussian stream :func:`~fedzo_flwr.pruning.ntk_sap.gaussian_inputs`
        ``(config, seed, c)`` and the number of clients is ``len(weights)``.
    weights : sequence of float, optional
        ``p_c`` (e.g. local sample counts); normalised to sum 1; default uniform.
    config : NTKSAPConfig, optional
        ``epsilon``, ``repeats``, ``iterations``, ``reinit`` (and the Gaussian layout when
        ``client_batches`` is None).
    seed : int
        Base seed; client ``c`` scores iteration ``t`` with ``scoring_seed(seed, c, t)``.

    Returns
    -------
    Mask
        Bool mask; no prunable tensor is empty.

    Notes
    -----
    With one client whose batches are ``gaussian_inputs(config, seed, 0)``, the result equals
    :func:`~fedzo_flwr.pruning.ntk_sap.ntk_sap_mask` ``(..., config, seed)`` exactly.

    """
    config = NTKSAPConfig() if config is None else config
    model_reinit(model_name)  # fail early on an unknown model name
    reject_batchnorm(model, "NTK-SAP")
    if client_batches is None:
        if weights is None:
            raise ValueError(
                "client_batches is None (data-free federated mode): pass weights to give the "
                "number of clients"
            )
        inputs: list[Iterable[torch.Tensor]] = [
            gaussian_inputs(config, seed, stream=c) for c in range(len(weights))
        ]
    else:
        inputs = list(client_batches)
    p = normalise_weights(weights, len(inputs))

    def score_fn(mask: Mask, t: int) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] | None = None
        for c, batches in enumerate(inputs):
            if p[c] == 0.0:
                continue  # contributes nothing; a real server would not even sample it
            g = client_ntk_gradients(
                model, model_name, mask, batches, config, scoring_seed(seed, c, t)
            )
            if total is None:
                total = {n: p[c] * v for n, v in g.items()}
            else:
                for n, v in g.items():
                    total[n] += p[c] * v
        assert total is not None
        return scores_from_gradients(total, mask)

    mask = iterative_prune(
        model, density, config.iterations, score_fn, method="NTK-SAP (federated)"
    )
    return check_result(model, mask, density, "NTK-SAP (federated)")
