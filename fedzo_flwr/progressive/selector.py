"""The participant selector of progressive training: who trains the current stage.

A node is **eligible** for a stage when its memory budget covers the stage's need x
``(1 + memory-margin)`` (an unlimited budget covers everything). Policies (``selector``):

``random-eligible`` [code]
    uniform sampling without replacement among the eligible nodes, seeded per round with
    :func:`~fedzo_flwr.seeding.node_sample_seed` (what ProFL's released code does).
``heterogeneity-aware`` [ours]
    the papers' selector is not published; ours groups the nodes by the cosine similarity of
    their label histograms (:func:`label_groups`: greedy, deterministic, in node-id order, a
    node joins the most similar group centroid if the cosine is at least ``selector-similarity``
    and starts a new group otherwise), then fills the round one node per group in turn (groups
    in a seeded random order each round), and inside a group draws nodes by weighted sampling
    without replacement with weight ``1 / EMA(seconds)`` (:class:`SpeedTracker`; a node never
    timed gets the largest weight of the eligible nodes, so it is tried soon).

:func:`eligibility_report` lists, per stage and for the full model, which nodes fit, and the
nodes that fit no stage at all (they are reported, never silently dropped).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedzo_flwr.errors import CheckpointError, ConfigError
from fedzo_flwr.seeding import node_sample_seed

__all__ = [
    "SELECTORS",
    "EligibilityReport",
    "NodeInfo",
    "Selector",
    "SpeedTracker",
    "eligibility_report",
    "eligible_nodes",
    "label_groups",
]

SELECTORS: tuple[str, ...] = ("random-eligible", "heterogeneity-aware")


@dataclass(frozen=True)
class NodeInfo:
    """What the server knows about one node.

    Attributes
    ----------
    node_id : int
        Flower node id (or any unique int).
    budget_bytes : int or None
        Memory budget for training; ``None`` = unlimited.
    label_histogram : tuple of float
        Examples per class of the node's partition (empty if unknown).

    """

    node_id: int
    budget_bytes: int | None
    label_histogram: tuple[float, ...] = ()


def _check_margin(margin: float) -> None:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
        raise ConfigError(f"memory-margin must be a number >= 0, got {margin!r}")
    if not math.isfinite(margin):
        raise ConfigError(f"memory-margin must be finite, got {margin!r}")


def _fits(node: NodeInfo, need_bytes: int, margin: float) -> bool:
    return node.budget_bytes is None or node.budget_bytes >= need_bytes * (1 + margin)


def eligible_nodes(nodes: Sequence[NodeInfo], need_bytes: int, margin: float) -> list[int]:
    """Ids (sorted) of the nodes whose budget covers ``need_bytes * (1 + margin)``."""
    _check_margin(margin)
    return sorted(n.node_id for n in nodes if _fits(n, need_bytes, margin))


@dataclass(frozen=True)
class EligibilityReport:
    """Which nodes can train what.

    Attributes
    ----------
    per_stage : tuple of tuple of int
        Eligible node ids of each stage.
    full_model : tuple of int
        Node ids that fit full-model backprop.
    never_eligible : tuple of int
        Node ids that fit no stage (they can never take part).
    num_nodes : int
        Population size.

    """

    per_stage: tuple[tuple[int, ...], ...]
    full_model: tuple[int, ...]
    never_eligible: tuple[int, ...]
    num_nodes: int

    def fractions(self) -> dict[str, float]:
        """Fraction of the population that fits each stage and the full model."""
        out = {f"stage {t}": len(ids) / self.num_nodes for t, ids in enumerate(self.per_stage)}
        out["full model"] = len(self.full_model) / self.num_nodes
        return out


def eligibility_report(
    nodes: Sequence[NodeInfo], stage_needs: Sequence[int], full_need: int, margin: float
) -> EligibilityReport:
    """Eligibility of every node for every stage (``stage_needs``) and for the full model."""
    if not nodes:
        raise ValueError("no nodes")
    per_stage = tuple(tuple(eligible_nodes(nodes, need, margin)) for need in stage_needs)
    reachable = {i for ids in per_stage for i in ids}
    never = tuple(sorted(n.node_id for n in nodes if n.node_id not in reachable))
    full = tuple(eligible_nodes(nodes, full_need, margin))
    return EligibilityReport(per_stage, full, never, len(nodes))


def _unit(histogram: tuple[float, ...]) -> np.ndarray:
    h = np.asarray(histogram, dtype=np.float64)
    if h.ndim != 1 or not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ValueError(f"a label histogram must hold finite counts >= 0, got {histogram!r}")
    norm = float(np.linalg.norm(h))
    return h / norm if norm > 0 else h


def label_groups(nodes: Sequence[NodeInfo], similarity: float = 0.8) -> dict[int, int]:
    """Group nodes by label-histogram cosine similarity; ``{node_id: group}`` (see module doc).

    Nodes with an empty or all-zero histogram form one group of their own.
    """
    if not 0 <= similarity <= 1:
        raise ConfigError(f"selector-similarity must be in [0, 1], got {similarity!r}")
    sums: list[np.ndarray] = []
    groups: dict[int, int] = {}
    unknown = -1
    for node in sorted(nodes, key=lambda n: n.node_id):
        h = _unit(node.label_histogram)
        if not h.size or not h.any():
            if unknown < 0:
                unknown = len(sums)
                sums.append(np.zeros(0))
            groups[node.node_id] = unknown
            continue
        best, best_cos = -1, -1.0
        for g, total in enumerate(sums):
            if g == unknown or total.shape != h.shape:
                continue
            cos = float(total @ h) / float(np.linalg.norm(total))
            if cos > best_cos:
                best, best_cos = g, cos
        if best >= 0 and best_cos >= similarity:
            sums[best] = sums[best] + h
            groups[node.node_id] = best
        else:
            groups[node.node_id] = len(sums)
            sums.append(h.copy())
    return groups


class SpeedTracker:
    """EMA of each node's reported training seconds (``selector-speed-ema``)."""

    def __init__(self, factor: float = 0.5) -> None:
        if not 0 <= factor < 1:
            raise ConfigError(f"selector-speed-ema must be in [0, 1), got {factor!r}")
        self.factor = factor
        self.seconds: dict[int, float] = {}

    def update(self, node_id: int, seconds: object) -> bool:
        """Fold one reported time in; False (and ignored) if it is not a finite number > 0."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            return False
        value = float(seconds)
        if not math.isfinite(value) or value <= 0:
            return False
        old = self.seconds.get(node_id)
        self.seconds[node_id] = (
            value if old is None else self.factor * old + (1 - self.factor) * value
        )
        return True

    def state_dict(self) -> dict[str, object]:
        """Serialisable state."""
        return {"factor": self.factor, "seconds": {str(k): v for k, v in self.seconds.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict`'s output."""
        seconds = state.get("seconds")
        if not isinstance(seconds, Mapping):
            raise CheckpointError("speed state: 'seconds' must be a mapping")
        try:
            self.seconds = {int(k): float(v) for k, v in seconds.items()}
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"speed state is malformed: {exc}") from None


@dataclass(frozen=True)
class Selector:
    """Pick the nodes of one round of a stage (see the module docstring).

    Attributes
    ----------
    policy : str
        ``selector``: one of :data:`SELECTORS`.
    run_seed : int
        The run's seed (rounds are seeded with :func:`node_sample_seed`).
    margin : float
        ``memory-margin``.
    similarity : float
        ``selector-similarity`` (``heterogeneity-aware`` only).

    """

    policy: str = "random-eligible"
    run_seed: int = 0
    margin: float = 0.0
    similarity: float = 0.8

    def __post_init__(self) -> None:
        """Validate the settings; the error names the run-config key."""
        if self.policy not in SELECTORS:
            raise ConfigError(
                f"selector must be one of {', '.join(SELECTORS)}, got {self.policy!r}"
            )
        _check_margin(self.margin)
        if not 0 <= self.similarity <= 1:
            raise ConfigError(f"selector-similarity must be in [0, 1], got {self.similarity!r}")

    def select(
        self,
        nodes: Sequence[NodeInfo],
        need_bytes: int,
        count: int,
        server_round: int,
        speeds: SpeedTracker | None = None,
    ) -> list[int]:
        """Up to ``count`` eligible node ids for ``server_round`` (fewer if fewer fit)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        eligible = eligible_nodes(nodes, need_bytes, self.margin)
        rng = np.random.default_rng(node_sample_seed(self.run_seed, server_round))
        if len(eligible) <= count:
            return eligible
        if self.policy == "random-eligible":
            picks = rng.choice(len(eligible), size=count, replace=False)
            return [eligible[int(i)] for i in picks]
        return self._spread(nodes, eligible, count, rng, speeds)

    def _spread(
        self,
        nodes: Sequence[NodeInfo],
        eligible: list[int],
        count: int,
        rng: np.random.Generator,
        speeds: SpeedTracker | None,
    ) -> list[int]:
        groups = label_groups([n for n in nodes if n.node_id in set(eligible)], self.similarity)
        known = speeds.seconds if speeds is not None else {}
        weights = {i: 1.0 / known[i] for i in eligible if i in known}
        default = max(weights.values(), default=1.0)
        # Efraimidis-Spirakis weighted sampling: rank by log(u) / w, largest first.
        logs = dict(zip(eligible, np.log(rng.random(len(eligible))).tolist()))
        ranked = sorted(eligible, key=lambda i: -logs[i] / weights.get(i, default))
        members: dict[int, list[int]] = {}
        for node_id in ranked:
            members.setdefault(groups[node_id], []).append(node_id)
        order = [sorted(members)[int(g)] for g in rng.permutation(len(members))]
        picks: list[int] = []
        while len(picks) < count:
            for g in order:
                if members[g] and len(picks) < count:
                    picks.append(members[g].pop(0))
        return picks
