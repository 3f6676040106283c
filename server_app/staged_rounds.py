"""What the strategies of a staged model share: participants per stage, frozen tensors, outputs.

Both progressive strategies, backprop (``smartfreeze | profl``,
:mod:`server_app.progressive_strategy`) and zeroth-order (``zo-progressive``,
:mod:`server_app.zo_progressive_strategy`), train one stage of a
:class:`~fedzo_flwr.progressive.staged.StagedModel` at a time on the nodes whose memory budget
fits that stage. This module holds their common parts:

* :class:`StageParticipants`: probe new nodes (:mod:`server_app.node_info`), report the nodes
  that fit no stage (logged once, listed in ``setup.eligibility``), and pick a round's
  participants with the selector among the nodes whose budget covers the stage's need;
* :class:`FrozenTensors`: a stage's frozen tensors as one ArrayRecord with its id, and which
  node holds which set (sent once per stage and node, then cached in the node's state);
* :class:`StageView` (the model as trained up to a stage) and :func:`save_staged_model`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid
from torch import nn

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import NUM_CLASSES
from fedzo_flwr.files import atomic_write_bytes
from fedzo_flwr.progressive.pace import PaceController
from fedzo_flwr.progressive.selector import Selector, SpeedTracker, eligibility_report
from fedzo_flwr.progressive.staged import StagedModel
from fedzo_flwr.protocol import progressive as keys
from fedzo_flwr.run.results import RunRecorder
from fedzo_flwr.sparse.mask import Mask
from server_app.logs import log
from server_app.node_info import NodeRegistry
from server_app.nodes import wait_for_nodes


class PacedStages:
    """The pace controller's part of a staged strategy (SmartFreeze / ProFL and zo-progressive).

    After each trained round of a growing stage the controller looks at the active block; when
    it says freeze, the strategy moves to the next stage (:meth:`_advance`, the strategy's own),
    or, on the last stage, records once that the stage has settled and trains on to the end.
    """

    cfg: RunConfig
    staged: StagedModel
    pace: PaceController
    participants: StageParticipants
    recorder: RunRecorder
    last_stage_settled: bool

    @property
    def last_stage(self) -> int:
        """Index of the last stage (trained with the model's own head)."""
        return self.staged.num_stages - 1

    def _advance(self, server_round: int, reason: str) -> dict[str, object]:
        raise NotImplementedError

    def pace_round(self, server_round: int, stage: int, round_in_stage: int) -> dict[str, object]:
        """Step the controller on ``stage``'s block; the round's pace fields (and stage change)."""
        pace = self.pace.step(self.staged.block_vector(stage))
        fields: dict[str, object] = {"pace_metric": pace.metric, "pace_settled": pace.settled}
        log(
            INFO,
            "Round %d: stage %d round %d, pace %s %s%s",
            server_round,
            stage,
            round_in_stage,
            self.cfg.pace,
            "n/a" if pace.metric is None else f"{pace.metric:.4f}",
            " (settled)" if pace.settled else "",
        )
        if pace.freeze and stage < self.last_stage:
            fields["stage_change"] = self._advance(server_round, pace.reason)
        elif pace.freeze and not self.last_stage_settled:
            self.last_stage_settled = True
            fields["last_stage_settled"] = pace.reason
            log(
                INFO,
                "Round %d: the last stage is settled (%s); it trains on to the end",
                server_round,
                pace.reason,
            )
        return fields

    def record_stage_final(self, step: dict[str, object] | None) -> None:
        """``final``: the stage changes, the nodes never eligible, the step the run ended on."""
        rounds = self.recorder.data["rounds"]
        self.recorder.set_final(
            stage_changes=[r["stage_change"] for r in rounds if "stage_change" in r],
            never_eligible=sorted(self.participants.reported_never),
            step=step,
        )


class StageView(nn.Module):
    """The model as trained up to stage ``stage``: blocks ``0..stage`` and its output module."""

    def __init__(self, staged: StagedModel, stage: int) -> None:
        super().__init__()
        self.model = staged.model
        self.outputs = staged.output_modules
        self._staged = staged
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``staged.forward_stage(x, stage)``."""
        return self._staged.forward_stage(x, self.stage)


class StageParticipants:
    """The nodes of a staged run: their probed budgets and who trains each round.

    Parameters
    ----------
    cfg : RunConfig
        ``memory-profile`` and its keys, ``memory-margin``, ``selector`` and its keys,
        ``clients-per-round``, ``min-clients``, ``round-timeout``.
    needs : sequence of int
        Each stage's memory need in bytes (what a node's budget must cover).
    full_need : int
        Full-model backprop's analytic need (``profl-uniform``'s unit, and the "full model"
        column of the eligibility report).
    recorder : RunRecorder
        Where ``setup.eligibility`` goes.
    """

    def __init__(
        self, cfg: RunConfig, needs: Sequence[int], full_need: int, recorder: RunRecorder
    ) -> None:
        self.cfg = cfg
        self.needs = tuple(needs)
        self.full_need = full_need
        self.recorder = recorder
        self.node_info = NodeRegistry(cfg, full_need, NUM_CLASSES[cfg.dataset])
        self.selector = Selector(cfg.selector, cfg.seed, cfg.memory_margin, cfg.selector_similarity)
        self.speeds = SpeedTracker(cfg.selector_speed_ema)
        self.reported_never: set[int] = set()

    def report_never_eligible(self, server_round: int) -> list[int]:
        """Log (once) the probed nodes that fit no stage; record ``setup.eligibility``."""
        profiles = list(self.node_info.profiles.values())
        if not profiles:
            return []
        report = eligibility_report(
            [p.info() for p in profiles], self.needs, self.full_need, self.cfg.memory_margin
        )
        of = self.node_info.profiles
        for node_id in report.never_eligible:
            if node_id not in self.reported_never:
                self.reported_never.add(node_id)
                budget = of[node_id].budget_bytes or 0
                log(
                    WARNING,
                    "Round %d: node %d (partition %d, budget %.1f MiB) fits no stage "
                    "(smallest need %.1f MiB x (1 + margin %g)); it never trains",
                    server_round,
                    node_id,
                    of[node_id].partition_id,
                    budget / 2**20,
                    min(self.needs) / 2**20,
                    self.cfg.memory_margin,
                )
        eligibility = {
            "nodes": report.num_nodes,
            "per_stage": [sorted(of[n].partition_id for n in ids) for ids in report.per_stage],
            "full_model": sorted(of[n].partition_id for n in report.full_model),
            "never_eligible": sorted(of[n].partition_id for n in report.never_eligible),
            "fractions": report.fractions(),
        }
        self.recorder.set_setup(eligibility=eligibility)
        return sorted(report.never_eligible)

    def select(
        self,
        grid: Grid,
        server_round: int,
        min_available: int,
        stage: int,
        label: str,
        usable: Callable[[int], bool] | None = None,
    ) -> tuple[list[int], dict[str, object]]:
        """The round's participants (sorted node ids) and the round record's selection fields.

        Waits (bounded) for ``min_available`` nodes, probes the new ones, and lets the selector
        pick ``clients-per-round`` (0 = all) among the probed nodes that ``usable`` admits
        (default: all) and whose budget fits ``stage``'s need. Fewer than ``min-clients``
        picks: the round is skipped (no participants, logged). ``label`` names the step in
        the log (e.g. ``"grow stage 1"``).
        """
        connected = wait_for_nodes(grid, min_available, self.cfg.round_timeout)
        probe = self.node_info.probe(grid, connected, server_round)
        never = self.report_never_eligible(server_round)
        need = self.needs[stage]
        known = [n for n in connected if n in self.node_info.profiles]
        admitted = [n for n in known if usable is None or usable(n)]
        eligible = [n for n in admitted if self.node_info.fits(n, need, self.cfg.memory_margin)]
        count = self.cfg.clients_per_round or len(eligible)
        picks = self.selector.select(
            self.node_info.infos(admitted), need, count, server_round, self.speeds
        )
        fields: dict[str, object] = {
            "stage_need_bytes": need,
            "eligible": len(eligible),
            "ineligible": sorted(set(known) - set(eligible)),
            "unprobed": sorted(set(connected) - set(known)),
            "never_eligible": never,
            "probe": probe,
        }
        if len(picks) < self.cfg.min_clients:
            log(
                WARNING,
                "Round %d: only %d nodes fit %s (need %.1f MiB), min-clients is %d; "
                "skipping the round",
                server_round,
                len(picks),
                label,
                need / 2**20,
                self.cfg.min_clients,
            )
            picks = []
        log(
            INFO,
            "configure_train: %d of %d eligible nodes for %s (%d connected)",
            len(picks),
            len(eligible),
            label,
            len(connected),
        )
        return sorted(picks), fields


class FrozenTensors:
    """A stage's frozen tensors as one ArrayRecord with its id, and the nodes that hold it.

    Parameters
    ----------
    tensors : mapping of str to Tensor
        Every tensor of the staged model by name (read when a record is built).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.holders: dict[int, str] = {}
        self._built: tuple[object, str, ArrayRecord] | None = None

    def record(self, key: object, names: Iterable[str]) -> tuple[str, ArrayRecord | None]:
        """The frozen set of step ``key`` and its id (built once per step; ``("", None)``: none)."""
        names = tuple(names)
        if not names:
            return "", None
        if self._built is None or self._built[0] != key:
            record = ArrayRecord({n: Array(self.tensors[n].detach().numpy().copy()) for n in names})
            ident = keys.frozen_id({n: record[n].numpy() for n in names})
            self._built = (key, ident, record)
        return self._built[1], self._built[2]

    def needs(self, node_id: int, ident: str) -> bool:
        """Whether ``node_id`` must be sent the frozen set ``ident`` (it does not hold it)."""
        return bool(ident) and self.holders.get(node_id) != ident

    def hold(self, node_id: int, ident: str) -> None:
        """``node_id`` answered a message that named ``ident``: it holds that set."""
        if ident:
            self.holders[node_id] = ident

    def forget(self, node_id: int) -> None:
        """``node_id`` reported that it lost its cached tensors."""
        self.holders.pop(node_id, None)


def save_staged_model(
    path: Path,
    cfg: RunConfig,
    staged: StagedModel,
    mask: Mask,
    extra: dict[str, Any],
) -> None:
    """``model.pt``: the ordinary model's state, the output modules, the mask and ``extra``."""
    buffer = io.BytesIO()
    torch.save(
        {
            "config": cfg.to_run_config(),
            "model_state": {k: v.clone() for k, v in staged.model.state_dict().items()},
            "output_modules": {k: v.clone() for k, v in staged.output_modules.state_dict().items()},
            "mask": mask,
            **extra,
        },
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())
