"""The FedAvg baseline (``method = "fedavg"``): backprop clients, masked or dense, same records.

:class:`MaskedFedAvg` is a :class:`~server_app.masked_rounds.MaskedRounds`. Each round it samples
nodes exactly as ``FedZO`` does (same seeds), sends them the global model's kept coordinates (the
pruned weights are 0 and are not sent; the mask bitmap goes once per node, as for ``FedZO``),
averages the returned kept coordinates with the weights of :mod:`fedzo_flwr.aggregation`
(``weighting`` and ``max-client-share``, as the zeroth-order server does), writes them back and
re-applies the mask. With density 1 it is plain
dense FedAvg. Central evaluation, ``results.json`` fields (measured bytes, client seconds and peak
memory, FLOPs, density) and ``model.pt`` match the zeroth-order runs, so the two are compared like
for like. ``forward_flops`` of a FedAvg client-round counts its forward **and** backward passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log as flower_log
from flwr.serverapp import Grid
from torch import nn

from fedzo_flwr import protocol
from fedzo_flwr.aggregation import client_weights
from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import DatasetArrays
from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.measure.flops import forward_backward_flops
from fedzo_flwr.progressive.memory import full_backprop_memory
from fedzo_flwr.protocol import validate
from fedzo_flwr.run.results import RunRecorder, per_client_summary
from fedzo_flwr.seeding import round_seed
from fedzo_flwr.sparse.mask import Mask, apply_mask_
from fedzo_flwr.sparse.space import KeptSpace
from server_app.logs import log
from server_app.masked_rounds import MaskedRounds, RoundUpdate
from server_app.memory_gate import MemoryGate

#: Metrics every FedAvg train reply carries (``extra-mem-bytes``, ``steps`` and, after the first
#: contact, ``num-partitions`` are optional).
FEDAVG_METRICS = (
    "num-examples",
    "train-loss",
    "train-examples",
    "client-seconds",
    "peak-mem-bytes",
    "partition-id",
)


@dataclass(frozen=True)
class BackpropReply:
    """The validated metrics of a backprop train reply (FedAvg and progressive replies).

    Attributes
    ----------
    partition_id : int
        The partition the node trained on.
    num_partitions : int or None
        The node's partition count, when the reply carries it.
    num_examples : int
        The aggregation weight the node claims (capped by the strategy where it knows more).
    train_loss : float
        Mean mini-batch loss of the round.
    train_examples, steps : int
        Examples processed and optimizer steps taken.
    seconds : float
        Client compute time of the round.
    peak_mem_bytes, extra_mem_bytes : int
        The node's memory readings.
    """

    partition_id: int
    num_partitions: int | None
    num_examples: int
    train_loss: float
    train_examples: int
    steps: int
    seconds: float
    peak_mem_bytes: int
    extra_mem_bytes: int


@dataclass(frozen=True)
class FedAvgReply(BackpropReply):
    """A validated FedAvg train reply: the metrics and the uploaded kept weights."""

    kept: np.ndarray  # the uploaded kept weights: finite float32 (dim,)


def parse_fedavg_reply(
    arrays: Mapping[str, Array], metrics: Mapping[str, object], dim: int
) -> FedAvgReply:
    """Validate a FedAvg train reply: exactly the kept weights and the metrics.

    Raises
    ------
    ReplyRejected
        A missing or mistyped metric, a value out of range, or kept weights that are not
        exactly ``dim`` finite float32 values under the single key ``kept``.
    """
    common = validate.client_metrics(metrics)
    train_loss = validate.require_float(metrics, "train-loss", low=0.0, high=validate.MAX_LOSS)
    train_examples = validate.require_int(metrics, "train-examples", low=0, high=validate.MAX_INT)
    steps = validate.require_int(metrics, "steps", low=0, high=validate.MAX_INT, default=0)
    if list(arrays.keys()) != [protocol.KEPT_KEY]:
        raise ReplyRejected(f"reply arrays must be exactly '{protocol.KEPT_KEY}'")
    array = arrays[protocol.KEPT_KEY]
    if tuple(array.shape) != (dim,) or array.dtype != "float32":
        raise ReplyRejected(
            f"kept weights must be float32 ({dim},), got {array.dtype} {tuple(array.shape)}"
        )
    kept = validate.float32_vector(array.numpy(), "kept", dim=dim)
    return FedAvgReply(
        partition_id=common.partition_id,
        num_partitions=common.num_partitions,
        num_examples=common.num_examples,
        train_loss=train_loss,
        train_examples=train_examples,
        steps=steps,
        seconds=common.seconds,
        peak_mem_bytes=common.peak_mem_bytes,
        extra_mem_bytes=common.extra_mem_bytes,
        kept=kept,
    )


def weighted_mean(values: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``Σ w_i / Σ w · v_i`` in float32, accumulated as Flower's ``aggregate_arrayrecords`` does.

    Same operations in the same order, so with uncapped example weights the result is bit for
    bit Flower's FedAvg.
    """
    total = sum(weights)
    out = values[0] * (weights[0] / total)
    for value, weight in zip(values[1:], weights[1:], strict=True):
        out += value * (weight / total)
    return out


class MaskedFedAvg(MaskedRounds[FedAvgReply]):
    """FedAvg over the kept coordinates of a (possibly pruned) model.

    Parameters
    ----------
    cfg : RunConfig
        Validated run config (``method = "fedavg"``).
    model : nn.Module
        The global model at θ0, already masked; updated in place every round.
    mask : Mask
        Its mask (dense for density 1).
    recorder : RunRecorder
        Where per-round results go.
    test_data : DatasetArrays
        Test split for central evaluation.
    flops_per_example : int
        Forward + backward FLOPs of one training example under the mask.
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        mask: Mask,
        recorder: RunRecorder,
        test_data: DatasetArrays,
        flops_per_example: int,
    ) -> None:
        super().__init__(cfg, mask, KeptSpace(model, mask), recorder, test_data)
        self.model = model
        self.flops_per_example = flops_per_example
        # Memory-heterogeneous population (memory-profile): only nodes that fit full backprop.
        self.full_need = 0
        if cfg.memory_profile != "none":
            self.full_need = full_backprop_memory(model, cfg.batch_size).total_bytes
        self.gate = MemoryGate.for_run(
            cfg, self.full_need, self.full_need, "full_need_bytes", "full-model backprop"
        )

    @classmethod
    def for_model(
        cls,
        cfg: RunConfig,
        model: nn.Module,
        mask: Mask,
        recorder: RunRecorder,
        test_data: DatasetArrays,
    ) -> MaskedFedAvg:
        """The strategy for ``model``, with its forward+backward FLOPs per example measured."""
        input_shape = tuple(test_data.x_test.shape[1:][::-1])  # HWC -> CHW
        fb = forward_backward_flops(model, mask, input_shape=input_shape).sparse
        return cls(cfg, model, mask, recorder, test_data, fb)

    def kept_values(self) -> torch.Tensor:
        """The global model's kept coordinates."""
        return self.space.gather(self.model)

    def summary(self) -> None:
        """Log the strategy's configuration."""
        cfg = self.cfg
        flower_log(
            INFO,
            "\t├── MaskedFedAvg: %s, density %.4f (%s), %d kept coordinates",
            cfg.model,
            cfg.effective_density,
            cfg.prune_method if cfg.pruned else "dense",
            self.space.dim,
        )
        steps = (
            f"{cfg.local_batches} batches" if cfg.local_batches else f"{cfg.local_epochs} epochs"
        )
        flower_log(
            INFO,
            "\t└── local %s of %s (lr %g, batch %d) per round",
            steps,
            cfg.client_optimizer,
            cfg.local_lr,
            cfg.batch_size,
        )

    # ------------------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the kept weights, the round seed and (once) the mask.

        With a ``memory-profile``, new nodes are probed first (:mod:`server_app.node_info`)
        and only nodes whose budget fits full-model backprop are sampled (:meth:`eligible`).
        """
        if self.gate is not None:
            self.gate.probe_new(grid, server_round)
        node_ids = self.round_nodes(grid, server_round)
        seed = round_seed(self.cfg.seed, server_round)
        messages = self.train_messages(server_round, seed, arrays, config, node_ids)
        log(INFO, "configure_train: %d nodes (FedAvg)", len(messages))
        return messages

    def eligible(self, node_id: int) -> bool:
        """Every node, or with a ``memory-profile`` a probed node that fits full backprop.

        The need is the analytic full-model figure of
        :func:`~fedzo_flwr.progressive.memory.full_backprop_memory` at ``batch-size``, times
        ``1 + memory-margin`` (:class:`~server_app.memory_gate.MemoryGate`), the same rule the
        progressive methods apply per stage and the zeroth-order methods to their client step.
        """
        return self.gate is None or self.gate.fits(node_id)

    def round_fields(self) -> dict[str, object]:
        """With a ``memory-profile``: the need, the nodes that cannot fit it and the probe."""
        return {} if self.gate is None else self.gate.round_fields()

    def parse_train_reply(self, server_round: int, node_id: int, reply: Message) -> FedAvgReply:
        """Exactly the kept weights (finite float32 of the right size) and the metrics."""
        metrics = reply.content.metric_records.get(protocol.METRICS_KEY)
        arrays = reply.content.array_records.get(protocol.ARRAYS_KEY)
        if metrics is None or arrays is None or len(reply.content.array_records) != 1:
            raise ReplyRejected("reply needs exactly the 'arrays' and 'metrics' records")
        missing = [key for key in FEDAVG_METRICS if key not in metrics]
        if missing:
            raise ReplyRejected(f"reply lacks metrics {missing}")
        return parse_fedavg_reply(arrays, metrics, self.space.dim)

    def aggregate(self, server_round: int, replies: Mapping[int, FedAvgReply]) -> RoundUpdate:
        """Average the kept weights as ``weighting`` and ``max-client-share`` say; re-mask.

        The weights are :func:`fedzo_flwr.aggregation.client_weights`, the rule the zeroth-order
        server uses: by example count (each claim bounded by the partition size learned at first
        contact) or uniform, any one client's share capped at ``max-client-share``. Partitions
        are averaged in partition order, so arrival order does not matter.
        """
        ordered = [replies[pid] for pid in sorted(replies)]
        weights = client_weights(
            [r.num_examples for r in ordered], self.cfg.weighting, self.cfg.max_client_share
        )
        kept = weighted_mean([r.kept for r in ordered], weights)
        self.space.scatter_(self.model, torch.from_numpy(kept.copy()))
        apply_mask_(self.model, self.mask)
        train_loss = float(
            np.average([r.train_loss for r in ordered], weights=[r.num_examples for r in ordered])
        )
        steps = {pid: r.steps for pid, r in replies.items()}
        return RoundUpdate(train_loss, {"local_steps": per_client_summary(steps)})

    def client_flops(self, reply: FedAvgReply) -> int:
        """Examples trained x forward+backward FLOPs per example."""
        return reply.train_examples * self.flops_per_example

    # ------------------------------------------------------------------ evaluate, save

    @contextmanager
    def evaluation_model(self) -> Iterator[nn.Module]:
        """The global model itself (FedAvg keeps no separate evaluation weights)."""
        yield self.model

    def setup_fields(self) -> dict[str, object]:
        """Forward+backward FLOPs per example, and how FedAvg FLOPs are counted."""
        return {
            "backprop_flops_per_example": self.flops_per_example,
            "flops_note": (
                "FedAvg: forward_flops per client-round = examples trained x forward+backward "
                "FLOPs per example (FlopCounterMode conv/linear FLOPs scaled by each layer's kept "
                "fraction; loss and optimizer update not counted)"
            ),
        }
