"""FLOPs of one ``zo-progressive`` client step: the prefix once, then K (+1) active passes.

Counted as :func:`fedzo_flwr.measure.flops.zo_step_flops` counts a ``zo-pruned`` step
(``FlopCounterMode``: matrix products and convolutions only; each prunable layer scaled by its
kept fraction): one sparse forward of the frozen prefix on the batch, plus
:func:`~fedzo_flwr.zo.settings.step_forward_passes` sparse forwards of the active module (block
and output module) on the prefix's output.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedzo_flwr.measure.flops import forward_flops
from fedzo_flwr.progressive.zo.active import ActiveStage, feature_shape
from fedzo_flwr.zo.settings import step_forward_passes

__all__ = ["StageStepFlops", "stage_step_flops"]


@dataclass(frozen=True)
class StageStepFlops:
    """Sparse FLOPs of one client step of a stage.

    Attributes
    ----------
    prefix : int
        One forward pass of the frozen prefix on the batch (0 at stage 0).
    active_pass : int
        One forward pass of the active module on the prefix's output.
    passes : int
        Active passes per step (``K + 1`` forward, ``2K + 1`` central differences).

    """

    prefix: int
    active_pass: int
    passes: int

    @property
    def total(self) -> int:
        """``prefix + passes * active_pass``."""
        return self.prefix + self.passes * self.active_pass


def stage_step_flops(active: ActiveStage, batch_size: int, k: int, scheme: str) -> StageStepFlops:
    """Sparse FLOPs of one client step of ``active``'s stage at ``batch_size`` and ``k``."""
    passes = step_forward_passes(k, scheme)
    prefix = 0
    if active.stage > 0:
        prefix = forward_flops(active.prefix(), active.prefix_mask(), batch_size=batch_size).sparse
    active_pass = forward_flops(
        active.module,
        active.mask,
        input_shape=feature_shape(active.staged, active.stage),
        batch_size=batch_size,
    ).sparse
    return StageStepFlops(prefix, active_pass, passes)
