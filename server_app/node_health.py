"""Setting aside nodes that keep failing, and retrying them with exponential back-off.

A misconfigured node (wrong ``data-dir``, a partition another node holds, a crashed device)
would otherwise be sampled, sent the model (and the mask) and rejected every round. After
``max-node-failures`` failed rounds in a row (an error reply, a rejected reply or no reply at
all), :class:`NodeHealth` sets the node aside for 1 round; each further failure of a retry
doubles the pause (1, 2, 4, ... rounds, at most :data:`MAX_BACKOFF_ROUNDS`). A valid reply
resets the node's record. ``max-node-failures = 0`` never sets a node aside.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING

from server_app.logs import log

#: The longest pause, in rounds, between two retries of a failing node.
MAX_BACKOFF_ROUNDS = 64


@dataclass
class _Record:
    failures: int = 0  # failed rounds in a row
    pauses: int = 0  # times set aside since the last success
    resume_round: int = 0  # first round it may be sampled again


class NodeHealth:
    """Consecutive failures per node and the round each set-aside node is retried.

    Parameters
    ----------
    max_failures : int
        Failed rounds in a row after which a node is set aside (0: never).
    """

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.records: dict[int, _Record] = {}

    def available(self, node_id: int, server_round: int) -> bool:
        """Whether ``node_id`` may be sampled in ``server_round``."""
        record = self.records.get(node_id)
        return record is None or server_round >= record.resume_round

    def set_aside(self) -> list[int]:
        """Nodes that have been set aside at least once since their last success."""
        return sorted(node for node, r in self.records.items() if r.pauses)

    def succeeded(self, node_id: int) -> None:
        """A valid reply: forget the node's failures."""
        self.records.pop(node_id, None)

    def failed(self, node_id: int, server_round: int, reason: str) -> None:
        """A failed round of ``node_id``: set it aside when it has failed too often in a row."""
        if not self.max_failures:
            return
        record = self.records.setdefault(node_id, _Record())
        record.failures += 1
        if record.failures < self.max_failures:
            return
        pause = min(2**record.pauses, MAX_BACKOFF_ROUNDS)
        record.pauses += 1
        record.resume_round = server_round + pause + 1
        log(
            WARNING,
            "Node %d failed %d rounds in a row (last: %s); set aside for %d round%s, "
            "retried in round %d",
            node_id,
            record.failures,
            reason,
            pause,
            "" if pause == 1 else "s",
            record.resume_round,
        )
