"""What the server knows of each node before it trains: partition, size, labels, memory budget.

A node's memory budget must be known before the node is first selected (a node that cannot fit
a stage must never be sent it), so every new node is **probed once** with a ``query.node_info``
message (:mod:`fedzo_flwr.protocol.progressive`). The node answers with its partition id, its
partition size, its label histogram and, if its node config sets one (a real deployment),
``memory-budget-mb``. The budget is that declared value, or else, in simulation, the node's
draw from ``memory-profile`` seeded by the partition id it reported
(:func:`fedzo_flwr.progressive.devices.device_budget`). Replies are untrusted and validated; a
node whose probe fails is logged and probed again at the next round (it is not eligible
meanwhile).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.progressive.devices import device_budget
from fedzo_flwr.progressive.selector import NodeInfo
from fedzo_flwr.protocol import progressive as keys
from server_app.logs import log
from server_app.message_size import message_nbytes

_MIB = 1 << 20


@dataclass(frozen=True)
class NodeProfile:
    """A probed node.

    Attributes
    ----------
    node_id, partition_id, num_examples : int
        Identity and partition size.
    budget_bytes : int or None
        Memory budget for training (``None`` = unlimited).
    source : str
        ``"node-config"`` (declared) or the device kind drawn from ``memory-profile``.
    label_histogram : tuple of float
        Examples per class.
    """

    node_id: int
    partition_id: int
    num_examples: int
    budget_bytes: int | None
    source: str
    label_histogram: tuple[float, ...]

    def info(self) -> NodeInfo:
        """The selector's view of the node."""
        return NodeInfo(self.node_id, self.budget_bytes, self.label_histogram)


def _int(metrics: object, key: str, low: int) -> int:
    value = metrics.get(key) if hasattr(metrics, "get") else None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ReplyRejected(f"node-info '{key}' must be an int >= {low}, got {value!r:.40}")
    return value


class NodeRegistry:
    """The probed nodes of a run and their budgets.

    Parameters
    ----------
    cfg : RunConfig
        ``memory-profile``, ``memory-seed``, ``device-proportions``, ``device-usable-share``.
    full_need_bytes : int
        The full model's analytic training need (``profl-uniform``'s unit).
    num_classes : int
        Length of a valid label histogram.
    """

    def __init__(self, cfg: RunConfig, full_need_bytes: int, num_classes: int) -> None:
        self.cfg = cfg
        self.full_need_bytes = full_need_bytes
        self.num_classes = num_classes
        self.profiles: dict[int, NodeProfile] = {}
        self.failures: dict[int, str] = {}

    def parse(self, node_id: int, reply: Message) -> NodeProfile:
        """Validate one node-info reply (raises ``ReplyRejected``)."""
        if reply.has_error():
            raise ReplyRejected(f"client error: {reply.error.reason}")
        metrics = reply.content.metric_records.get(protocol.METRICS_KEY)
        if metrics is None:
            raise ReplyRejected("node-info reply lacks the 'metrics' record")
        partition_id = _int(metrics, "partition-id", 0)
        num_examples = _int(metrics, "num-examples", 1)
        histogram = metrics.get(keys.LABEL_HISTOGRAM_KEY)
        if (
            not isinstance(histogram, list)
            or len(histogram) != self.num_classes
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in histogram)
            or sum(histogram) != num_examples
        ):
            raise ReplyRejected(
                f"node-info '{keys.LABEL_HISTOGRAM_KEY}' must be {self.num_classes} ints >= 0 "
                f"summing to num-examples ({num_examples})"
            )
        declared = metrics.get(protocol.MEMORY_BUDGET_KEY)
        if declared is not None:
            if (
                isinstance(declared, bool)
                or not isinstance(declared, (int, float))
                or not math.isfinite(declared)
                or declared <= 0
            ):
                raise ReplyRejected(
                    f"{protocol.MEMORY_BUDGET_KEY} must be a finite number > 0, got {declared!r}"
                )
            budget: int | None = int(declared * _MIB)
            source = "node-config"
        else:
            cfg = self.cfg
            device = device_budget(
                cfg.memory_profile,
                partition_id,
                self.full_need_bytes,
                seed=cfg.memory_seed,
                proportions=cfg.device_proportions_list,
                usable_share=cfg.device_usable_share,
            )
            budget, source = device.budget_bytes, device.kind
        taken = [p.node_id for p in self.profiles.values() if p.partition_id == partition_id]
        if taken and taken != [node_id]:
            raise ReplyRejected(f"partition {partition_id} is already held by node {taken[0]}")
        return NodeProfile(
            node_id, partition_id, num_examples, budget, source, tuple(map(float, histogram))
        )

    def probe(self, grid: Grid, node_ids: Iterable[int], server_round: int) -> dict[str, int]:
        """Probe the nodes not known yet; return the probe's node count and measured bytes."""
        new = [n for n in node_ids if n not in self.profiles]
        if not new:
            return {"nodes": 0, "downlink_bytes": 0, "uplink_bytes": 0}
        messages, of_message = [], {}
        for node_id in new:
            config = ConfigRecord({protocol.ROUND_KEY: server_round})
            message = Message(
                content=RecordDict({protocol.CONFIG_KEY: config}),
                message_type=f"{MessageType.QUERY}.{keys.NODE_INFO_ACTION}",
                dst_node_id=node_id,
            )
            of_message[message.object_id] = node_id
            messages.append(message)
        down = sum(message_nbytes(m) for m in messages)
        replies = list(grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        up = 0
        answered = set()
        for reply in replies:
            node_id = of_message.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node_id not in of_message.values():
                continue
            up += message_nbytes(reply)
            answered.add(node_id)
            try:
                profile = self.parse(node_id, reply)
            except ReplyRejected as err:
                self.failures[node_id] = str(err)
                log(WARNING, "Round %d: node-info of node %d: %s", server_round, node_id, err)
                continue
            self.profiles[node_id] = profile
            self.failures.pop(node_id, None)
            budget = (
                "unlimited"
                if profile.budget_bytes is None
                else (f"{profile.budget_bytes / _MIB:.1f} MiB")
            )
            log(
                INFO,
                "node %d: partition %d, %d examples, memory budget %s (%s)",
                node_id,
                profile.partition_id,
                profile.num_examples,
                budget,
                profile.source,
            )
        for node_id in set(new) - answered:
            self.failures[node_id] = "no node-info reply"
            log(WARNING, "Round %d: no node-info reply from node %d", server_round, node_id)
        return {"nodes": len(new), "downlink_bytes": down, "uplink_bytes": up}

    def fits(self, node_id: int, need_bytes: int, margin: float) -> bool:
        """Whether a probed node's budget covers ``need_bytes x (1 + margin)``."""
        profile = self.profiles.get(node_id)
        if profile is None:
            return False
        return profile.budget_bytes is None or profile.budget_bytes >= need_bytes * (1 + margin)

    def infos(self, node_ids: Iterable[int]) -> list[NodeInfo]:
        """The selector's view of the probed nodes among ``node_ids``."""
        return [self.profiles[n].info() for n in node_ids if n in self.profiles]
