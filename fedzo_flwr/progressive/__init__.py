"""Progressive block training (SmartFreeze / ProFL), the Flower-free core.

A client trains one block of the model at a time with backprop (:mod:`.client`) on a staged view
of the model (:mod:`.staged`); the server decides from the parameters alone when a block has
converged (:mod:`.pace`) and picks, per stage, nodes whose memory budget (:mod:`.devices`) covers
the stage's need (:mod:`.memory`, :mod:`.selector`); :mod:`.schedule` orders the steps (ProFL's
shrink steps, :mod:`.shrink`, then growing). See ``docs/progressive.md``; the Flower glue is
``server_app/progressive_strategy.py`` and ``client_app/progressive.py``.
"""

from __future__ import annotations

from fedzo_flwr.progressive.client import StageTrainResult, StageTrainSettings, train_stage
from fedzo_flwr.progressive.devices import MEMORY_PROFILES, NodeDevice, device_budget
from fedzo_flwr.progressive.memory import (
    MemoryPlan,
    StageMemory,
    full_backprop_memory,
    memory_plan,
    stage_memory,
)
from fedzo_flwr.progressive.pace import PACE_RULES, PaceController, PaceSettings, PaceStep
from fedzo_flwr.progressive.selector import (
    SELECTORS,
    EligibilityReport,
    NodeInfo,
    Selector,
    SpeedTracker,
    eligibility_report,
    label_groups,
)
from fedzo_flwr.progressive.staged import SPLITS, StagedModel, build_staged

__all__ = [
    "MEMORY_PROFILES",
    "PACE_RULES",
    "SELECTORS",
    "SPLITS",
    "EligibilityReport",
    "MemoryPlan",
    "NodeDevice",
    "NodeInfo",
    "PaceController",
    "PaceSettings",
    "PaceStep",
    "Selector",
    "SpeedTracker",
    "StageMemory",
    "StageTrainResult",
    "StageTrainSettings",
    "StagedModel",
    "build_staged",
    "device_budget",
    "eligibility_report",
    "full_backprop_memory",
    "label_groups",
    "memory_plan",
    "stage_memory",
    "train_stage",
]
