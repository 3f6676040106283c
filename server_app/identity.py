"""Who a node is: its partition, that partition's size and the federation's partition count.

A node's reply *claims* a ``partition-id``, a ``num-examples`` and (at first contact) a
``num-partitions``; none of them can be verified, but they can be held to what the node said
first. :class:`PartitionRegistry` binds each partition id to the node whose valid reply claimed
it first, for the whole run, and learns at that moment the partition's size and the
federation's partition count. From then on it refuses:

* a reply of another node claiming a bound partition (the first node keeps working);
* a reply of a bound node claiming a different partition;
* a reply claiming more examples than the partition's size learned at first contact (a claim
  of 10**15 examples cannot buy a larger weight later);
* a reply whose ``num-partitions`` differs from the federation's (a node configured for another
  split would train on overlapping data).

The binding holds in simulation and deployment alike; a SuperNode that restarts with a new node
id cannot take its old partition back during the run (start it with a registered key, whose node
id is stable, or restart the run).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedzo_flwr.errors import ReplyRejected


@dataclass(frozen=True)
class Claim:
    """What one reply says about its node."""

    partition_id: int
    num_examples: int
    num_partitions: int | None = None


class PartitionRegistry:
    """Bindings of partitions to nodes, and the sizes learned at first contact.

    Parameters
    ----------
    num_partitions : int or None
        The federation's partition count if the run knows it; otherwise it is learned from the
        first valid reply that reports one.
    """

    def __init__(self, num_partitions: int | None = None) -> None:
        self.num_partitions = num_partitions
        self.owner: dict[int, int] = {}  # partition -> node
        self.partition: dict[int, int] = {}  # node -> partition
        self.examples: dict[int, int] = {}  # partition -> size learned at first contact

    def check(self, node_id: int, claim: Claim) -> None:
        """Raise ``ReplyRejected`` if ``claim`` contradicts what is known; change nothing."""
        pid = claim.partition_id
        owner = self.owner.get(pid)
        if owner is not None and owner != node_id:
            raise ReplyRejected(
                f"refused: partition {pid} belongs to node {owner}, which claimed it first"
            )
        bound = self.partition.get(node_id)
        if bound is not None and bound != pid:
            raise ReplyRejected(f"refused: node claimed partition {bound} first, now claims {pid}")
        if (
            claim.num_partitions is not None
            and self.num_partitions is not None
            and claim.num_partitions != self.num_partitions
        ):
            raise ReplyRejected(
                f"refused: num-partitions {claim.num_partitions} disagrees with the "
                f"federation's {self.num_partitions}"
            )
        if self.num_partitions is not None and pid >= self.num_partitions:
            raise ReplyRejected(
                f"refused: partition-id {pid} is not below the federation's num-partitions "
                f"{self.num_partitions}"
            )
        known = self.examples.get(pid)
        if known is not None and claim.num_examples > known:
            raise ReplyRejected(
                f"refused: num-examples {claim.num_examples} exceeds partition {pid}'s size "
                f"{known} learned at first contact"
            )

    def bind(self, node_id: int, claim: Claim) -> None:
        """Record a valid reply's claim (call only after :meth:`check` passed)."""
        self.owner.setdefault(claim.partition_id, node_id)
        self.partition.setdefault(node_id, claim.partition_id)
        self.examples.setdefault(claim.partition_id, claim.num_examples)
        if self.num_partitions is None and claim.num_partitions is not None:
            self.num_partitions = claim.num_partitions
