"""The pace controller: decides, from the aggregated parameters alone, when to freeze a block.

Server side and data-free. At the start of a stage the server calls
:meth:`PaceController.begin_stage` with the active block's parameters; after every aggregated
round of that stage it calls :meth:`PaceController.step` with the new parameters, which returns
the round's metric and whether to freeze the block now. Every rule tracks a fixed random sample
of at most ``pace-sample`` (10,000 [code]) coordinates of the active block, drawn once per stage
from ``derive_seed(pace-seed, "progressive/pace-sample", stage)``.

Rules (``pace``):

``effective-movement`` [code] (ProFL)
    ``EM_r = ||θ_r − θ_{r−W}||_1 / Σ_{j=r−W+1..r} ||θ_j − θ_{j−1}||_1`` over the sample, window
    ``W = pace-window`` (6 [code]); in [0, 1] by the triangle inequality: near 1 steady drift,
    near 0 oscillation around a point. Undefined (``None``) until ``W`` rounds are seen; 0
    when nothing moved. A round counts as *settled* when ``EM_r < pace-tau``.
``apf`` (APF, ICDCS 2021, our adaptation to whole blocks)
    per coordinate ``|EMA(Δ)| / EMA(|Δ|)`` with factor ``pace-apf-ema`` (0.99); a coordinate is
    stable below ``pace-apf-threshold`` (0.05). The metric is the stable fraction of the sample
    and a round is settled when it exceeds ``pace-apf-level``. Both EMAs start at 0, so their
    ratio carries no start-up bias.
``fixed``
    freeze after exactly ``stage-rounds`` rounds (one number for every stage, or one per stage);
    the metric reported is the effective movement, for comparison.

For the two adaptive rules the block freezes when ``pace-patience`` consecutive rounds are
settled, never before ``stage-min-rounds`` and always at ``stage-max-rounds``.
:meth:`PaceController.state_dict` holds everything needed to resume bit-exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from fedzo_flwr.errors import CheckpointError, ConfigError
from fedzo_flwr.seeding import derive_seed

__all__ = ["PACE_RULES", "PaceController", "PaceSettings", "PaceStep"]

PACE_RULES: tuple[str, ...] = ("effective-movement", "apf", "fixed")
_SAMPLE_STREAM = "progressive/pace-sample"


def _check_int(key: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an int >= {low}, got {value!r}")


def _check_unit(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{key} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class PaceSettings:
    """Settings of the pace controller; fields named after their run-config keys.

    Attributes
    ----------
    rule : str
        ``pace``: one of :data:`PACE_RULES`.
    tau : float
        ``pace-tau``: effective-movement threshold (none is published; sweep it).
    window : int
        ``pace-window``: W of the effective movement.
    patience : int
        ``pace-patience``: consecutive settled rounds needed to freeze.
    min_rounds, max_rounds : int
        ``stage-min-rounds`` / ``stage-max-rounds``: bounds on the rounds of a stage.
    stage_rounds : tuple of int
        ``stage-rounds``: rounds per stage of the ``fixed`` rule (one value: every stage).
    sample : int
        ``pace-sample``: coordinates of the active block tracked.
    apf_ema, apf_threshold, apf_level : float
        ``pace-apf-ema``, ``pace-apf-threshold``, ``pace-apf-level`` of the ``apf`` rule.
    seed : int
        ``pace-seed``: seeds the coordinate sample.

    """

    rule: str = "effective-movement"
    tau: float = 0.2
    window: int = 6
    patience: int = 3
    min_rounds: int = 10
    max_rounds: int = 200
    stage_rounds: tuple[int, ...] = (50,)
    sample: int = 10_000
    apf_ema: float = 0.99
    apf_threshold: float = 0.05
    apf_level: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate every field; the error names the run-config key."""
        if self.rule not in PACE_RULES:
            raise ConfigError(f"pace must be one of {', '.join(PACE_RULES)}, got {self.rule!r}")
        for key in ("pace-tau", "pace-apf-ema", "pace-apf-threshold", "pace-apf-level"):
            _check_unit(key, getattr(self, key.removeprefix("pace-").replace("-", "_")))
        _check_int("pace-window", self.window, 1)
        _check_int("pace-patience", self.patience, 1)
        _check_int("stage-min-rounds", self.min_rounds, 1)
        _check_int("stage-max-rounds", self.max_rounds, 1)
        _check_int("pace-sample", self.sample, 1)
        _check_int("pace-seed", self.seed, 0)
        if self.max_rounds < self.min_rounds:
            raise ConfigError(
                f"stage-max-rounds ({self.max_rounds}) must be >= stage-min-rounds "
                f"({self.min_rounds})"
            )
        if not isinstance(self.stage_rounds, tuple) or not self.stage_rounds:
            raise ConfigError(f"stage-rounds must be a non-empty tuple, got {self.stage_rounds!r}")
        for value in self.stage_rounds:
            _check_int("stage-rounds", value, 1)

    def rounds_of_stage(self, stage: int) -> int:
        """``fixed`` rule: rounds of stage ``stage`` (the last value repeats)."""
        return self.stage_rounds[min(stage, len(self.stage_rounds) - 1)]


@dataclass(frozen=True)
class PaceStep:
    """What the controller says after one round of a stage.

    Attributes
    ----------
    stage, round_in_stage : int
        The stage and how many of its rounds are done (1 after the first).
    metric : float or None
        The rule's metric this round (``None`` while the window is not full).
    settled : bool
        Whether this round counts towards the patience.
    freeze : bool
        Freeze the block now (and move to the next stage).
    reason : str
        ``"settled"``, ``"max-rounds"``, ``"schedule"`` or ``""`` (no freeze).

    """

    stage: int
    round_in_stage: int
    metric: float | None
    settled: bool
    freeze: bool
    reason: str


class PaceController:
    """Stateful pace controller of one run (see the module docstring)."""

    def __init__(self, settings: PaceSettings) -> None:
        self.settings = settings
        self.stage = -1
        self.rounds = 0
        self.streak = 0
        self._numel = 0
        self.index = torch.zeros(0, dtype=torch.long)
        self.history: list[torch.Tensor] = []
        self.ema_delta = torch.zeros(0, dtype=torch.float64)
        self.ema_abs = torch.zeros(0, dtype=torch.float64)

    def _sample(self, theta: torch.Tensor) -> torch.Tensor:
        flat = theta.detach().reshape(-1)
        if flat.numel() != self._numel:
            raise ValueError(
                f"stage {self.stage}: expected {self._numel} values, got {flat.numel()}"
            )
        return flat[self.index].to(torch.float64)

    def begin_stage(self, stage: int, theta: torch.Tensor) -> None:
        """Start stage ``stage``; ``theta`` holds the active block's parameters (any shape)."""
        _check_int("stage", stage, 0)
        numel = int(theta.numel())
        if numel < 1:
            raise ValueError("the active block has no parameters")
        self.stage, self.rounds, self.streak, self._numel = stage, 0, 0, numel
        size = min(self.settings.sample, numel)
        gen = torch.Generator().manual_seed(derive_seed(self.settings.seed, _SAMPLE_STREAM, stage))
        self.index = torch.randperm(numel, generator=gen)[:size].sort().values
        self.history = [self._sample(theta)]
        self.ema_delta = torch.zeros(size, dtype=torch.float64)
        self.ema_abs = torch.zeros(size, dtype=torch.float64)

    def _effective_movement(self) -> float | None:
        w = self.settings.window
        if len(self.history) < w + 1:
            return None
        window = self.history[-(w + 1) :]
        path = sum(float((b - a).abs().sum()) for a, b in itertools.pairwise(window))
        if path == 0.0:
            return 0.0
        return float((window[-1] - window[0]).abs().sum()) / path

    def _apf_fraction(self, delta: torch.Tensor) -> float:
        beta = self.settings.apf_ema
        self.ema_delta.mul_(beta).add_(delta, alpha=1 - beta)
        self.ema_abs.mul_(beta).add_(delta.abs(), alpha=1 - beta)
        ratio = torch.where(
            self.ema_abs > 0, self.ema_delta.abs() / self.ema_abs, torch.zeros_like(self.ema_abs)
        )
        return float((ratio < self.settings.apf_threshold).double().mean())

    def step(self, theta: torch.Tensor) -> PaceStep:
        """Record the active block's parameters after one more round; say whether to freeze."""
        if self.stage < 0:
            raise RuntimeError("call begin_stage before step")
        current = self._sample(theta)
        if not bool(torch.isfinite(current).all()):
            raise ValueError(f"stage {self.stage}: non-finite parameters")
        delta = current - self.history[-1]
        self.history = [*self.history, current][-(self.settings.window + 1) :]
        self.rounds += 1
        s = self.settings
        metric: float | None
        if s.rule == "apf":
            metric = self._apf_fraction(delta)
            settled = metric > s.apf_level
        else:
            metric = self._effective_movement()
            settled = metric is not None and metric < s.tau
        self.streak = self.streak + 1 if settled else 0
        if s.rule == "fixed":
            freeze = self.rounds >= s.rounds_of_stage(self.stage)
            reason = "schedule" if freeze else ""
        elif self.rounds >= s.max_rounds:
            freeze, reason = True, "max-rounds"
        elif self.rounds >= s.min_rounds and self.streak >= s.patience:
            freeze, reason = True, "settled"
        else:
            freeze, reason = False, ""
        return PaceStep(self.stage, self.rounds, metric, settled, freeze, reason)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly (plain values and CPU tensors)."""
        return {
            "rule": self.settings.rule,
            "stage": self.stage,
            "rounds": self.rounds,
            "streak": self.streak,
            "numel": self._numel,
            "index": self.index.clone(),
            "history": [h.clone() for h in self.history],
            "ema_delta": self.ema_delta.clone(),
            "ema_abs": self.ema_abs.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (raises CheckpointError if inconsistent)."""
        try:
            if state["rule"] != self.settings.rule:
                raise CheckpointError(
                    f"pace state is for rule {state['rule']!r}, not {self.settings.rule!r}"
                )
            index = state["index"]
            history = list(state["history"])
            ema_delta, ema_abs = state["ema_delta"], state["ema_abs"]
            sizes = {int(index.numel()), int(ema_delta.numel()), int(ema_abs.numel())}
            sizes |= {int(h.numel()) for h in history}
            if len(sizes) != 1 or len(history) > self.settings.window + 1:
                raise CheckpointError("pace state: inconsistent tensor sizes")
            self.stage, self.rounds = int(state["stage"]), int(state["rounds"])
            self.streak, self._numel = int(state["streak"]), int(state["numel"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"pace state is malformed: {exc!r}") from None
        self.index = index.clone().to(torch.long)
        self.history = [h.clone().to(torch.float64) for h in history]
        self.ema_delta = ema_delta.clone().to(torch.float64)
        self.ema_abs = ema_abs.clone().to(torch.float64)
