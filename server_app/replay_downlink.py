"""The replay downlink (``downlink = replay``): which nodes get round updates instead of weights.

The server remembers, per node, the round whose resulting weights the node holds
(``applied``). A node it has never served, one that reported ``replay-mismatch``, one further
behind than the server's history, or one for which the missed rounds would cost more bytes than
the weights themselves gets the full kept weights (plus, for a stateful server optimizer, its
per-coordinate buffers and step count, so the node can take the same steps later). Every other
node gets only the ``(seed, coefficients)`` of the rounds it missed, and rebuilds the weights
itself (:class:`fedzo_flwr.zo.replay.ReplayState`).

A node's ``applied`` round advances only when the server sees a valid reply (it then held the
weights the round was trained on); a node that applied updates but whose reply was lost simply
receives some rounds it already has, which it skips.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord

from fedzo_flwr import protocol
from fedzo_flwr.protocol.replay import encode_updates, encoded_nbytes
from fedzo_flwr.zo.replay import OPTIMIZER_PREFIX
from fedzo_flwr.zo.server import ZOServer
from server_app.logs import log

WEIGHTS = "weights"
REPLAY = "replay"


class ReplayDownlink:
    """Per-node bookkeeping of the replay downlink.

    Parameters
    ----------
    server : ZOServer
        The global model; its :attr:`~ZOServer.history` holds the recent round updates.
    """

    def __init__(self, server: ZOServer) -> None:
        self.server = server
        self.applied: dict[int, int] = {}
        self.sent: dict[int, tuple[str, int]] = {}  # node -> (path, round) of this round

    def payload(
        self, node_id: int, server_round: int, weights: ArrayRecord
    ) -> tuple[ArrayRecord | None, dict[str, bytes | int]]:
        """What ``node_id`` receives in ``server_round``: the weights record, or replay bytes."""
        applied = self.applied.get(node_id)
        if applied is not None:
            updates = self.server.updates_since(applied, server_round)
            if updates is not None and encoded_nbytes(updates) < 4 * self.server.space.dim:
                self.sent[node_id] = (REPLAY, server_round)
                return None, {protocol.REPLAY_KEY: encode_updates(updates)}
        self.sent[node_id] = (WEIGHTS, server_round)
        return weights, {protocol.OPTIMIZER_STEPS_KEY: self.server.optimizer.steps}

    def full_weights(self) -> ArrayRecord:
        """Kept weights and the optimizer's per-coordinate buffers (what a new node needs)."""
        arrays = {protocol.KEPT_KEY: Array(self.server.kept_values().numpy().copy())}
        state = self.server.optimizer.optimizer.state_dict()["state"].get(0, {})
        for name, value in state.items():
            arrays[f"{OPTIMIZER_PREFIX}{name}"] = Array(np.array(value.detach().numpy()))
        return ArrayRecord(arrays)

    def confirm(self, node_id: int, server_round: int) -> None:
        """``node_id`` replied validly in ``server_round``: it holds the weights after the last."""
        self.applied[node_id] = server_round - 1

    def forget(self, node_id: int, reason: str) -> None:
        """``node_id`` cannot replay (``replay-mismatch``): full weights next time."""
        if self.applied.pop(node_id, None) is not None:
            log(INFO, "Node %d gets the full weights next round: %s", node_id, reason)

    def round_paths(self, node_partition: dict[int, int]) -> dict[str, str]:
        """The path each node of this round took, keyed by partition (``-node`` if unknown)."""
        return {str(node_partition.get(node, -node)): path for node, (path, _) in self.sent.items()}
