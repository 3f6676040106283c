"""The server's side of a round, without Flower: seeds out, scalars in, one optimizer step.

:class:`ZOServer` owns the global model's kept coordinates and the server optimizer. Each round
it hands out a round seed; clients derive their step seeds from it
(:func:`fedzo_flwr.seeding.client_step_seeds`) and reply with loss differences.
:meth:`ZOServer.apply_round` groups the replies by seed, averages the scalars of each group
weighted as :mod:`fedzo_flwr.aggregation` says, rebuilds one gradient estimate per distinct seed
and steps the model. With ``seed-mode = shared`` every client has the same seeds, so the cost of
a round is one reconstruction, whatever the number of clients.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedzo_flwr.aggregation import client_weights
from fedzo_flwr.config import RunConfig
from fedzo_flwr.seeding import client_step_seeds, round_seed
from fedzo_flwr.sparse.mask import Mask
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.reconstruct import ScalarStep, aggregate_deltas, step_coefficients
from fedzo_flwr.zo.replay import (
    RoundUpdate,
    SeedGroup,
    kept_hash,
    round_gradient,
    update_from_state,
    update_state,
)
from fedzo_flwr.zo.server_optimizer import ServerOptimizer
from fedzo_flwr.zo.settings import optimizer_settings, zo_settings


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its step seeds and loss differences, and its example count."""

    partition_id: int
    num_examples: int
    steps: Sequence[ScalarStep]
    base_loss: float


@dataclass(frozen=True)
class RoundSummary:
    """What :meth:`ZOServer.apply_round` did."""

    clients: int
    distinct_seeds: int
    grad_norm: float
    train_loss: float


class ZOServer:
    """Global model state of a zeroth-order run and its update rule.

    Parameters
    ----------
    cfg : RunConfig
        Validated run configuration.
    model : nn.Module
        The global model at θ0, already masked.
    mask : Mask
        Its pruning mask.
    """

    def __init__(self, cfg: RunConfig, model: nn.Module, mask: Mask) -> None:
        self.cfg = cfg
        self.model = model
        self.mask = mask
        self.space = KeptSpace(model, mask)
        self.settings = zo_settings(cfg)
        self.optimizer = ServerOptimizer(self.space.gather(model), optimizer_settings(cfg))
        self.last_update: RoundUpdate | None = None
        # The updates of the last rounds, for nodes that replay them (downlink = replay).
        self.history: deque[RoundUpdate] = deque(maxlen=cfg.replay_history)

    def round_seed(self, server_round: int) -> int:
        """The seed broadcast in ``server_round``."""
        return round_seed(self.cfg.seed, server_round)

    def expected_seeds(self, server_round: int, partition_id: int) -> list[int]:
        """The step seeds a client of ``partition_id`` must use in ``server_round``."""
        return client_step_seeds(
            self.round_seed(server_round), self.cfg.seed_mode, partition_id, self.cfg.local_steps
        )

    def kept_values(self) -> torch.Tensor:
        """Current kept coordinates (what clients receive)."""
        return self.optimizer.weights

    def apply_round(self, updates: Sequence[ClientUpdate], server_round: int = 0) -> RoundSummary:
        """Aggregate the round's updates and take one server optimizer step.

        The step's inputs are kept in :attr:`last_update` (a :class:`RoundUpdate` for round
        ``server_round``), from which a client holding the previous weights can take the same
        step (:class:`fedzo_flwr.zo.replay.ReplayState`).

        Updates are processed in partition order so the floating-point sums do not depend on
        arrival order. Clients with identical seeds are merged before reconstruction, unless
        each client's estimate is clipped (``clip-scope = client``): then every client is its
        own group, and the replay downlink carries every client's coefficients.
        """
        if not updates:
            raise ValueError("updates must hold at least one client update")
        updates = sorted(updates, key=lambda u: u.partition_id)
        groups: dict[tuple[int, ...], list[ClientUpdate]] = defaultdict(list)
        for update in updates:
            groups[tuple(step.seed for step in update.steps)].append(update)
        weight_of = dict(
            zip(
                (u.partition_id for u in updates),
                client_weights(
                    [u.num_examples for u in updates], self.cfg.weighting, self.cfg.max_client_share
                ),
                strict=True,
            )
        )
        total_weight = sum(weight_of.values())
        opt = self.optimizer.settings
        seed_groups = (
            self._client_groups(updates, weight_of, total_weight)
            if opt.group_clip > 0
            else self._merged_groups(groups, weight_of, total_weight)
        )
        grad = round_gradient(
            self.space.sizes, seed_groups, self.settings, opt.group_clip, opt.clip_norm
        )
        grad_norm = float(torch.linalg.vector_norm(grad))
        self.optimizer.step(grad)
        self.space.scatter_(self.model, self.optimizer.weights)
        self.last_update = RoundUpdate(
            server_round, tuple(seed_groups), kept_hash(self.optimizer.weights)
        )
        if self.cfg.downlink == "replay":
            self.history.append(self.last_update)
        train_loss = float(
            np.average([u.base_loss for u in updates], weights=[u.num_examples for u in updates])
        )
        return RoundSummary(len(updates), len(groups), grad_norm, train_loss)

    def _merged_groups(
        self,
        groups: dict[tuple[int, ...], list[ClientUpdate]],
        weight_of: dict[int, float],
        total_weight: float,
    ) -> list[SeedGroup]:
        """One group per distinct seeds: the members' scalars aggregated before reconstruction."""
        seed_groups = []
        for seeds, members in groups.items():
            weights = [weight_of[m.partition_id] for m in members]
            coefficients = np.stack(
                [
                    step_coefficients(
                        aggregate_deltas(
                            [m.steps[j].deltas for m in members],
                            weights,
                            self.cfg.k,
                            method=self.cfg.aggregation,
                            trim_fraction=self.cfg.trim_fraction,
                        ),
                        self.settings,
                    )
                    for j in range(len(seeds))
                ]
            )
            seed_groups.append(SeedGroup(sum(weights) / total_weight, seeds, coefficients))
        return seed_groups

    def _client_groups(
        self, updates: Sequence[ClientUpdate], weight_of: dict[int, float], total_weight: float
    ) -> list[SeedGroup]:
        """One group per client (``clip-scope = client``: each estimate is clipped alone)."""
        return [
            SeedGroup(
                weight_of[u.partition_id] / total_weight,
                tuple(step.seed for step in u.steps),
                np.stack([step_coefficients(step.deltas, self.settings) for step in u.steps]),
            )
            for u in updates
        ]

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state (kept weights, moments, EMA, step count) and the replay history."""
        return {
            **self.optimizer.state_dict(),
            "history": [update_state(update) for update in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and write the weights into the model."""
        self.optimizer.load_state_dict(state)
        self.history.clear()
        self.history.extend(update_from_state(s) for s in state.get("history", []))
        self.last_update = self.history[-1] if self.history else None
        self.space.scatter_(self.model, self.optimizer.weights)

    def updates_since(self, applied_round: int, server_round: int) -> list[RoundUpdate] | None:
        """The updates of rounds ``applied_round + 1 .. server_round - 1``, oldest first.

        Rounds that were skipped (no update: the weights did not change) are simply absent.
        ``None`` when some of the rounds may have left the bounded history (or were never in
        it): the node then needs the full weights.
        """
        if applied_round + 1 >= server_round:
            return []
        if not self.history or applied_round + 1 < self.history[0].server_round:
            return None
        return [u for u in self.history if applied_round < u.server_round < server_round]

    def eval_model(self) -> nn.Module:
        """The model to evaluate: EMA weights if enabled, else the current ones."""
        self.space.scatter_(self.model, self.optimizer.eval_weights)
        return self.model

    def restore_training_weights(self) -> None:
        """Undo :meth:`eval_model`'s EMA swap."""
        self.space.scatter_(self.model, self.optimizer.weights)
