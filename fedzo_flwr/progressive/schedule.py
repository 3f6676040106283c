"""The steps of a progressive run and the tensors each step trains, sends and keeps frozen.

A run is a sequence of **steps** ``(phase, stage)``:

``grow`` (SmartFreeze; ProFL's "model growing") [paper]
    stage ``t`` = 0, 1, ... trains block ``t`` and output module ``t`` (block and head at the
    last stage) with cross-entropy; blocks ``0..t-1`` are frozen. The pace controller decides
    when to move on; the last stage trains until the run ends.
``shrink`` (ProFL's "model shrinking", **our reconstruction**) [paper, code]
    before growing, back to front for ``t`` = T-2 down to 0: output module ``t`` learns to
    stand in for what follows block ``t`` by distilling the logits of step ``t + 1``'s model
    (blocks ``0..t+1`` and output module ``t+1``, or the head when ``t + 1`` is the last stage)
    with an MSE loss at ``profl-shrink-lr`` (1e-5 [code]); blocks and teacher are frozen and
    only output module ``t`` trains, for ``profl-shrink-rounds`` rounds per step.

Names are those of :meth:`StagedModel.stage_parameters`: the ordinary model's ``state_dict``
keys and ``output.<t>.<name>`` for output-module tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from fedzo_flwr.config import RunConfig
from fedzo_flwr.progressive.client import StageTrainSettings
from fedzo_flwr.progressive.pace import PaceSettings
from fedzo_flwr.progressive.staged import OUTPUT_PREFIX, StagedModel

__all__ = [
    "Phase",
    "Step",
    "all_tensors",
    "first_step",
    "frozen_names",
    "next_step",
    "pace_settings",
    "stage_train_settings",
    "trainable_names",
]

Phase = Literal["shrink", "grow"]


@dataclass(frozen=True)
class Step:
    """One step of the schedule: a phase and a stage."""

    phase: Phase
    stage: int


def first_step(method: str, num_stages: int) -> Step:
    """``profl`` starts shrinking at stage T-2 (if the model has 2+ stages); else grow 0."""
    if method == "profl" and num_stages > 1:
        return Step("shrink", num_stages - 2)
    return Step("grow", 0)


def next_step(step: Step, num_stages: int) -> Step | None:
    """The step after ``step`` (``None`` after the last stage: it trains to the end)."""
    if step.phase == "shrink":
        return Step("shrink", step.stage - 1) if step.stage > 0 else Step("grow", 0)
    return Step("grow", step.stage + 1) if step.stage + 1 < num_stages else None


def _output_names(staged: StagedModel, stage: int) -> list[str]:
    prefix = f"{OUTPUT_PREFIX}{stage}."
    return [prefix + n for n, _ in staged.output_modules[stage].named_parameters()]


def trainable_names(staged: StagedModel, step: Step) -> tuple[str, ...]:
    """What the step trains (and what travels both ways every round)."""
    if step.phase == "shrink":
        return tuple(_output_names(staged, step.stage))
    return tuple(staged.stage_parameters(step.stage))


def frozen_names(staged: StagedModel, step: Step) -> tuple[str, ...]:
    """What the step needs but does not train (sent once per step, cached on the node).

    ``grow`` stage ``t``: blocks ``0..t-1``. ``shrink`` stage ``t``: blocks ``0..t+1`` and the
    teacher's output module ``t+1`` (the head when ``t + 1`` is the last stage).
    """
    if step.phase == "grow":
        return tuple(n for t in range(step.stage) for n in staged.block_names(t))
    names = [n for t in range(step.stage + 2) for n in staged.block_names(t)]
    teacher = step.stage + 1
    if teacher == staged.num_stages - 1:
        names += [n for n in staged.stage_parameters(teacher) if n not in names]
    else:
        names += _output_names(staged, teacher)
    return tuple(names)


def all_tensors(staged: StagedModel) -> dict[str, nn.Parameter]:
    """Every parameter of the staged model by name (model keys, then ``output.<t>.<name>``)."""
    params = dict(staged.model.named_parameters())
    for t in range(len(staged.output_modules)):
        for name, param in staged.output_modules[t].named_parameters():
            params[f"{OUTPUT_PREFIX}{t}.{name}"] = param
    return params


def pace_settings(cfg: RunConfig) -> PaceSettings:
    """The pace controller's settings from the run config."""
    return PaceSettings(
        rule=cfg.pace,
        tau=cfg.pace_tau,
        window=cfg.pace_window,
        patience=cfg.pace_patience,
        min_rounds=cfg.stage_min_rounds,
        max_rounds=cfg.stage_max_rounds,
        stage_rounds=cfg.stage_rounds_list,
        sample=cfg.pace_sample,
        apf_ema=cfg.pace_apf_ema,
        apf_threshold=cfg.pace_apf_threshold,
        apf_level=cfg.pace_apf_level,
        seed=cfg.pace_seed,
    )


def stage_train_settings(cfg: RunConfig, step: Step) -> StageTrainSettings:
    """Local training settings of ``step``: SGD with ``momentum`` and ``stage-weight-decay``.

    ``local-lr`` while growing, ``profl-shrink-lr`` while shrinking.
    """
    return StageTrainSettings(
        local_epochs=cfg.local_epochs,
        local_batches=cfg.local_batches,
        batch_size=cfg.batch_size,
        lr=cfg.profl_shrink_lr if step.phase == "shrink" else cfg.local_lr,
        momentum=cfg.momentum,
        weight_decay=cfg.stage_weight_decay,
        dataset=cfg.dataset,
    )
