"""What every strategy of a pruned model does each round, whatever the clients compute.

:class:`MaskedRounds` (a ``FedAvg``) is the common base of ``FedZO`` (seeds and scalars) and
``MaskedFedAvg`` (the backprop baseline): the nodes of a round are sampled reproducibly after a
bounded wait, every node gets the global model's kept coordinates and the round seed, the mask
bitmap travels once per node (again only after the node reports that it lost it), each message's
serialized size is measured, and replies are traced back to the node they answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.run.results import per_client_summary
from server_app.message_size import SizeCache, message_nbytes
from server_app.nodes import sample_round_nodes, wait_for_nodes


class MaskedRounds(FedAvg):
    """Node sampling, the once-per-node mask and measured bytes, for strategies of a masked model.

    Parameters
    ----------
    cfg : RunConfig
        The validated run config (sampling, timeouts, evaluation fraction).
    mask_bytes : bytes
        The encoded mask bitmap (:func:`fedzo_flwr.protocol.wire.encode_mask`).
    """

    def __init__(self, cfg: RunConfig, mask_bytes: bytes) -> None:
        wanted = cfg.clients_per_round or 1
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=wanted,
            min_evaluate_nodes=1,
            min_available_nodes=max(cfg.min_clients, wanted),
            arrayrecord_key=protocol.ARRAYS_KEY,
            configrecord_key=protocol.CONFIG_KEY,
        )
        self.cfg = cfg
        self.mask_bytes = mask_bytes
        self.mask_id = protocol.mask_id(mask_bytes)
        self.nodes_with_mask: set[int] = set()
        self.node_partition: dict[int, int] = {}
        self.round_downlink: dict[int, int] = {}
        self.message_node: dict[str, int] = {}
        self.round_started = 0.0
        self.rejected_total = 0

    # ----------------------------------------------------------------------- sampling

    def eligible(self, node_id: int) -> bool:
        """Whether ``node_id`` may train this round (every connected node, unless overridden)."""
        return True

    def round_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """The eligible nodes of ``server_round``: ``clients-per-round`` of them, or all.

        Starts the round's clock (``round_seconds`` includes the wait for nodes).
        """
        self.round_started = time.perf_counter()
        connected = wait_for_nodes(grid, self.min_available_nodes, self.cfg.round_timeout)
        available = [node for node in connected if self.eligible(node)]
        return sample_round_nodes(
            available, self.cfg.clients_per_round, self.cfg.seed, server_round
        )

    # ----------------------------------------------------------------------- messages

    def first_contact_config(self) -> dict[str, bytes | int]:
        """Extra config a node receives the first time (the mask; subclasses add to it)."""
        return {protocol.MASK_KEY: self.mask_bytes}

    def train_messages(
        self,
        server_round: int,
        round_seed: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: Iterable[int],
    ) -> list[Message]:
        """One train message per node; records each message's measured size and its node."""
        messages: list[Message] = []
        self.round_downlink, self.message_node = {}, {}
        sizes = SizeCache()  # the nodes share one ArrayRecord: serialize it once
        for node_id in node_ids:
            node_config = ConfigRecord(dict(config))
            node_config[protocol.ROUND_KEY] = server_round
            node_config[protocol.ROUND_SEED_KEY] = round_seed
            node_config[protocol.MASK_ID_KEY] = self.mask_id
            if node_id not in self.nodes_with_mask:
                for key, value in self.first_contact_config().items():
                    node_config[key] = value
            message = Message(
                content=RecordDict({protocol.ARRAYS_KEY: arrays, protocol.CONFIG_KEY: node_config}),
                message_type=MessageType.TRAIN,
                dst_node_id=node_id,
            )
            self.round_downlink[node_id] = message_nbytes(message, sizes)
            self.message_node[message.object_id] = node_id
            messages.append(message)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation (``fraction-evaluate`` > 0), with the mask id clients look up."""
        config[protocol.MASK_ID_KEY] = self.mask_id
        return super().configure_evaluate(server_round, arrays, config, grid)

    # ------------------------------------------------------------------------ replies

    def reply_node(self, reply: Message) -> int:
        """The node a reply comes from.

        Error replies made by the SuperLink (e.g. node unavailable) carry the SuperLink's own id
        as sender, so the node is looked up by the message the reply answers.
        """
        return self.message_node.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def accept(self, node_id: int, partition_id: int) -> None:
        """Record a valid reply of ``node_id`` (partition ``partition_id``): it holds the mask."""
        self.nodes_with_mask.add(node_id)
        self.node_partition[node_id] = partition_id

    def round_bytes(self, uplink: dict[int, int]) -> dict[str, object]:
        """``downlink_bytes`` and ``uplink_bytes`` summaries of the round, keyed by partition.

        A node that never replied validly has no known partition and is keyed ``-node_id``.
        """
        downlink = {
            self.node_partition.get(node, -node): size for node, size in self.round_downlink.items()
        }
        return {
            "downlink_bytes": per_client_summary(downlink),
            "uplink_bytes": per_client_summary(uplink),
        }
