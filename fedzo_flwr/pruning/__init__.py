"""Foresight pruners and the ``prune`` entry point.

=============  ==========  ==========================================================
method         needs data  what it does
=============  ==========  ==========================================================
``ntk``        no          data-free NTK-SAP on the server (:func:`ntk_sap_mask`)
``ntk-local``  yes         federated NTK-SAP on client inputs (:func:`local_ntk_mask`)
``snip``       yes         SNIP, ``|g ⊙ w|`` of the cross-entropy (:func:`snip_mask`)
``synflow``    no          SynFlow, iterative, data-free (:func:`synflow_mask`)
``magnitude``  no          global ``|w|`` at initialisation (:func:`magnitude_mask`)
``random``     no          uniform random global scores (:func:`random_mask`)
=============  ==========  ==========================================================

Every mask returned by :func:`prune` passes :func:`~fedzo_flwr.sparse.mask.validate_mask`, keeps
exactly ``kept_target(density, n)`` weights and leaves no prunable tensor empty; the model's
weights are never modified.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import nn

from fedzo_flwr.logs import get_logger
from fedzo_flwr.pruning.baselines import (
    magnitude_mask,
    random_mask,
    snip_gradients,
    snip_mask,
    synflow_mask,
)
from fedzo_flwr.pruning.client import client_ntk_gradients, local_ntk_mask
from fedzo_flwr.pruning.common import check_result
from fedzo_flwr.pruning.ntk_sap import (
    GaussianInputs,
    NTKSAPConfig,
    gaussian_inputs,
    ntk_mask_gradients,
    ntk_sap_mask,
    ntk_sap_scores,
    scoring_seed,
)
from fedzo_flwr.seeding import derive_seed
from fedzo_flwr.sparse.mask import (
    Mask,
    check_density,
    dense_mask,
    kept_target,
    layer_densities,
    total_count,
)

__all__ = [
    "DATA_FREE_PRUNERS",
    "PRUNERS",
    "GaussianInputs",
    "NTKSAPConfig",
    "client_ntk_gradients",
    "derive_seed",
    "gaussian_inputs",
    "local_ntk_mask",
    "magnitude_mask",
    "ntk_mask_gradients",
    "ntk_sap_mask",
    "ntk_sap_scores",
    "prune",
    "random_mask",
    "scoring_seed",
    "snip_gradients",
    "snip_mask",
    "synflow_mask",
]

logger = get_logger(__name__)

PRUNERS: tuple[str, ...] = ("ntk", "ntk-local", "snip", "synflow", "magnitude", "random")
DATA_FREE_PRUNERS: frozenset[str] = frozenset({"ntk", "synflow", "magnitude", "random"})


def prune(
    method: str,
    model: nn.Module,
    model_name: str,
    density: float,
    *,
    seed: int = 0,
    data_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    client_batches: Sequence[Iterable[torch.Tensor]] | None = None,
    client_weights: Sequence[float] | None = None,
    ntk_config: NTKSAPConfig | None = None,
) -> Mask:
    """Compute a pruning mask for ``model`` with ``method`` at ``density``.

    Parameters
    ----------
    method : str
        One of :data:`PRUNERS`.
    model : nn.Module
        Model at its initial weights θ0; never modified.
    model_name : str
        Registry name of ``model`` (NTK methods redraw weights with its initialiser).
    density : float
        Kept fraction in (0, 1]; 1 returns the dense mask.
    seed : int
        Seed of the random draws (``ntk``, ``ntk-local``, ``random``).
    data_batches : iterable of (x, y), optional
        Labelled data for ``snip``; for ``ntk-local`` it is used as a single client when
        ``client_batches`` is None. Data-free methods never receive it.
    client_batches : sequence of iterables, optional
        Per-client input batches for ``ntk-local``.
    client_weights : sequence of float, optional
        Client weights ``p_c`` for ``ntk-local`` (default uniform).
    ntk_config : NTKSAPConfig, optional
        NTK-SAP settings (``ntk``, ``ntk-local``); its ``input_shape`` is also SynFlow's input.

    Returns
    -------
    Mask
        Valid mask with exactly ``kept_target(density, n)`` kept weights, no empty tensor.

    Raises
    ------
    ValueError
        Unknown method (the message lists :data:`PRUNERS`), density outside (0, 1], or a
        data-needing method called without data.

    """
    if not isinstance(method, str) or method not in PRUNERS:
        raise ValueError(f"unknown prune_method {method!r}; valid methods: {', '.join(PRUNERS)}")
    density = check_density(density)
    config = NTKSAPConfig() if ntk_config is None else ntk_config
    if method == "snip" and data_batches is None:
        raise ValueError("prune_method 'snip' needs data: pass data_batches of (x, y)")
    if method == "ntk-local":
        if client_batches is None and data_batches is not None:
            # The NTK scorer takes (x, y) pairs as well as inputs (it ignores y).
            client_batches = [cast(Iterable[torch.Tensor], data_batches)]
        if client_batches is None:
            raise ValueError(
                "prune_method 'ntk-local' needs data: pass client_batches (one iterable of input "
                "batches per client) or data_batches; use 'ntk' for the data-free pruner"
            )
    if method in DATA_FREE_PRUNERS and (data_batches is not None or client_batches is not None):
        logger.info("prune_method %r is data-free: the data passed is not used", method)
    n_prunable = total_count(dense_mask(model))
    if kept_target(density, n_prunable) == n_prunable:
        mask = dense_mask(model)
    elif method == "ntk":
        mask = ntk_sap_mask(model, model_name, density, config, seed)
    elif method == "ntk-local":
        assert client_batches is not None  # checked above
        mask = local_ntk_mask(
            model, model_name, density, client_batches, client_weights, config, seed
        )
    elif method == "snip":
        mask = snip_mask(model, density, data_batches)
    elif method == "synflow":
        mask = synflow_mask(model, density, input_shape=config.input_shape)
    elif method == "magnitude":
        mask = magnitude_mask(model, density)
    else:
        mask = random_mask(model, density, seed)
    check_result(model, mask, density, method)
    logger.info(
        "prune %s at density %.6f: layer densities %s",
        method,
        density,
        {n: round(d, 6) for n, d in layer_densities(mask).items()},
    )
    return mask
