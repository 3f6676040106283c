"""Server-side optimizer over the kept coordinates: SGD, momentum, Adam, clipping, EMA, schedule.

The learning rate of step ``t`` (1-based, counting optimizer steps, i.e. rounds that produced an
update) is :meth:`OptimizerSettings.lr_at`: a linear warm-up over the first ``warmup_rounds``
steps, then constant or a cosine decay (``torch.optim.lr_scheduler.CosineAnnealingLR``'s curve:
the full ``lr`` at the first post-warm-up step, towards 0 at step ``total_steps``, so no round is
spent at lr 0). It is a function of the step
count alone, which checkpoints and replaying nodes keep, so a resumed run and a replaying node
take the very same steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

OptimizerName = Literal["sgd", "momentum", "adam"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam")
CLIP_NORMS: tuple[str, ...] = ("inf", "l2")
CLIP_SCOPES: tuple[str, ...] = ("round", "client")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


@dataclass(frozen=True)
class OptimizerSettings:
    """Server optimizer settings.

    Parameters
    ----------
    name : {"sgd", "momentum", "adam"}
        Update rule.
    lr : float
        Learning rate (> 0).
    momentum : float
        Momentum coefficient for ``"momentum"``.
    betas : tuple of float
        Adam's (β1, β2); BAFFLE uses (0.9, 0.99).
    weight_decay : float
        L2 penalty added to the gradient (kept coordinates only).
    clip : float
        If > 0, rescale each gradient estimate so its ``clip_norm`` norm is at most ``clip``
        (BAFFLE: inf-norm 0.3). 0 disables clipping.
    clip_norm : {"inf", "l2"}
        Norm used by ``clip``.
    clip_scope : {"round", "client"}
        ``round``: :meth:`ServerOptimizer.step` clips the round's aggregated estimate.
        ``client``: each client's estimate is clipped before aggregation (BAFFLE), by
        :func:`fedzo_flwr.zo.replay.round_gradient` with :attr:`group_clip`; the optimizer
        then does not clip again.
    ema_decay : float
        If > 0, keep an exponential moving average of the weights with this decay, updated each
        step, and evaluate with it. 0 disables the EMA.
    warmup_rounds : int
        Linear warm-up: step ``t <= warmup_rounds`` uses ``lr * t / warmup_rounds``. 0: none.
    lr_schedule : {"constant", "cosine"}
        After the warm-up: ``lr`` throughout, or ``lr * (1 + cos(pi * p)) / 2`` with
        ``p = (t - warmup_rounds - 1) / (total_steps - warmup_rounds)`` the fraction of the
        post-warm-up steps done *before* step ``t`` (as ``CosineAnnealingLR`` with
        ``T_max = total_steps - warmup_rounds``): the full ``lr`` at the first post-warm-up
        step, a small positive lr at step ``total_steps``, 0 beyond it.
    total_steps : int
        The cosine schedule's horizon (the run's rounds); unused by ``constant``.
    """

    name: OptimizerName = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    clip: float = 0.0
    clip_norm: str = "inf"
    clip_scope: str = "round"
    ema_decay: float = 0.0
    warmup_rounds: int = 0
    lr_schedule: str = "constant"
    total_steps: int = 0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.name!r}")
        if not (self.lr > 0) or math.isinf(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip < 0:
            raise ValueError(f"clip must be >= 0 (0 disables it), got {self.clip}")
        if self.clip_norm not in CLIP_NORMS:
            raise ValueError(
                f"clip_norm must be one of {', '.join(CLIP_NORMS)}; got {self.clip_norm!r}"
            )
        if self.clip_scope not in CLIP_SCOPES:
            raise ValueError(
                f"clip_scope must be one of {', '.join(CLIP_SCOPES)}; got {self.clip_scope!r}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 disables it), got {self.ema_decay}")
        if self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {self.warmup_rounds}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}"
            )
        if self.lr_schedule == "cosine" and self.total_steps <= self.warmup_rounds:
            raise ValueError(
                f"a cosine schedule needs total_steps ({self.total_steps}) > warmup_rounds "
                f"({self.warmup_rounds})"
            )

    @property
    def round_clip(self) -> float:
        """The clip the optimizer applies to the aggregated estimate (0: none)."""
        return self.clip if self.clip_scope == "round" else 0.0

    @property
    def group_clip(self) -> float:
        """The clip applied to each client's estimate before aggregation (0: none)."""
        return self.clip if self.clip_scope == "client" else 0.0

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (1-based): warm-up, then the schedule."""
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        if step <= self.warmup_rounds:
            return self.lr * step / self.warmup_rounds
        if self.lr_schedule == "constant":
            return self.lr
        done = step - self.warmup_rounds - 1  # post-warm-up steps taken before this one
        progress = min(1.0, done / (self.total_steps - self.warmup_rounds))
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_(grad: torch.Tensor, max_norm: float, norm: str = "inf") -> torch.Tensor:
    """Rescale ``grad`` in place so that its ``norm`` norm is at most ``max_norm``."""
    if max_norm <= 0:
        return grad
    value = float(grad.abs().max()) if norm == "inf" else float(torch.linalg.vector_norm(grad))
    if value > max_norm:
        grad.mul_(max_norm / value)
    return grad


class ServerOptimizer:
    """Steps a flat vector of kept coordinates with a PyTorch optimizer.

    Pruned coordinates are not in the vector, so no update (momentum, Adam moments, weight
    decay) can ever reach them.

    Parameters
    ----------
    theta : Tensor
        Initial kept values, shape ``(dim,)``.
    settings : OptimizerSettings
        Update rule and its hyper-parameters.
    """

    def __init__(self, theta: torch.Tensor, settings: OptimizerSettings) -> None:
        self.settings = settings
        self.theta = torch.nn.Parameter(theta.detach().clone().to(torch.float32))
        self.optimizer: torch.optim.Optimizer
        if settings.name == "adam":
            self.optimizer = torch.optim.Adam(
                [self.theta],
                lr=settings.lr,
                betas=settings.betas,
                weight_decay=settings.weight_decay,
                foreach=False,
            )
        else:
            self.optimizer = torch.optim.SGD(
                [self.theta],
                lr=settings.lr,
                momentum=settings.momentum if settings.name == "momentum" else 0.0,
                weight_decay=settings.weight_decay,
                foreach=False,
            )
        self.ema: torch.Tensor | None = (
            self.theta.detach().clone() if settings.ema_decay > 0 else None
        )
        self.steps = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        """Apply one update with gradient estimate ``grad`` (clipped first if configured).

        The step's learning rate is ``settings.lr_at(steps + 1)``.
        """
        if grad.shape != self.theta.shape:
            raise ValueError(
                f"grad has shape {tuple(grad.shape)}, expected {tuple(self.theta.shape)}"
            )
        grad = clip_(
            grad.detach().clone().to(torch.float32),
            self.settings.round_clip,
            self.settings.clip_norm,
        )
        self.theta.grad = grad
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr_at(self.steps + 1)
        self.optimizer.step()
        self.theta.grad = None
        if self.ema is not None:
            self.ema.lerp_(self.theta.detach(), 1.0 - self.settings.ema_decay)
        self.steps += 1

    @property
    def weights(self) -> torch.Tensor:
        """Current kept values (a detached view; clone before modifying)."""
        return self.theta.detach()

    @property
    def eval_weights(self) -> torch.Tensor:
        """Weights to evaluate and ship: the EMA if enabled, else the current weights."""
        return self.ema if self.ema is not None else self.weights

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: weights, optimizer state, EMA and step count."""
        return {
            "theta": self.theta.detach().clone(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "ema": None if self.ema is None else self.ema.clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        theta = state["theta"]
        if theta.shape != self.theta.shape:
            raise ValueError(
                f"checkpoint has {theta.numel()} kept coordinates, "
                f"this model has {self.theta.numel()}"
            )
        with torch.no_grad():
            self.theta.copy_(theta)
        # load_state_dict may alias the given tensors: copy so two optimizers never share state.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError("checkpoint and settings disagree on whether an EMA is kept")
        if self.ema is not None:
            self.ema.copy_(state["ema"])
        self.steps = int(state["steps"])
