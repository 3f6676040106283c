"""The FedAvg baseline (``method = "fedavg"``): backprop clients, masked or dense, same records.

:class:`MaskedFedAvg` subclasses Flower's ``FedAvg``. Each round it samples nodes exactly as
``FedZO`` does (same seeds), sends them the global model's kept coordinates (the pruned weights
are 0 and are not sent; the mask bitmap goes once per node, as for ``FedZO``), lets Flower's own
``FedAvg.aggregate_train`` average the returned kept coordinates weighted by ``num-examples``,
writes them back and re-applies the mask. With density 1 it is plain dense FedAvg. Central
evaluation, ``results.json`` fields (measured bytes, client seconds and peak memory, FLOPs,
density) and ``model.pt`` match the zeroth-order runs, so the two are compared like for like.
``forward_flops`` of a FedAvg client-round counts its forward **and** backward passes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import nn

from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import DatasetArrays
from fedzo_flwr.files import atomic_write_bytes
from fedzo_flwr.measure.flops import forward_backward_flops, forward_flops
from fedzo_flwr.protocol.wire import encode_mask, mask_nbytes, sparse_weights_nbytes
from fedzo_flwr.run.evaluation import evaluate
from fedzo_flwr.run.results import RunRecorder, per_client_summary
from fedzo_flwr.seeding import round_seed
from fedzo_flwr.sparse.mask import (
    Mask,
    apply_mask_,
    kept_count,
    layer_densities,
    mask_density,
    total_count,
)
from fedzo_flwr.sparse.space import KeptSpace
from server_app.masked_rounds import MaskedRounds
from server_app.message_size import message_nbytes

#: Metrics every FedAvg train reply carries.
FEDAVG_METRICS = (
    "num-examples",
    "train-loss",
    "train-examples",
    "client-seconds",
    "peak-mem-bytes",
    "partition-id",
)


class MaskedFedAvg(MaskedRounds):
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
        super().__init__(cfg, encode_mask(mask))
        self.model = model
        self.mask = mask
        self.space = KeptSpace(model, mask)
        self.recorder = recorder
        self.test_data = test_data
        self.flops_per_example = flops_per_example

    def kept_arrays(self) -> ArrayRecord:
        """The global model's kept coordinates as the ArrayRecord clients receive."""
        kept = self.space.gather(self.model).numpy().copy()
        return ArrayRecord({protocol.KEPT_KEY: Array(kept)})

    def summary(self) -> None:
        """Log the strategy's configuration."""
        cfg = self.cfg
        log(
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
        log(
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
        """Send each sampled node the kept weights, the round seed and (once) the mask."""
        node_ids = self.round_nodes(grid, server_round)
        seed = round_seed(self.cfg.seed, server_round)
        messages = self.train_messages(server_round, seed, arrays, config, node_ids)
        log(INFO, "configure_train: %d nodes (FedAvg)", len(messages))
        return messages

    def _check(self, reply: Message) -> MetricRecord:
        if reply.has_error():
            raise ValueError(f"client error: {reply.error.reason}")
        metrics = reply.content.metric_records.get(protocol.METRICS_KEY)
        arrays = reply.content.array_records.get(protocol.ARRAYS_KEY)
        if metrics is None or arrays is None or len(reply.content.array_records) != 1:
            raise ValueError("reply needs exactly the 'arrays' and 'metrics' records")
        missing = [key for key in FEDAVG_METRICS if key not in metrics]
        if missing:
            raise ValueError(f"reply lacks metrics {missing}")
        if not isinstance(metrics["num-examples"], int) or int(metrics["num-examples"]) < 1:
            raise ValueError("num-examples must be a positive int")
        if list(arrays.keys()) != [protocol.KEPT_KEY]:
            raise ValueError(f"reply arrays must be exactly '{protocol.KEPT_KEY}'")
        kept = arrays[protocol.KEPT_KEY].numpy()
        if kept.shape != (self.space.dim,) or kept.dtype != np.float32:
            raise ValueError(f"kept weights must be float32 ({self.space.dim},), got {kept.shape}")
        if not np.all(np.isfinite(kept)):
            raise ValueError("kept weights contain NaN or inf")
        return metrics

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid replies, average the rest with ``FedAvg``, re-apply the mask."""
        valid: list[Message] = []
        rejected: list[dict[str, object]] = []
        per_client: dict[int, MetricRecord] = {}
        uplink: dict[int, int] = {}
        for reply in list(replies):
            node_id = self.reply_node(reply)
            try:
                metrics = self._check(reply)
                pid = int(metrics["partition-id"])  # type: ignore[call-overload]
                if pid in per_client:
                    raise ValueError(f"partition {pid} already replied this round")
            except ValueError as err:
                if protocol.MASK_MISSING in str(err):
                    self.nodes_with_mask.discard(node_id)
                log(
                    WARNING, "Round %d: rejected reply from node %d: %s", server_round, node_id, err
                )
                rejected.append({"node_id": node_id, "reason": str(err)})
                continue
            self.accept(node_id, pid)
            per_client[pid] = metrics
            uplink[pid] = message_nbytes(reply)
            valid.append(reply)
        self.rejected_total += len(rejected)
        entry: dict[str, object] = {
            **self.round_bytes(uplink),
            "density": self.cfg.effective_density,
            "clients": len(valid),
            "rejected": rejected,
        }
        if len(valid) < self.cfg.min_clients or not valid:
            log(WARNING, "Round %d skipped: %d valid replies", server_round, len(valid))
            entry["skipped"] = True
            self.recorder.update_round(server_round, **entry)
            return None, None
        arrays, _ = super().aggregate_train(server_round, valid)
        assert arrays is not None
        kept = np.asarray(arrays[protocol.KEPT_KEY].numpy(), dtype=np.float32)
        self.space.scatter_(self.model, torch.from_numpy(kept.copy()))
        apply_mask_(self.model, self.mask)
        examples = {pid: int(m["num-examples"]) for pid, m in per_client.items()}  # type: ignore[call-overload]
        train_loss = float(
            np.average(
                [float(m["train-loss"]) for m in per_client.values()],  # type: ignore[arg-type]
                weights=list(examples.values()),
            )
        )
        entry.update(
            client_seconds=per_client_summary(
                {pid: float(m["client-seconds"]) for pid, m in per_client.items()}  # type: ignore[arg-type]
            ),
            client_peak_mem_bytes=per_client_summary(
                {pid: int(m["peak-mem-bytes"]) for pid, m in per_client.items()}  # type: ignore[call-overload]
            ),
            client_extra_mem_bytes=per_client_summary(
                {pid: int(m.get("extra-mem-bytes", 0)) for pid, m in per_client.items()}  # type: ignore[call-overload]
            ),
            forward_flops=per_client_summary(
                {
                    pid: int(m["train-examples"]) * self.flops_per_example  # type: ignore[call-overload]
                    for pid, m in per_client.items()
                }
            ),
            local_steps=per_client_summary(
                {pid: int(m.get("steps", 0)) for pid, m in per_client.items()}  # type: ignore[call-overload]
            ),
            train_loss=train_loss,
            round_seconds=time.perf_counter() - self.round_started,
        )
        self.recorder.update_round(server_round, **entry)
        metrics = MetricRecord(
            {
                "train-loss": train_loss,
                "clients": len(valid),
                "uplink-bytes": entry["uplink_bytes"]["total"],  # type: ignore[index]
                "downlink-bytes": entry["downlink_bytes"]["total"],  # type: ignore[index]
            }
        )
        return self.kept_arrays(), metrics

    # ------------------------------------------------------------------------- evaluate

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Central test-set evaluation every ``eval-every`` rounds, at round 0 and at the end."""
        last = server_round == self.cfg.num_server_rounds
        if not (server_round == 0 or last or server_round % self.cfg.eval_every == 0):
            return None
        loss, accuracy = evaluate(
            self.model, self.test_data.x_test, self.test_data.y_test, self.cfg.dataset
        )
        self.recorder.update_round(server_round, accuracy=accuracy, loss=loss)
        entry = self.recorder.round_entry(server_round)
        log(
            INFO,
            "[fedzo] round %d/%d (fedavg): accuracy %.4f, train-loss %.4f, up %d B, down %d B",
            server_round,
            self.cfg.num_server_rounds,
            accuracy,
            entry.get("train_loss", float("nan")),
            entry.get("uplink_bytes", {}).get("total", 0),
            entry.get("downlink_bytes", {}).get("total", 0),
        )
        return MetricRecord({"accuracy": accuracy, "loss": loss})


def run_fedavg(
    grid: Grid,
    cfg: RunConfig,
    model: nn.Module,
    mask: Mask,
    prune_seconds: float,
    test_data: DatasetArrays,
    recorder: RunRecorder,
) -> Path:
    """Run the FedAvg baseline to the end; write ``model.pt``, the final results and the plot."""
    input_shape = tuple(test_data.x_test.shape[1:][::-1])  # HWC -> CHW
    flops = forward_flops(model, mask, input_shape=input_shape)
    fb = forward_backward_flops(model, mask, input_shape=input_shape).sparse
    strategy = MaskedFedAvg(cfg, model, mask, recorder, test_data, fb)
    recorder.set_setup(
        density=mask_density(mask),
        kept_weights=kept_count(mask),
        prunable_weights=total_count(mask),
        kept_coordinates=strategy.space.dim,
        layer_densities=layer_densities(mask),
        prune_seconds=prune_seconds,
        mask_bytes=mask_nbytes(mask),
        sparse_weights_bytes=sparse_weights_nbytes(strategy.space),
        forward_flops_per_example={"dense": flops.dense, "sparse": flops.sparse},
        backprop_flops_per_example=fb,
        flops_note=(
            "FedAvg: forward_flops per client-round = examples trained x forward+backward FLOPs "
            "per example (FlopCounterMode conv/linear FLOPs scaled by each layer's kept "
            "fraction; loss and optimizer update not counted)"
        ),
    )
    started = time.perf_counter()
    strategy.start(
        grid=grid,
        initial_arrays=strategy.kept_arrays(),
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        evaluate_fn=strategy.evaluate_global,
    )
    checkpoint = recorder.run_dir / "model.pt"
    buffer = io.BytesIO()
    torch.save(
        {
            "config": cfg.to_run_config(),
            "model_state": {k: v.clone() for k, v in model.state_dict().items()},
            "mask": mask,
            "optimizer": None,
        },
        buffer,
    )
    atomic_write_bytes(checkpoint, buffer.getvalue())
    recorder.finish(
        rounds=cfg.num_server_rounds,
        seconds=time.perf_counter() - started,
        rejected_replies=strategy.rejected_total,
        checkpoint=str(checkpoint),
    )
    recorder.plot()
    return checkpoint
