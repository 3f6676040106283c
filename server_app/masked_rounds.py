"""What every strategy of a pruned model does each round, whatever the clients compute.

:class:`MaskedRounds` (a ``FedAvg``) is the common base of ``FedZO`` (seeds and scalars) and
``MaskedFedAvg`` (the backprop baseline). It owns everything the two share: the nodes of a round
are sampled reproducibly after a bounded wait, every node gets the global model's kept
coordinates and the round seed, the mask bitmap travels once per node (again only after the node
reports, with a status code, that it lost it), each message's serialized size is measured,
replies are traced back to the node they answer and screened, the round record and the returned
metrics are built, and the run's setup, central evaluation and final ``model.pt`` are written.
"""

from __future__ import annotations

import io
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import DatasetArrays
from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.files import atomic_write_bytes
from fedzo_flwr.measure.flops import forward_flops
from fedzo_flwr.protocol import validate as v
from fedzo_flwr.protocol.wire import encode_mask, mask_nbytes, sparse_weights_nbytes
from fedzo_flwr.run.evaluation import evaluate
from fedzo_flwr.run.results import RunRecorder, per_client_summary
from fedzo_flwr.sparse.mask import Mask, kept_count, layer_densities, mask_density, total_count
from fedzo_flwr.sparse.space import KeptSpace
from server_app.identity import Claim, PartitionRegistry
from server_app.logs import log
from server_app.message_size import SizeCache, message_nbytes
from server_app.node_health import NodeHealth
from server_app.nodes import sample_evaluate_nodes, sample_round_nodes, wait_for_nodes


class ClientReply(Protocol):
    """What every validated train reply reports, whatever the method."""

    @property
    def partition_id(self) -> int:
        """The partition the client trained on (one reply per partition and round)."""

    @property
    def seconds(self) -> float:
        """Client compute time of the round."""

    @property
    def peak_mem_bytes(self) -> int:
        """Peak memory the client measured."""

    @property
    def extra_mem_bytes(self) -> int:
        """Memory the client needed beyond the model's weights."""

    @property
    def num_examples(self) -> int:
        """The partition size the client reports (bounded by the size learned first)."""

    @property
    def num_partitions(self) -> int | None:
        """The node's partition count, if the reply reports it (at first contact)."""


ReplyT = TypeVar("ReplyT", bound=ClientReply)

#: ``payload(node_id) -> (arrays or None, extra config)``: one node's train-message content.
Payload = Callable[[int], tuple[ArrayRecord | None, Mapping[str, bytes | int | str]]]


@dataclass(frozen=True)
class RoundUpdate:
    """The outcome of a method's aggregation step.

    Attributes
    ----------
    train_loss : float
        The round's training loss (recorded and returned to Flower).
    fields : dict
        Method-specific fields of the round record (e.g. ``grad_norm``).
    """

    train_loss: float
    fields: dict[str, object] = field(default_factory=dict)


class MaskedRounds(FedAvg, Generic[ReplyT]):
    """The shared round loop and bookkeeping of the strategies of a masked model.

    A method (``FedZO``, ``MaskedFedAvg``, or a new one) subclasses it and supplies only what
    differs:

    * :meth:`configure_train`: which nodes train (``round_nodes``, then any method-specific
      filter) and their messages (``train_messages``, plus ``first_contact_config`` for extra
      first-contact keys);
    * :meth:`parse_train_reply`: turn one reply that is neither an error nor a status reply into
      a validated reply object (a :class:`ClientReply`), or raise ``ReplyRejected`` with the
      reason; it reads every field through :mod:`fedzo_flwr.protocol.validate` (anything else
      it raises is still caught here and counted as a rejection, logged with its type);
    * :meth:`aggregate`: step the global model with the round's valid replies (one per
      partition) and return a :class:`RoundUpdate`;
    * :meth:`kept_values`, :meth:`evaluation_model`, :meth:`client_flops`,
      :meth:`setup_fields`, and optionally :meth:`eligible`, :meth:`accept_reply`,
      :meth:`round_fields`, :meth:`optimizer_state`, :meth:`after_round`.

    Everything else is done here, once: error replies and status codes (a node that lost its
    mask is dropped from ``nodes_with_mask`` and gets the mask with its next train message),
    rejections counted with node id and reason, no exception from reply content leaving
    ``aggregate_train`` / ``aggregate_evaluate``, partition identity (a partition is bound to the
    node that claimed it first, with its size and the federation's partition count:
    :class:`~server_app.identity.PartitionRegistry`), duplicate partitions refused, nodes that
    keep failing set aside with back-off (:class:`~server_app.node_health.NodeHealth`), the skip
    path (fewer than ``min-clients`` valid replies: model unchanged, ``"skipped": true``), the round
    record (measured bytes, clients, rejections, per-client seconds, peak and extra memory and
    FLOPs, ``train_loss``, ``round_seconds``), bounded and seeded federated evaluation, central
    evaluation with its log line, the run's setup record and the final ``model.pt``.

    Parameters
    ----------
    cfg : RunConfig
        The validated run config (sampling, timeouts, evaluation fraction).
    mask : Mask
        The run's mask (dense for density 1).
    space : KeptSpace
        The kept coordinates of the model under ``mask``.
    recorder : RunRecorder
        Where the setup and per-round results go.
    test_data : DatasetArrays
        Test split for central evaluation.
    start_round : int
        Rounds already done (when resuming); ``Strategy.start`` counts from 1, the strategy
        numbers rounds ``start_round + 1 ...``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        mask: Mask,
        space: KeptSpace,
        recorder: RunRecorder,
        test_data: DatasetArrays,
        start_round: int = 0,
    ) -> None:
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
        self.mask = mask
        self.space = space
        self.recorder = recorder
        self.test_data = test_data
        self.start_round = start_round
        self.mask_bytes = encode_mask(mask)
        self.mask_id = protocol.mask_id(self.mask_bytes)
        self.nodes_with_mask: set[int] = set()
        self.registry = PartitionRegistry()
        self.health = NodeHealth(cfg.max_node_failures)
        self.round_downlink: dict[int, int] = {}
        self.message_node: dict[str, int] = {}
        self.round_started = 0.0
        self.rejected_total = 0
        self.rejected_evaluations = 0

    # ----------------------------------------------------------------- method hooks

    @abstractmethod
    def parse_train_reply(self, server_round: int, node_id: int, reply: Message) -> ReplyT:
        """Validate one train reply of ``node_id``; raise ``ReplyRejected`` if it is unusable."""

    @abstractmethod
    def aggregate(self, server_round: int, replies: Mapping[int, ReplyT]) -> RoundUpdate:
        """Step the global model with the valid replies, keyed by partition id."""

    @abstractmethod
    def kept_values(self) -> torch.Tensor:
        """The global model's kept coordinates (what clients receive)."""

    @abstractmethod
    def evaluation_model(self) -> AbstractContextManager[nn.Module]:
        """The model to evaluate or save, for the duration of a ``with`` block."""

    @abstractmethod
    def client_flops(self, reply: ReplyT) -> int:
        """FLOPs the client of ``reply`` spent on its round."""

    @abstractmethod
    def setup_fields(self) -> dict[str, object]:
        """Method-specific fields of the setup record (FLOPs of a client-round, notes)."""

    def eligible(self, node_id: int) -> bool:
        """Whether ``node_id`` may train this round (every connected node, unless overridden)."""
        return True

    def accept_reply(self, node_id: int, reply: ReplyT) -> None:
        """Called for each valid reply before aggregation (e.g. to learn a node's budget)."""

    def round_fields(self) -> dict[str, object]:
        """Method-specific fields of every round record, skipped rounds included."""
        return {}

    def optimizer_state(self) -> dict[str, Any] | None:
        """The server optimizer's state, saved in ``model.pt`` (``None``: no server optimizer)."""
        return None

    def after_round(self, server_round: int) -> None:
        """Called after each round's central evaluation (e.g. to write a checkpoint)."""

    def on_status(self, node_id: int, code: str, detail: str) -> None:
        """Called for every status reply (after the base handled ``mask-missing``)."""

    def resumable_checkpoint(self) -> Path | None:
        """The checkpoint a run can resume from (``None``: the method cannot resume)."""
        return None

    # ----------------------------------------------------------------------- sampling

    def round_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """The eligible nodes of ``server_round``: ``clients-per-round`` of them, or all.

        Starts the round's clock (``round_seconds`` includes the wait for nodes).
        """
        self.round_started = time.perf_counter()
        connected = wait_for_nodes(grid, self.min_available_nodes, self.cfg.round_timeout)
        available = [
            node
            for node in connected
            if self.health.available(node, server_round) and self.eligible(node)
        ]
        return sample_round_nodes(
            available, self.cfg.clients_per_round, self.cfg.seed, server_round
        )

    # ----------------------------------------------------------------------- messages

    def kept_arrays(self) -> ArrayRecord:
        """The global model's kept coordinates as the ArrayRecord clients receive."""
        return ArrayRecord({protocol.KEPT_KEY: Array(self.kept_values().numpy().copy())})

    def first_contact_config(self) -> dict[str, bytes | int]:
        """Extra config a node receives the first time (the mask; subclasses add to it)."""
        return {protocol.MASK_KEY: self.mask_bytes}

    def message_records(self, node_id: int) -> Mapping[str, ArrayRecord]:
        """Extra ArrayRecords of ``node_id``'s train message (none, unless overridden)."""
        return {}

    def train_messages(
        self,
        server_round: int,
        round_seed: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: Iterable[int],
        payload: Payload | None = None,
    ) -> list[Message]:
        """One train message per node; records each message's measured size and its node.

        ``payload(node_id)`` may replace the shared ``arrays`` for one node (``None``: no
        ArrayRecord at all) and add config keys; by default every node gets ``arrays``.
        :meth:`message_records` may add further ArrayRecords (e.g. a stage's frozen tensors).
        """
        messages: list[Message] = []
        self.round_downlink, self.message_node = {}, {}
        sizes = SizeCache()  # the nodes share one ArrayRecord: serialize it once
        for node_id in node_ids:
            node_arrays, extra = (arrays, {}) if payload is None else payload(node_id)
            node_config = ConfigRecord(dict(config))
            node_config[protocol.ROUND_KEY] = server_round
            node_config[protocol.ROUND_SEED_KEY] = round_seed
            node_config[protocol.MASK_ID_KEY] = self.mask_id
            if node_id not in self.nodes_with_mask:
                for key, value in self.first_contact_config().items():
                    node_config[key] = value
            for key, item in extra.items():
                node_config[key] = item
            records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
                protocol.CONFIG_KEY: node_config
            }
            if node_arrays is not None:
                records = {protocol.ARRAYS_KEY: node_arrays, **records}
            records.update(self.message_records(node_id))
            message = Message(
                content=RecordDict(records),
                message_type=MessageType.TRAIN,
                dst_node_id=node_id,
            )
            self.round_downlink[node_id] = message_nbytes(message, sizes)
            self.message_node[message.object_id] = node_id
            messages.append(message)
        return messages

    # ------------------------------------------------------------------------ replies

    def reply_node(self, reply: Message) -> int:
        """The node a reply comes from.

        Error replies made by the SuperLink (e.g. node unavailable) carry the SuperLink's own id
        as sender, so the node is looked up by the message the reply answers.
        """
        return self.message_node.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def screen(self, reply: Message, node_id: int) -> None:
        """Raise ``ReplyRejected`` for an error reply or a status reply.

        A status code is read from the ``status`` record (type-checked); ``mask-missing`` drops
        ``node_id`` from ``nodes_with_mask``, so its next train message carries the mask again.
        """
        if reply.has_error():
            raise ReplyRejected(f"client error: {reply.error.reason}")
        record = reply.content.config_records.get(protocol.STATUS_KEY)
        if record is None:
            return
        status = protocol.parse_status(record)
        if status.code == protocol.STATUS_MASK_MISSING:
            self.nodes_with_mask.discard(node_id)
        self.on_status(node_id, status.code, status.detail)
        raise ReplyRejected(f"{status.code}: {status.detail}")

    def valid_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[dict[int, ReplyT], dict[int, int], list[dict[str, object]]]:
        """The round's valid replies and measured uplink, both by partition, and the rejections.

        Every reply is handled inside one guard: a ``ReplyRejected`` (or any other exception
        its content provokes) rejects that reply alone. A sampled node that sent no reply, or a
        rejected one, has failed the round (:attr:`health`); a valid reply clears its record.
        """
        valid: dict[int, ReplyT] = {}
        uplink: dict[int, int] = {}
        rejected: list[dict[str, object]] = []
        answered: set[int] = set()
        for reply in replies:
            node_id = self.reply_node(reply)
            answered.add(node_id)
            try:
                parsed, size = self._checked_reply(server_round, node_id, reply, valid)
            except Exception as err:  # content must never end the run
                reason = v.rejection_reason(err)
                log(
                    WARNING,
                    "Round %d: rejected reply from node %d: %s",
                    server_round,
                    node_id,
                    reason,
                )
                rejected.append({"node_id": node_id, "reason": reason})
                self.health.failed(node_id, server_round, reason)
                continue
            self.nodes_with_mask.add(node_id)
            self.registry.bind(node_id, claim_of(parsed))
            self.health.succeeded(node_id)
            self.accept_reply(node_id, parsed)
            valid[parsed.partition_id] = parsed
            uplink[parsed.partition_id] = size
        for node_id in self.round_downlink:
            if node_id not in answered:
                self.health.failed(node_id, server_round, "no reply")
        self.rejected_total += len(rejected)
        return valid, uplink, rejected

    def _checked_reply(
        self, server_round: int, node_id: int, reply: Message, valid: Mapping[int, ReplyT]
    ) -> tuple[ReplyT, int]:
        """One reply validated end to end (content, identity, duplicates) and its size."""
        self.screen(reply, node_id)
        parsed = self.parse_train_reply(server_round, node_id, reply)
        if node_id not in self.nodes_with_mask and parsed.num_partitions is None:
            raise ReplyRejected("a first reply must report 'num-partitions'")
        self.registry.check(node_id, claim_of(parsed))
        if parsed.partition_id in valid:
            raise ReplyRejected(f"partition {parsed.partition_id} already replied this round")
        return parsed, message_nbytes(reply)

    def round_bytes(self, uplink: dict[int, int]) -> dict[str, object]:
        """``downlink_bytes`` and ``uplink_bytes`` summaries of the round, keyed by partition.

        A node that never replied validly has no known partition and is keyed ``-node_id``.
        """
        downlink = {
            self.registry.partition.get(node, -node): size
            for node, size in self.round_downlink.items()
        }
        return {
            "downlink_bytes": per_client_summary(downlink),
            "uplink_bytes": per_client_summary(uplink),
        }

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen and parse the replies, aggregate the valid ones, record the round."""
        server_round += self.start_round
        valid, uplink, rejected = self.valid_replies(server_round, list(replies))
        entry: dict[str, Any] = {
            **self.round_bytes(uplink),
            "density": self.cfg.effective_density,
            "clients": len(valid),
            "rejected": rejected,
            **self.round_fields(),
        }
        if len(valid) < self.cfg.min_clients:
            log(
                WARNING,
                "Round %d skipped: %d valid replies, min-clients is %d; model unchanged",
                server_round,
                len(valid),
                self.cfg.min_clients,
            )
            entry["skipped"] = True
            entry["round_seconds"] = time.perf_counter() - self.round_started
            self.recorder.update_round(server_round, **entry)
            return None, None
        update = self.aggregate(server_round, valid)
        entry.update(
            client_seconds=per_client_summary({pid: r.seconds for pid, r in valid.items()}),
            client_peak_mem_bytes=per_client_summary(
                {pid: r.peak_mem_bytes for pid, r in valid.items()}
            ),
            client_extra_mem_bytes=per_client_summary(
                {pid: r.extra_mem_bytes for pid, r in valid.items()}
            ),
            forward_flops=per_client_summary(
                {pid: self.client_flops(r) for pid, r in valid.items()}
            ),
            train_loss=update.train_loss,
            **update.fields,
            round_seconds=time.perf_counter() - self.round_started,
        )
        self.recorder.update_round(server_round, **entry)
        metrics = MetricRecord(
            {
                "train-loss": update.train_loss,
                "clients": len(valid),
                "uplink-bytes": entry["uplink_bytes"]["total"],
                "downlink-bytes": entry["downlink_bytes"]["total"],
            }
        )
        return self.kept_arrays(), metrics

    # ------------------------------------------------------------ federated evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation (``fraction-evaluate`` > 0) on a seeded sample of the nodes.

        ``ceil(fraction-evaluate x connected)`` nodes (at least 1), drawn from the
        ``evaluate_sample_seed`` stream after a wait bounded by ``round-timeout``; the message
        names the mask (``mask-id``) the node must hold.
        """
        if self.cfg.fraction_evaluate <= 0:
            return []
        server_round += self.start_round
        connected = wait_for_nodes(
            grid, self.min_available_nodes, self.cfg.round_timeout, "evaluation"
        )
        node_ids = sample_evaluate_nodes(
            connected, self.cfg.fraction_evaluate, self.cfg.seed, server_round
        )
        config = ConfigRecord(dict(config))  # Strategy.start passes the same record every round
        config[protocol.ROUND_KEY] = server_round
        config[protocol.MASK_ID_KEY] = self.mask_id
        content = RecordDict({protocol.ARRAYS_KEY: arrays, protocol.CONFIG_KEY: config})
        messages = [
            Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node_id)
            for node_id in node_ids
        ]
        self.message_node = {m.object_id: m.metadata.dst_node_id for m in messages}
        log(INFO, "configure_evaluate: %d of %d nodes", len(messages), len(connected))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of the valid evaluation replies' loss and accuracy."""
        server_round += self.start_round
        valid: list[RecordDict] = []
        for reply in replies:
            node_id = self.reply_node(reply)
            try:
                self.screen(reply, node_id)
                valid.append(RecordDict({protocol.METRICS_KEY: evaluation_metrics(reply)}))
            except Exception as err:  # content must never end the run
                self.rejected_evaluations += 1
                log(
                    WARNING,
                    "Round %d: rejected evaluation reply from node %d: %s",
                    server_round,
                    node_id,
                    v.rejection_reason(err),
                )
        if not valid:
            return None
        return self.evaluate_metrics_aggr_fn(valid, self.weighted_by_key)

    # -------------------------------------------------------------- central evaluation

    def is_evaluation_round(self, server_round: int) -> bool:
        """Round 0, every ``eval-every`` rounds, and the last round."""
        last = server_round == self.cfg.num_server_rounds
        return server_round == 0 or last or server_round % self.cfg.eval_every == 0

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``Strategy.start``'s ``evaluate_fn``: central test-set evaluation and the log line."""
        if server_round == 0 and self.start_round:
            return None  # evaluated before the checkpoint was taken
        server_round += self.start_round
        metrics, accuracy = None, None
        if self.is_evaluation_round(server_round):
            with self.evaluation_model() as model:
                loss, accuracy = evaluate(
                    model, self.test_data.x_test, self.test_data.y_test, self.cfg.dataset
                )
            self.recorder.update_round(server_round, accuracy=accuracy, loss=loss)
            metrics = MetricRecord({"accuracy": accuracy, "loss": loss})
        self.log_round(server_round, accuracy)
        self.after_round(server_round)
        return metrics

    def log_round(self, server_round: int, accuracy: float | None) -> None:
        """One line per round: accuracy (when evaluated), loss, clients, bytes, seconds."""
        if server_round == 0:
            log(INFO, "round 0: accuracy %.4f (initial model)", accuracy or 0.0)
            return
        entry = self.recorder.round_entry(server_round)
        acc = "" if accuracy is None else f"accuracy {accuracy:.4f}, "
        log(
            INFO,
            "round %d/%d: %strain-loss %.4f, %d clients, up %d B, down %d B, %.2fs",
            server_round,
            self.cfg.num_server_rounds,
            acc,
            entry.get("train_loss", float("nan")),
            entry.get("clients", 0),
            entry.get("uplink_bytes", {}).get("total", 0),
            entry.get("downlink_bytes", {}).get("total", 0),
            entry.get("round_seconds", 0.0),
        )

    # ---------------------------------------------------------------------------- run

    def record_setup(self, prune_seconds: float) -> None:
        """Write the setup record: mask, sizes, FLOPs (common fields, then the method's)."""
        input_shape = tuple(self.test_data.x_test.shape[1:][::-1])  # HWC -> CHW
        with self.evaluation_model() as model:
            flops = forward_flops(model, self.mask, input_shape=input_shape)
        self.recorder.set_setup(
            density=mask_density(self.mask),
            kept_weights=kept_count(self.mask),
            prunable_weights=total_count(self.mask),
            kept_coordinates=self.space.dim,
            layer_densities=layer_densities(self.mask),
            prune_seconds=prune_seconds,
            mask_bytes=mask_nbytes(self.mask),
            sparse_weights_bytes=sparse_weights_nbytes(self.space),
            forward_flops_per_example={"dense": flops.dense, "sparse": flops.sparse},
            **self.setup_fields(),
        )

    def save_model(self, path: Path) -> None:
        """Write ``model.pt`` atomically: config, model state, mask and optimizer state."""
        with self.evaluation_model() as model:
            buffer = io.BytesIO()
            torch.save(
                {
                    "config": self.cfg.to_run_config(),
                    "model_state": {k: v.clone() for k, v in model.state_dict().items()},
                    "mask": self.mask,
                    "optimizer": self.optimizer_state(),
                },
                buffer,
            )
        atomic_write_bytes(path, buffer.getvalue())

    def run(
        self, grid: Grid, prune_seconds: float, registry: PartitionRegistry | None = None
    ) -> Path:
        """Record the setup, train to the end, write ``model.pt``, the results and the plot.

        ``final.model`` in ``results.json`` names ``model.pt`` and ``final.checkpoint`` the
        resumable checkpoint (``checkpoint.pt``; ``null`` for a method that cannot resume).
        ``registry`` carries the partition bindings of a pruning phase into the rounds.
        """
        if registry is not None:
            self.registry = registry
        self.record_setup(prune_seconds)
        started = time.perf_counter()
        self.start(
            grid=grid,
            initial_arrays=self.kept_arrays(),
            num_rounds=self.cfg.num_server_rounds - self.start_round,
            timeout=self.cfg.round_timeout,
            evaluate_fn=self.evaluate_global,
        )
        model_path = self.recorder.run_dir / "model.pt"
        self.save_model(model_path)
        checkpoint = self.resumable_checkpoint()
        final = self.recorder.finish(
            rounds=self.cfg.num_server_rounds,
            seconds=time.perf_counter() - started,
            rejected_replies=self.rejected_total,
            rejected_evaluation_replies=self.rejected_evaluations,
            model=str(model_path),
            checkpoint=None if checkpoint is None else str(checkpoint),
        )
        plot = self.recorder.plot()
        log(
            INFO,
            "%s finished: final accuracy %s; wrote %s, %s and %s",
            self.cfg.method,
            final.get("accuracy"),
            self.recorder.results_path,
            plot,
            model_path,
        )
        return model_path


def evaluation_metrics(reply: Message) -> MetricRecord:
    """The validated ``loss``, ``accuracy`` and ``num-examples`` of an evaluation reply.

    Raises
    ------
    ReplyRejected
        If the ``metrics`` record is missing, ``num-examples`` is not a positive int, or the
        loss or accuracy is not a finite number (loss in [0, 1e6], accuracy in [0, 1]).
    """
    metrics = reply.content.metric_records.get(protocol.METRICS_KEY)
    if metrics is None:
        raise ReplyRejected("reply lacks the 'metrics' record")
    examples = v.require_int(metrics, "num-examples", low=1, high=v.MAX_EXAMPLES)
    loss = v.require_float(metrics, "loss", low=0.0, high=v.MAX_LOSS)
    accuracy = v.require_float(metrics, "accuracy", low=0.0, high=1.0)
    return MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": examples})


def claim_of(reply: ClientReply) -> Claim:
    """What a validated reply claims about its node (for the partition registry)."""
    return Claim(reply.partition_id, reply.num_examples, reply.num_partitions)
