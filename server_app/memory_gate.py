"""Probe-then-eligible: which nodes of a memory-heterogeneous population may train a round.

One rule for the methods whose need is one figure (``fedavg``: full-model backprop;
``zo-dense`` / ``zo-pruned``: a zeroth-order client step with the configured engine). With a
``memory-profile`` other than ``none``, every new node is probed once
(:class:`~server_app.node_info.NodeRegistry`: its declared ``memory-budget-mb`` or its draw from
the profile), and a node trains only if its budget covers ``need x (1 + memory-margin)``. A node
that does not is logged once and listed in every round record (``ineligible``, node ids), with
the need (``need_key``) and the probe's node count and bytes (``probe``). The progressive
methods apply the same registry and rule per stage (``server_app/progressive_strategy.py``).
"""

from __future__ import annotations

from logging import WARNING

from flwr.serverapp import Grid

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import NUM_CLASSES
from server_app.logs import log
from server_app.node_info import NodeRegistry

_MIB = 2**20


class MemoryGate:
    """The probed budgets of a run and the one need every training node must fit.

    Parameters
    ----------
    cfg : RunConfig
        ``memory-profile`` (not ``none``), ``memory-margin`` and the profile's keys.
    need_bytes : int
        What one client step of the method needs (analytic, bytes).
    full_need_bytes : int
        Full-model backprop's analytic need: ``profl-uniform``'s unit, the same for every method
        on one model, so every method sees the same budgets.
    need_key : str
        The round-record field that carries ``need_bytes`` (``full_need_bytes`` for FedAvg,
        ``zo_need_bytes`` for the zeroth-order methods).
    what : str
        What the need is for, in the log line of a node that does not fit.
    """

    def __init__(
        self, cfg: RunConfig, need_bytes: int, full_need_bytes: int, need_key: str, what: str
    ) -> None:
        self.cfg = cfg
        self.need_bytes = need_bytes
        self.need_key = need_key
        self.what = what
        self.registry = NodeRegistry(cfg, full_need_bytes, NUM_CLASSES[cfg.dataset])
        self.too_small: set[int] = set()
        self.probe: dict[str, int] = {}

    @classmethod
    def for_run(
        cls, cfg: RunConfig, need_bytes: int, full_need_bytes: int, need_key: str, what: str
    ) -> MemoryGate | None:
        """The gate, or ``None`` with ``memory-profile = none`` (every node trains)."""
        if cfg.memory_profile == "none":
            return None
        return cls(cfg, need_bytes, full_need_bytes, need_key, what)

    def probe_new(self, grid: Grid, server_round: int) -> None:
        """Probe the connected nodes not known yet (before the round's nodes are sampled)."""
        self.probe = self.registry.probe(grid, grid.get_node_ids(), server_round)

    def fits(self, node_id: int) -> bool:
        """Whether a probed node's budget covers the need x (1 + margin); logs a misfit once."""
        margin = self.cfg.memory_margin
        if self.registry.fits(node_id, self.need_bytes, margin):
            return True
        profile = self.registry.profiles.get(node_id)
        if profile is not None and node_id not in self.too_small:
            self.too_small.add(node_id)
            log(
                WARNING,
                "node %d (partition %d, budget %.1f MiB) cannot fit %s "
                "(%.1f MiB x (1 + margin %g)); it does not train",
                node_id,
                profile.partition_id,
                (profile.budget_bytes or 0) / _MIB,
                self.what,
                self.need_bytes / _MIB,
                margin,
            )
        return False

    def round_fields(self) -> dict[str, object]:
        """The need, the nodes too small for it (node ids) and this round's probe."""
        return {
            self.need_key: self.need_bytes,
            "ineligible": sorted(self.too_small),
            "probe": dict(self.probe),
        }
