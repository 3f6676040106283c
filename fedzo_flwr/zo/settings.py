"""Validated settings of the zeroth-order estimator and server optimizer, from a run config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedzo_flwr.config import RunConfig
from fedzo_flwr.zo.directions import check_kind
from fedzo_flwr.zo.server_optimizer import OptimizerSettings

FDScheme = Literal["forward", "central"]
FD_SCHEMES: tuple[str, ...] = ("forward", "central")


def step_forward_passes(k: int, scheme: str) -> int:
    """Forward passes every engine runs for one step of ``k`` directions.

    ``forward``: the base point ``w`` and the ``k`` points ``w + σu_k`` (``k + 1``);
    ``central``: ``w ± σu_k`` (``2k``) plus the base point, evaluated for the logged base loss
    (``2k + 1``).
    """
    if scheme == "forward":
        return k + 1
    if scheme == "central":
        return 2 * k + 1
    raise ValueError(f"scheme must be one of {', '.join(FD_SCHEMES)}; got {scheme!r}")


@dataclass(frozen=True)
class ZOSettings:
    """How loss differences are taken and turned into a gradient estimate.

    Parameters
    ----------
    k : int
        Number of perturbation directions per step (K >= 1).
    sigma : float
        Perturbation scale (> 0).
    scheme : {"forward", "central"}
        ``forward``: ``L(w+σu) - L(w)`` (K+1 forward passes); ``central``:
        ``L(w+σu) - L(w-σu)`` (2K+1 forward passes with the logged base loss, O(σ²) bias
        instead of O(σ)).
    directions : {"gaussian", "rademacher"}
        Distribution of the directions (see :mod:`fedzo_flwr.zo.directions`).
    """

    k: int
    sigma: float
    scheme: FDScheme = "forward"
    directions: str = "gaussian"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise TypeError(f"k must be an int, got {type(self.k).__name__}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)):
            raise TypeError(f"sigma must be a number, got {type(self.sigma).__name__}")
        if not (self.sigma > 0) or math.isinf(self.sigma):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma}")
        if self.scheme not in FD_SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(FD_SCHEMES)}; got {self.scheme!r}")
        check_kind(self.directions)

    @property
    def forward_passes(self) -> int:
        """Forward passes per step, the base pass included: :func:`step_forward_passes`."""
        return step_forward_passes(self.k, self.scheme)

    @property
    def difference_scale(self) -> float:
        """Divisor turning a loss difference into a directional derivative: σ or 2σ."""
        return self.sigma if self.scheme == "forward" else 2.0 * self.sigma


def zo_settings(cfg: RunConfig) -> ZOSettings:
    """Estimator settings of a run."""
    return ZOSettings(k=cfg.k, sigma=cfg.sigma, scheme=cfg.fd, directions=cfg.directions)


def optimizer_settings(cfg: RunConfig) -> OptimizerSettings:
    """Server optimizer settings of a run."""
    return OptimizerSettings(
        name=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.weight_decay,
        clip=cfg.clip,
        clip_scope=cfg.clip_scope,
        ema_decay=cfg.ema,
        warmup_rounds=cfg.warmup_rounds,
        lr_schedule=cfg.lr_schedule,
        total_steps=cfg.schedule_rounds,
    )
