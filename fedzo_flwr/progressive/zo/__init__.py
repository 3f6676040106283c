"""Zeroth-order progressive training (``zo-progressive``, ours), the Flower-free core.

Progressive training (:mod:`fedzo_flwr.progressive`) trains one block at a time; zeroth-order
training (:mod:`fedzo_flwr.zo`) estimates gradients from forward passes only, with an error that
grows with the number of perturbed coordinates. Together: a client perturbs only the active
block and its output module (:mod:`.active`), runs the frozen front of the network once per
batch (:mod:`.client`), and uploads K loss differences; the server reconstructs the update over
the stage's kept coordinates (:mod:`.server`, imported from there: the package itself holds
only what a client needs, so a ClientApp importing it never loads the server's modules). FLOPs
per client step: :mod:`.flops`. See ``docs/progressive.md``, section "Zeroth-order progressive
training (ours)".
"""

from __future__ import annotations

from fedzo_flwr.progressive.zo.active import (
    ActiveStage,
    apply_staged_mask_,
    feature_shape,
    output_mask_seed,
    output_masks,
    staged_mask,
    staged_mask_template,
)
from fedzo_flwr.progressive.zo.client import stage_loss_differences, train_stage_round
from fedzo_flwr.progressive.zo.flops import StageStepFlops, stage_step_flops

__all__ = [
    "ActiveStage",
    "StageStepFlops",
    "apply_staged_mask_",
    "feature_shape",
    "output_mask_seed",
    "output_masks",
    "stage_loss_differences",
    "stage_step_flops",
    "staged_mask",
    "staged_mask_template",
    "train_stage_round",
]
