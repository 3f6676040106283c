"""FedZO: Flower strategy for server-side pruning and seed-based zeroth-order training."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log as flower_log
from flwr.serverapp import Grid
from torch import nn

from fedzo_flwr import protocol
from fedzo_flwr.data import DatasetArrays
from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.progressive.memory import full_backprop_memory
from fedzo_flwr.protocol.validate import MAX_PARTITIONS
from fedzo_flwr.run.checkpoint import save_checkpoint
from fedzo_flwr.run.results import RunRecorder
from fedzo_flwr.seeding import fingerprint_seed
from fedzo_flwr.zo.client_need import ZOClientNeed, zo_client_need
from fedzo_flwr.zo.directions import fingerprint
from fedzo_flwr.zo.reconstruct import ScalarStep
from fedzo_flwr.zo.server import ClientUpdate, ZOServer
from server_app.logs import log
from server_app.masked_rounds import MaskedRounds, RoundUpdate
from server_app.memory_gate import MemoryGate
from server_app.replay_downlink import ReplayDownlink


def kept_arrays(server: ZOServer) -> ArrayRecord:
    """The global model's kept coordinates as the ArrayRecord clients receive."""
    return ArrayRecord({protocol.KEPT_KEY: Array(server.kept_values().numpy().copy())})


class FedZO(MaskedRounds[protocol.ParsedReply]):
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
        Forward FLOPs of one client-round (K+1 or 2K+1 sparse forward passes x local steps).
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
        super().__init__(server.cfg, server.mask, server.space, recorder, test_data, start_round)
        self.server = server
        self.forward_flops = forward_flops
        # Generator agreement: the fingerprint every node must reproduce at first contact.
        self.fingerprint_seed = fingerprint_seed(self.cfg.seed)
        self.expected_fingerprint = fingerprint(
            server.space.sizes, self.fingerprint_seed, self.cfg.directions
        )
        self.refused_nodes: dict[int, str] = {}
        # downlink = replay: nodes that hold the previous weights get the missed rounds' updates.
        self.replay = ReplayDownlink(server) if self.cfg.downlink == "replay" else None
        self.current_round = 0
        # Memory: each node's declared budget and the largest peak measured on any client.
        self.node_budget_bytes: dict[int, float] = {}
        self.required_bytes = 0.0
        self.skipped_for_memory: set[int] = set()
        # Memory-heterogeneous population (memory-profile): only nodes that fit a client step.
        self.zo_need: ZOClientNeed | None = None
        self.gate: MemoryGate | None = None
        if self.cfg.memory_profile != "none":
            input_shape = tuple(test_data.x_test.shape[1:][::-1])  # HWC -> CHW
            self.zo_need = zo_client_need(self.cfg, server.model, server.mask, input_shape)
            full_need = full_backprop_memory(server.model, self.cfg.batch_size).total_bytes
            self.gate = MemoryGate(
                self.cfg,
                self.zo_need.total_bytes,
                full_need,
                "zo_need_bytes",
                f"a zeroth-order client step ({self.cfg.engine} engine)",
            )

    def summary(self) -> None:
        """Log the strategy's configuration."""
        cfg = self.cfg
        flower_log(
            INFO,
            "\t├── FedZO (%s): K=%d σ=%g %s differences, %s directions, seed-mode %s",
            cfg.method,
            cfg.k,
            cfg.sigma,
            cfg.fd,
            cfg.directions,
            cfg.seed_mode,
        )
        flower_log(
            INFO,
            "\t├── model %s, density %.4f, kept coordinates %d, mask %d bytes",
            cfg.model,
            cfg.effective_density,
            self.server.space.dim,
            len(self.mask_bytes),
        )
        flower_log(
            INFO,
            "\t└── server optimizer %s lr %g, local steps %d",
            cfg.optimizer,
            cfg.lr,
            cfg.local_steps,
        )

    # ------------------------------------------------------------------------------ train

    def eligible(self, node_id: int) -> bool:
        """Not refused for a generator mismatch, and not below the memory need.

        With a ``memory-profile``, a probed node must fit the analytic need of a client step
        with the configured engine (:func:`~fedzo_flwr.zo.client_need.zo_client_need`) times
        ``1 + memory-margin`` (:class:`~server_app.memory_gate.MemoryGate`, FedAvg's rule). A
        node that declared a budget in its replies must also fit the largest peak measured on
        any client.
        """
        if node_id in self.refused_nodes:
            return False
        if self.gate is not None and not self.gate.fits(node_id):
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
        if self.gate is not None:  # budgets before sampling: a misfit is never sent a round
            self.gate.probe_new(grid, server_round)
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
        self.current_round = server_round
        if self.replay is None:
            return self.train_messages(server_round, round_seed, arrays, config, node_ids)
        replay = self.replay
        replay.sent = {}
        weights = replay.full_weights()

        def payload(node_id: int) -> tuple[ArrayRecord | None, dict[str, bytes | int]]:
            if node_id not in self.nodes_with_mask:  # first contact, or the node lost its state
                replay.forget(node_id, "the node does not hold the mask")
            return replay.payload(node_id, server_round, weights)

        messages = self.train_messages(server_round, round_seed, weights, config, node_ids, payload)
        paths = [path for path, _ in replay.sent.values()]
        log(
            INFO,
            "downlink: %d nodes replay their missed rounds, %d get the weights",
            paths.count("replay"),
            paths.count("weights"),
        )
        return messages

    def parse_train_reply(
        self, server_round: int, node_id: int, reply: Message
    ) -> protocol.ParsedReply:
        """Validate the loss differences, seeds and metrics; check the fingerprint once."""
        zo = reply.content.config_records.get(protocol.ZO_KEY)
        metrics = reply.content.metric_records.get(protocol.METRICS_KEY)
        if zo is None or metrics is None:
            raise ReplyRejected("reply lacks the 'zo' or 'metrics' record")
        # The seeds are derived from the claimed partition; parse_reply refuses a bad claim.
        hint = metrics.get("partition-id")
        expected: list[int] | None = None
        if isinstance(hint, int) and not isinstance(hint, bool) and 0 <= hint < MAX_PARTITIONS:
            expected = self.server.expected_seeds(server_round, hint)
        result = protocol.parse_reply(
            zo,
            metrics,
            server_round=server_round,
            k=self.cfg.k,
            local_steps=self.cfg.local_steps,
            max_abs_delta=self.cfg.max_abs_delta,
            expected_seeds=expected,
        )
        self._check_fingerprint(node_id, zo)
        return result

    def accept_reply(self, node_id: int, reply: protocol.ParsedReply) -> None:
        """Learn the largest client peak and the node's declared memory budget."""
        if self.replay is not None:
            self.replay.confirm(node_id, self.current_round)
        self.required_bytes = max(self.required_bytes, float(reply.peak_mem_bytes))
        if reply.memory_budget_mb:
            self.node_budget_bytes[node_id] = reply.memory_budget_mb * 2**20

    def on_status(self, node_id: int, code: str, detail: str) -> None:
        """A node that could not rebuild the weights from round updates gets them in full."""
        if self.replay is not None and code == protocol.STATUS_REPLAY_MISMATCH:
            self.replay.forget(node_id, detail)

    def round_fields(self) -> dict[str, object]:
        """Refused nodes, skipped ones, downlink paths, and the memory gate's fields.

        ``skipped_for_memory``: below the largest measured peak; with ``downlink = replay``,
        each node's downlink path; with a ``memory-profile``, the need (``zo_need_bytes``),
        the nodes that cannot fit it (``ineligible``) and the round's ``probe``.
        """
        fields: dict[str, object] = {
            "refused_nodes": len(self.refused_nodes),
            "skipped_for_memory": sorted(self.skipped_for_memory),
        }
        if self.gate is not None:
            fields.update(self.gate.round_fields())
        if self.replay is not None:
            fields["downlink_path"] = self.replay.round_paths(self.registry.partition)
        return fields

    def aggregate(
        self, server_round: int, replies: Mapping[int, protocol.ParsedReply]
    ) -> RoundUpdate:
        """Reconstruct the update from the ``(seed, scalars)`` pairs and step the global model."""
        updates = [
            ClientUpdate(
                pid,
                r.num_examples,
                [ScalarStep(seed, r.deltas[j]) for j, seed in enumerate(r.step_seeds)],
                r.base_loss,
            )
            for pid, r in replies.items()
        ]
        summary = self.server.apply_round(updates, server_round)
        return RoundUpdate(
            summary.train_loss,
            {
                "grad_norm": summary.grad_norm,
                "reconstructions": summary.distinct_seeds * self.cfg.local_steps,
            },
        )

    def client_flops(self, reply: protocol.ParsedReply) -> int:
        """Forward FLOPs of a client-round (the same for every client)."""
        return self.forward_flops

    def _check_fingerprint(self, node_id: int, zo: ConfigRecord) -> None:
        """Refuse a node whose direction generator disagrees with the server's."""
        if node_id in self.nodes_with_mask:
            return  # verified at first contact
        reported = zo.get(protocol.FINGERPRINT_KEY)
        if reported == self.expected_fingerprint:
            return
        self.refuse_generator(node_id, reported)

    def refuse_generator(self, node_id: int, reported: object) -> None:
        """Refuse ``node_id`` for good: its fingerprint ``reported`` is not the server's."""
        reason = (
            f"direction generator disagrees with the server's (fingerprint {str(reported)[:12]} "
            f"vs {self.expected_fingerprint[:12]} for {self.cfg.directions} directions); "
            'use directions="rademacher" (bit-exact on every platform) or matching torch builds'
        )
        self.refused_nodes[node_id] = reason
        log(WARNING, "Refusing node %d: %s", node_id, reason)
        raise ReplyRejected(f"refused: {reason}")

    # ------------------------------------------------------------------ evaluate, save

    def kept_values(self) -> torch.Tensor:
        """The global model's kept coordinates."""
        return self.server.kept_values()

    @contextmanager
    def evaluation_model(self) -> Iterator[nn.Module]:
        """The model with the optimizer's evaluation weights (e.g. its EMA), then restored."""
        model = self.server.eval_model()
        try:
            yield model
        finally:
            self.server.restore_training_weights()

    def optimizer_state(self) -> dict[str, Any]:
        """The server optimizer's state (saved in ``model.pt``)."""
        return self.server.optimizer.state_dict()

    def setup_fields(self) -> dict[str, object]:
        """Forward FLOPs of a client-round (and, with a ``memory-profile``, the client's need)."""
        fields: dict[str, object] = {
            "client_round_forward_flops": self.forward_flops,
            "flops_note": "FlopCounterMode conv/linear FLOPs scaled by each layer's kept fraction",
        }
        if self.zo_need is not None:
            fields["zo_client_need"] = self.zo_need.as_dict()
        return fields

    def after_round(self, server_round: int) -> None:
        """Write a checkpoint every ``checkpoint-every`` rounds and after the last one."""
        every = self.cfg.checkpoint_every
        last = server_round == self.cfg.num_server_rounds
        if server_round and (last or (every and server_round % every == 0)):
            self.save_checkpoint(server_round)

    def resumable_checkpoint(self) -> Path | None:
        """``checkpoint.pt`` (written after the last round)."""
        return self.checkpoint_path

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
        log(INFO, "checkpoint after round %d: %s", server_round, self.checkpoint_path)
