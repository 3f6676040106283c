"""FedZO: Flower strategy for server-side pruning and seed-based zeroth-order training."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
)
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedzo_flwr import protocol
from fedzo_flwr.data import DatasetArrays
from fedzo_flwr.protocol.wire import encode_mask
from fedzo_flwr.run.checkpoint import save_checkpoint
from fedzo_flwr.run.evaluation import evaluate
from fedzo_flwr.run.results import RunRecorder, per_client_summary
from fedzo_flwr.seeding import fingerprint_seed
from fedzo_flwr.zo.directions import fingerprint
from fedzo_flwr.zo.reconstruct import ScalarStep
from fedzo_flwr.zo.server import ClientUpdate, ZOServer
from server_app.masked_rounds import MaskedRounds
from server_app.message_size import message_nbytes


def kept_arrays(server: ZOServer) -> ArrayRecord:
    """The global model's kept coordinates as the ArrayRecord clients receive."""
    return ArrayRecord({protocol.KEPT_KEY: Array(server.kept_values().numpy().copy())})


class FedZO(MaskedRounds):
    """Seed-and-scalars federated zeroth-order training over a server-pruned model.

    Each round it samples nodes, sends them the kept weights and the round seed (and the mask
    bitmap, once per node), validates the replies' loss differences, reconstructs the update
    from ``(seed, scalars)`` pairs and steps the global model. The standard ``Strategy.start``
    loop drives it; ``evaluate_global`` is its ``evaluate_fn`` (central test-set evaluation).

    Parameters
    ----------
    server : ZOServer
        Global model state and update rule (Flower-free core).
    recorder : RunRecorder
        Where per-round results go.
    test_data : DatasetArrays
        Test split for central evaluation.
    forward_flops : int
        Forward FLOPs of one client-round (K+1 or 2K sparse forward passes x local steps).
    start_round : int
        Rounds already done (when resuming from a checkpoint); ``Strategy.start`` counts from 1,
        the strategy numbers rounds ``start_round + 1 ...``.
    """

    def __init__(
        self,
        server: ZOServer,
        recorder: RunRecorder,
        test_data: DatasetArrays,
        forward_flops: int,
        start_round: int = 0,
    ) -> None:
        super().__init__(server.cfg, encode_mask(server.mask))
        self.server = server
        self.recorder = recorder
        self.test_data = test_data
        self.forward_flops = forward_flops
        # Generator agreement: the fingerprint every node must reproduce at first contact.
        self.fingerprint_seed = fingerprint_seed(self.cfg.seed)
        self.expected_fingerprint = fingerprint(
            server.space.dim, self.fingerprint_seed, self.cfg.directions
        )
        self.refused_nodes: dict[int, str] = {}
        # Memory: each node's declared budget and the largest peak measured on any client.
        self.node_budget_bytes: dict[int, float] = {}
        self.required_bytes = 0.0
        self.skipped_for_memory: set[int] = set()
        self.start_round = start_round

    def summary(self) -> None:
        """Log the strategy's configuration."""
        cfg = self.cfg
        log(
            INFO,
            "\t├── FedZO (%s): K=%d σ=%g %s differences, %s directions, seed-mode %s",
            cfg.method,
            cfg.k,
            cfg.sigma,
            cfg.fd,
            cfg.directions,
            cfg.seed_mode,
        )
        log(
            INFO,
            "\t├── model %s, density %.4f, kept coordinates %d, mask %d bytes",
            cfg.model,
            cfg.effective_density,
            self.server.space.dim,
            len(self.mask_bytes),
        )
        log(
            INFO,
            "\t└── server optimizer %s lr %g, local steps %d",
            cfg.optimizer,
            cfg.lr,
            cfg.local_steps,
        )

    # ------------------------------------------------------------------------------ train

    def eligible(self, node_id: int) -> bool:
        """Not refused for a generator mismatch, and not below the measured memory need."""
        if node_id in self.refused_nodes:
            return False
        budget = self.node_budget_bytes.get(node_id)
        if budget is not None and self.required_bytes and budget < self.required_bytes:
            if node_id not in self.skipped_for_memory:
                log(
                    WARNING,
                    "Skipping node %d: its memory budget (%.0f MB) is below what a "
                    "client of this model needs (%.0f MB measured peak)",
                    node_id,
                    budget / 2**20,
                    self.required_bytes / 2**20,
                )
                self.skipped_for_memory.add(node_id)
            return False
        return True

    def first_contact_config(self) -> dict[str, bytes | int]:
        """The mask, and the seed of the generator fingerprint the node must return."""
        extra = {protocol.FINGERPRINT_SEED_KEY: self.fingerprint_seed}
        return {**super().first_contact_config(), **extra}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the kept weights, the round seed and (once) the mask."""
        server_round += self.start_round
        node_ids = self.round_nodes(grid, server_round)
        if len(node_ids) < self.cfg.min_clients:
            log(
                WARNING,
                "Round %d: only %d eligible nodes, min-clients is %d; skipping the round",
                server_round,
                len(node_ids),
                self.cfg.min_clients,
            )
            node_ids = []
        round_seed = self.server.round_seed(server_round)
        log(INFO, "configure_train: %d nodes, round seed %d", len(node_ids), round_seed)
        return self.train_messages(server_round, round_seed, arrays, config, node_ids)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, aggregate their scalars, step the global model."""
        server_round += self.start_round
        replies = list(replies)
        parsed: dict[int, protocol.ParsedReply] = {}
        uplink: dict[int, int] = {}
        rejected: list[dict[str, object]] = []
        for reply in replies:
            node_id = self.reply_node(reply)
            if reply.has_error():
                reason = reply.error.reason
                if protocol.MASK_MISSING in reason:
                    self.nodes_with_mask.discard(node_id)
                log(WARNING, "Round %d: node %d failed: %s", server_round, node_id, reason)
                rejected.append({"node_id": node_id, "reason": f"client error: {reason}"})
                continue
            try:
                zo = reply.content.config_records.get(protocol.ZO_KEY)
                metrics = reply.content.metric_records.get(protocol.METRICS_KEY)
                if zo is None or metrics is None:
                    raise protocol.ReplyRejected("reply lacks the 'zo' or 'metrics' record")
                partition_hint = int(metrics.get("partition-id", -1))
                result = protocol.parse_reply(
                    zo,
                    metrics,
                    server_round=server_round,
                    k=self.cfg.k,
                    local_steps=self.cfg.local_steps,
                    max_abs_delta=self.cfg.max_abs_delta,
                    expected_seeds=self.server.expected_seeds(server_round, partition_hint),
                )
                self._check_fingerprint(node_id, zo)
                if result.partition_id in parsed:
                    raise protocol.ReplyRejected(
                        f"partition {result.partition_id} already replied this round"
                    )
            except protocol.ReplyRejected as err:
                log(
                    WARNING, "Round %d: rejected reply from node %d: %s", server_round, node_id, err
                )
                rejected.append({"node_id": node_id, "reason": str(err)})
                continue
            self.accept(node_id, result.partition_id)
            self.required_bytes = max(self.required_bytes, float(result.peak_mem_bytes))
            budget_mb = metrics.get(protocol.MEMORY_BUDGET_KEY)
            if budget_mb:
                self.node_budget_bytes[node_id] = float(budget_mb) * 2**20
            parsed[result.partition_id] = result
            uplink[result.partition_id] = message_nbytes(reply)
        self.rejected_total += len(rejected)
        entry: dict[str, object] = {
            **self.round_bytes(uplink),
            "density": self.cfg.effective_density,
            "clients": len(parsed),
            "rejected": rejected,
            "refused_nodes": len(self.refused_nodes),
            "skipped_for_memory": sorted(self.skipped_for_memory),
        }
        if len(parsed) < self.cfg.min_clients:
            log(
                WARNING,
                "Round %d skipped: %d valid replies, min-clients is %d; model unchanged",
                server_round,
                len(parsed),
                self.cfg.min_clients,
            )
            entry["skipped"] = True
            self.recorder.update_round(server_round, **entry)
            return None, None
        updates = [
            ClientUpdate(
                pid,
                r.num_examples,
                [ScalarStep(seed, r.deltas[j]) for j, seed in enumerate(r.step_seeds)],
                r.base_loss,
            )
            for pid, r in parsed.items()
        ]
        summary = self.server.apply_round(updates)
        seconds = {pid: r.seconds for pid, r in parsed.items()}
        peaks = {pid: r.peak_mem_bytes for pid, r in parsed.items()}
        entry.update(
            client_seconds=per_client_summary(seconds),
            client_peak_mem_bytes=per_client_summary(peaks),
            client_extra_mem_bytes=per_client_summary(
                {pid: r.extra_mem_bytes for pid, r in parsed.items()}
            ),
            forward_flops=per_client_summary({pid: self.forward_flops for pid in parsed}),
            train_loss=summary.train_loss,
            grad_norm=summary.grad_norm,
            reconstructions=summary.distinct_seeds * self.cfg.local_steps,
            round_seconds=time.perf_counter() - self.round_started,
        )
        self.recorder.update_round(server_round, **entry)
        metrics = MetricRecord(
            {
                "train-loss": summary.train_loss,
                "clients": len(parsed),
                "uplink-bytes": entry["uplink_bytes"]["total"],  # type: ignore[index]
                "downlink-bytes": entry["downlink_bytes"]["total"],  # type: ignore[index]
            }
        )
        return kept_arrays(self.server), metrics

    def _check_fingerprint(self, node_id: int, zo: ConfigRecord) -> None:
        """Refuse a node whose direction generator disagrees with the server's."""
        if node_id in self.nodes_with_mask:
            return  # verified at first contact
        reported = zo.get(protocol.FINGERPRINT_KEY)
        if reported == self.expected_fingerprint:
            return
        reason = (
            f"direction generator disagrees with the server's (fingerprint {str(reported)[:12]} "
            f"vs {self.expected_fingerprint[:12]} for {self.cfg.directions} directions); "
            'use directions="rademacher" (bit-exact on every platform) or matching torch builds'
        )
        self.refused_nodes[node_id] = reason
        log(WARNING, "Refusing node %d: %s", node_id, reason)
        raise protocol.ReplyRejected(f"refused: {reason}")

    # ------------------------------------------------------------------------- evaluate

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Central evaluation every ``eval-every`` rounds and at the end; periodic checkpoints."""
        if server_round == 0 and self.start_round:
            return None  # evaluated before the checkpoint was taken
        server_round += self.start_round
        last = server_round == self.cfg.num_server_rounds
        metrics = None
        if server_round == 0 or last or server_round % self.cfg.eval_every == 0:
            loss, accuracy = evaluate(
                self.server.eval_model(),
                self.test_data.x_test,
                self.test_data.y_test,
                self.cfg.dataset,
            )
            self.server.restore_training_weights()
            self.recorder.update_round(server_round, accuracy=accuracy, loss=loss)
            metrics = MetricRecord({"accuracy": accuracy, "loss": loss})
        self._log_round(server_round, None if metrics is None else float(metrics["accuracy"]))
        every = self.cfg.checkpoint_every
        if server_round and (last or (every and server_round % every == 0)):
            self.save_checkpoint(server_round)
        return metrics

    @property
    def checkpoint_path(self) -> Path:
        """``<run dir>/checkpoint.pt``."""
        return self.recorder.run_dir / "checkpoint.pt"

    def save_checkpoint(self, server_round: int) -> None:
        """Write everything needed to resume after ``server_round`` (atomically)."""
        save_checkpoint(
            self.checkpoint_path,
            self.cfg,
            server_round,
            self.server.mask,
            self.server.state_dict(),
            self.recorder.data,
        )
        log(INFO, "[fedzo] checkpoint after round %d: %s", server_round, self.checkpoint_path)

    def _log_round(self, server_round: int, accuracy: float | None) -> None:
        if server_round == 0:
            log(INFO, "[fedzo] round 0: accuracy %.4f (initial model)", accuracy or 0.0)
            return
        entry = self.recorder.round_entry(server_round)
        up = entry.get("uplink_bytes", {}).get("total", 0)
        down = entry.get("downlink_bytes", {}).get("total", 0)
        acc = "" if accuracy is None else f"accuracy {accuracy:.4f}, "
        log(
            INFO,
            "[fedzo] round %d/%d: %strain-loss %.4f, %d clients, up %d B, down %d B, %.2fs",
            server_round,
            self.cfg.num_server_rounds,
            acc,
            entry.get("train_loss", float("nan")),
            entry.get("clients", 0),
            up,
            down,
            entry.get("round_seconds", 0.0),
        )
