"""Build the starting point of a run from its config: model θ0, pruning mask, data."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from fedzo_flwr import seeding
from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import NUM_CLASSES
from fedzo_flwr.logs import get_logger
from fedzo_flwr.models import build_model
from fedzo_flwr.pruning import NTKSAPConfig, prune
from fedzo_flwr.sparse.mask import Mask, apply_mask_, dense_mask, layer_densities, mask_density

logger = get_logger(__name__)


@dataclass
class InitialModel:
    """The global model at round 0: masked θ0 and its mask."""

    model: nn.Module
    mask: Mask
    prune_seconds: float


def model_seed(cfg: RunConfig) -> int:
    """Seed of θ0 (derived from the run seed)."""
    return seeding.model_seed(cfg.seed)


def build_global_model(cfg: RunConfig) -> nn.Module:
    """The architecture of the run with θ0 drawn from :func:`model_seed` (not yet masked)."""
    return build_model(cfg.model, NUM_CLASSES[cfg.dataset], seed=model_seed(cfg))


def initial_model(cfg: RunConfig) -> InitialModel:
    """Draw θ0 and prune it on the server, data-free, as the run config says.

    ``zo-dense`` (or density 1) returns the dense mask. Data-needing pruners (``snip``,
    ``ntk-local``) are not handled here: the ServerApp runs them as a federated pruning phase
    over Flower messages (``server_app/federated_pruning.py``), so the server never reads
    client data.
    """
    model = build_global_model(cfg)
    start = time.perf_counter()
    if not cfg.pruned:
        mask = dense_mask(model)
    else:
        ntk = NTKSAPConfig.for_run(cfg)
        mask = prune(
            cfg.prune_method,
            model,
            cfg.model,
            cfg.density,
            seed=seeding.pruning_seed(cfg.seed),
            ntk_config=ntk,
        )
    seconds = time.perf_counter() - start
    apply_mask_(model, mask)
    logger.info(
        "Pruned %s with %s to density %.4f in %.1fs; per layer: %s",
        cfg.model,
        cfg.prune_method if cfg.pruned else "none",
        mask_density(mask),
        seconds,
        {k: round(v, 4) for k, v in layer_densities(mask).items()},
    )
    return InitialModel(model, mask, seconds)
