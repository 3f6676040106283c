"""Zeroth-order progressive training (``method = zo-progressive``, ours) as a FedZO strategy.

The model and its output modules carry the staged mask (the model's data-free NTK-SAP mask, as
for ``zo-pruned``, plus each output module's own data-free NTK-SAP mask:
:func:`fedzo_flwr.progressive.zo.staged_mask`). Stage ``t`` trains block ``t`` and its output
module (the head at the last stage) with seeds and scalars. Each round the strategy

1. probes new nodes and picks the participants among the nodes whose budget covers the stage's
   **forward-only** need (:func:`~fedzo_flwr.progressive.memory.forward_stage_memory`), with
   SmartFreeze's selector (:class:`~server_app.staged_rounds.StageParticipants`);
2. sends each of them the round seed, the stage and the active stage's kept coordinates, the
   staged mask bitmap at first contact, the stage's frozen tensors (blocks ``0..t-1``) once per
   stage and node (:class:`~server_app.staged_rounds.FrozenTensors`), and the generator
   fingerprint's seed at a node's first message of each stage;
3. validates the K scalars per local step exactly as for the other zeroth-order methods
   (:func:`fedzo_flwr.protocol.parse_reply`, through :class:`~server_app.strategy.FedZO`), plus
   the stage and the probed partition; a node's fingerprint is checked over the stage's space;
4. reconstructs the update over the active stage's kept coordinates and steps them with the
   run's server optimizer (:class:`~fedzo_flwr.progressive.zo.server.StageZOServer`), then
   steps the pace controller on the active block; a stage change freezes the block and starts
   a fresh server optimizer over the next stage's space.

Evaluation, ``model.pt`` and the round record follow ``smartfreeze``'s (the model as trained so
far; per round ``stage``, ``pace_metric``, ``stage_change``). ``downlink = replay`` and
``resume-from`` are refused by the run config (see ``docs/progressive.md``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log as flower_log
from flwr.serverapp import Grid
from torch import nn

from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import NUM_CLASSES, DatasetArrays
from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.measure.flops import forward_flops, zo_step_flops
from fedzo_flwr.models import get_model_spec
from fedzo_flwr.progressive.memory import forward_stage_memory, full_backprop_memory
from fedzo_flwr.progressive.pace import PaceController
from fedzo_flwr.progressive.schedule import Step, all_tensors, frozen_names, pace_settings
from fedzo_flwr.progressive.staged import StagedModel
from fedzo_flwr.progressive.zo import ActiveStage, apply_staged_mask_, stage_step_flops, staged_mask
from fedzo_flwr.progressive.zo.server import StageZOServer
from fedzo_flwr.protocol import progressive as keys
from fedzo_flwr.protocol import validate as v
from fedzo_flwr.protocol.wire import encode_mask, mask_nbytes, sparse_weights_nbytes
from fedzo_flwr.pruning import NTKSAPConfig
from fedzo_flwr.run.results import RunRecorder
from fedzo_flwr.run.setup import initial_model
from fedzo_flwr.seeding import model_seed, pruning_seed
from fedzo_flwr.sparse.mask import Mask, kept_count, layer_densities, mask_density, total_count
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import fingerprint
from server_app.identity import PartitionRegistry
from server_app.logs import log
from server_app.masked_rounds import RoundUpdate
from server_app.staged_rounds import (
    FrozenTensors,
    PacedStages,
    StageParticipants,
    StageView,
    save_staged_model,
)
from server_app.strategy import FedZO


def _stage_dict(stage: int) -> dict[str, object]:
    return {"phase": "grow", "stage": stage}


class ZOProgressiveRounds(PacedStages, FedZO):
    """``zo-progressive`` over Flower (see the module docstring).

    Parameters
    ----------
    cfg : RunConfig
        Validated run config (``method = zo-progressive``).
    staged : StagedModel
        The staged global model at θ0, masked with ``mask`` (updated in place).
    model_mask : Mask
        The ordinary model's mask (what ``zo-pruned`` trains under).
    mask : Mask
        The staged mask: ``model_mask`` plus the output modules' masks.
    recorder : RunRecorder
        Where the setup and per-round results go.
    test_data : DatasetArrays
        Test split for central evaluation.
    prune_seconds : float
        Time spent computing ``mask`` (recorded in the setup).
    """

    def __init__(
        self,
        cfg: RunConfig,
        staged: StagedModel,
        model_mask: Mask,
        mask: Mask,
        recorder: RunRecorder,
        test_data: DatasetArrays,
        prune_seconds: float = 0.0,
    ) -> None:
        for param in staged.model.parameters():
            param.requires_grad_(True)
        full_space = KeptSpace(staged.model, model_mask)  # what zo-pruned perturbs
        self.full_dim = full_space.dim
        self.full_sparse_bytes = sparse_weights_nbytes(full_space)
        stages = range(staged.num_stages)
        self.memory = tuple(forward_stage_memory(staged, t, cfg.batch_size, mask) for t in stages)
        self.needs = tuple(m.total_bytes for m in self.memory)
        self.full_need = full_backprop_memory(staged.model, cfg.batch_size).total_bytes
        self.zo_pruned_step_flops = zo_step_flops(
            staged.model, model_mask, cfg.batch_size, cfg.k, cfg.fd
        )
        actives = [ActiveStage(staged, t, mask) for t in stages]
        self.stage_dims = tuple(a.space.dim for a in actives)
        self.stage_flops = tuple(
            stage_step_flops(a, cfg.batch_size, cfg.k, cfg.fd) for a in actives
        )
        self.stages = StageZOServer(cfg, staged, mask, 0)
        super().__init__(
            self.stages.server,
            recorder,
            test_data,
            self.stage_flops[0].total * cfg.local_steps,
        )
        self.staged = staged
        self.model_mask = model_mask
        self.mask = mask  # the staged mask: its bitmap travels at first contact
        self.mask_bytes = encode_mask(mask)
        self.mask_id = protocol.mask_id(self.mask_bytes)
        self.prune_seconds = prune_seconds
        self.participants = StageParticipants(cfg, self.needs, self.full_need, recorder)
        self.pace = PaceController(pace_settings(cfg))
        self.pace.begin_stage(0, staged.block_vector(0))
        self.frozen = FrozenTensors(all_tensors(staged))
        self.round_frozen: tuple[str, ArrayRecord | None] = ("", None)
        self.trained_stage = 0
        self.stage_rounds = 0
        self.last_stage_settled = False
        self.verified: dict[int, int] = {}  # node -> stage whose fingerprint it reproduced
        self.round_info: dict[str, object] = {}

    @classmethod
    def for_run(
        cls, cfg: RunConfig, recorder: RunRecorder, test_data: DatasetArrays
    ) -> ZOProgressiveRounds:
        """θ0 and the model's mask exactly as ``zo-pruned`` (``initial_model``), then staged."""
        init = initial_model(cfg)
        started = time.perf_counter()
        staged = StagedModel(
            init.model,
            NUM_CLASSES[cfg.dataset],
            cfg.stage_split,
            cfg.layers_per_block,
            seed=model_seed(cfg.seed),
            init_scheme=get_model_spec(cfg.model).init_scheme,
        )
        mask = staged_mask(
            staged,
            init.mask,
            cfg.model,
            cfg.effective_density,
            NTKSAPConfig.for_run(cfg),
            seed=pruning_seed(cfg.seed),
        )
        apply_staged_mask_(staged, mask)
        seconds = init.prune_seconds + time.perf_counter() - started
        return cls(cfg, staged, init.mask, mask, recorder, test_data, seconds)

    @property
    def stage(self) -> int:
        """The active stage."""
        return self.stages.stage

    def summary(self) -> None:
        """Log the strategy's configuration."""
        cfg = self.cfg
        flower_log(
            INFO,
            "\t├── zo-progressive: %s in %d stages, K=%d σ=%g %s differences, %s directions",
            cfg.model,
            self.staged.num_stages,
            cfg.k,
            cfg.sigma,
            cfg.fd,
            cfg.directions,
        )
        flower_log(
            INFO,
            "\t├── perturbed coordinates per stage %s (zo-pruned: %d); needs %s MiB",
            list(self.stage_dims),
            self.full_dim,
            ", ".join(f"{n / 2**20:.2f}" for n in self.needs),
        )
        flower_log(
            INFO,
            "\t└── pace %s, selector %s, memory-profile %s; server optimizer %s lr %g",
            cfg.pace,
            cfg.selector,
            cfg.memory_profile,
            cfg.optimizer,
            cfg.lr,
        )

    # ------------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Select the eligible participants, send them the seed and the stage's weights."""
        server_round += self.start_round
        self.round_started = time.perf_counter()
        self.current_round = server_round
        stage = self.stage

        def usable(node_id: int) -> bool:
            refused = node_id in self.refused_nodes
            return not refused and self.health.available(node_id, server_round)

        picks, fields = self.participants.select(
            grid, server_round, self.min_available_nodes, stage, f"zo stage {stage}", usable
        )
        self.round_info = {"stage": stage, "stage_dim": self.server.space.dim, **fields}
        frozen = frozen_names(self.staged, Step("grow", stage))
        self.round_frozen = self.frozen.record(stage, frozen)
        weights = self.kept_arrays()

        def payload(node_id: int) -> tuple[ArrayRecord, dict[str, bytes | int | str]]:
            extra: dict[str, bytes | int | str] = {
                keys.STAGE_KEY: stage,
                keys.FROZEN_ID_KEY: self.round_frozen[0],
            }
            if self.verified.get(node_id) != stage:
                extra[protocol.FINGERPRINT_SEED_KEY] = self.fingerprint_seed
            return weights, extra

        round_seed = self.server.round_seed(server_round)
        return self.train_messages(server_round, round_seed, weights, config, picks, payload)

    def message_records(self, node_id: int) -> Mapping[str, ArrayRecord]:
        """The stage's frozen tensors, if the node does not hold them yet."""
        ident, record = self.round_frozen
        if record is not None and self.frozen.needs(node_id, ident):
            return {keys.FROZEN_KEY: record}
        return {}

    # ---------------------------------------------------------------------- replies

    def screen(self, reply: Message, node_id: int) -> None:
        """As the base; a ``mask-missing`` status also forgets the node's frozen tensors."""
        try:
            super().screen(reply, node_id)
        except ReplyRejected:
            if not reply.has_error():
                record = reply.content.config_records.get(protocol.STATUS_KEY)
                if record is not None and record.get(protocol.STATUS_CODE_KEY) == (
                    protocol.STATUS_MASK_MISSING
                ):
                    self.frozen.forget(node_id)
            raise

    def parse_train_reply(
        self, server_round: int, node_id: int, reply: Message
    ) -> protocol.ParsedReply:
        """A zeroth-order reply (FedZO's checks) for this stage, from the probed partition."""
        zo = reply.content.config_records.get(protocol.ZO_KEY)
        if zo is None:
            raise ReplyRejected("reply lacks the 'zo' or 'metrics' record")
        stage = v.require_int(zo, keys.STAGE_KEY, low=0)
        if stage != self.stage:
            raise ReplyRejected(f"reply is for stage {stage}, this round trains stage {self.stage}")
        parsed = super().parse_train_reply(server_round, node_id, reply)
        profile = self.participants.node_info.profiles.get(node_id)
        if profile is None or profile.partition_id != parsed.partition_id:
            raise ReplyRejected(
                f"partition-id {parsed.partition_id} is not the one this node reported"
            )
        # A claim is capped at the partition size the node reported when probed.
        return dataclasses.replace(
            parsed, num_examples=min(parsed.num_examples, profile.num_examples)
        )

    def _check_fingerprint(self, node_id: int, zo: ConfigRecord) -> None:
        """Until a node's first valid reply of a stage: the fingerprint over the stage's space."""
        if self.verified.get(node_id) == self.stage:
            return
        reported = zo.get(protocol.FINGERPRINT_KEY)
        if reported != self.expected_fingerprint:
            self.refuse_generator(node_id, reported)

    def accept_reply(self, node_id: int, reply: protocol.ParsedReply) -> None:
        """The node is verified for the stage and holds its frozen tensors; speed EMA."""
        self.verified[node_id] = self.stage
        self.frozen.hold(node_id, self.round_frozen[0])
        self.participants.speeds.update(node_id, reply.seconds)

    def round_fields(self) -> dict[str, object]:
        """Stage, need, eligibility, probe and refused nodes (skipped rounds included)."""
        return {**self.round_info, "refused_nodes": len(self.refused_nodes)}

    # -------------------------------------------------------------------- aggregate

    def aggregate(
        self, server_round: int, replies: Mapping[int, protocol.ParsedReply]
    ) -> RoundUpdate:
        """FedZO's step over the stage's space, then the pace controller on the active block."""
        update = super().aggregate(server_round, replies)
        self.stage_rounds += 1
        self.trained_stage = self.stage
        fields = {**update.fields, "round_in_stage": self.stage_rounds}
        fields.update(self.pace_round(server_round, self.stage, self.stage_rounds))
        return RoundUpdate(update.train_loss, fields)

    def _advance(self, server_round: int, reason: str) -> dict[str, object]:
        """Freeze the active block; a fresh ZO server state over the next stage's space."""
        old = self.stage
        self.stages.set_stage(old + 1)
        self.server = self.stages.server
        self.space = self.server.space
        self.expected_fingerprint = fingerprint(
            self.server.space.sizes, self.fingerprint_seed, self.cfg.directions
        )
        self.stage_rounds = 0
        self.pace.begin_stage(old + 1, self.staged.block_vector(old + 1))
        log(INFO, "Round %d: stage change zo %d -> %d (%s)", server_round, old, old + 1, reason)
        return {
            "round": server_round,
            "from": _stage_dict(old),
            "to": _stage_dict(old + 1),
            "reason": reason,
        }

    def client_flops(self, reply: protocol.ParsedReply) -> int:
        """Sparse forward FLOPs of a client-round of the stage trained (prefix + K+1 passes)."""
        return self.stage_flops[self.trained_stage].total * self.cfg.local_steps

    # -------------------------------------------------------------- evaluate, save

    @contextmanager
    def evaluation_model(self) -> Iterator[nn.Module]:
        """Blocks ``0..t`` and output module ``t`` of the stage trained last (or the model).

        While that stage is active, with the server optimizer's evaluation weights (its EMA).
        """
        stage = self.trained_stage
        view = self.staged.model if stage == self.last_stage else StageView(self.staged, stage)
        if stage != self.stage:  # the block froze at its training weights
            yield view
            return
        self.server.eval_model()
        try:
            yield view
        finally:
            self.server.restore_training_weights()

    def record_setup(self, prune_seconds: float) -> None:
        """The setup record: the model's mask (as zo-pruned) and every stage's figures."""
        input_shape = tuple(self.test_data.x_test.shape[1:][::-1])  # HWC -> CHW
        flops = forward_flops(self.staged.model, self.model_mask, input_shape=input_shape)
        self.recorder.set_setup(
            density=mask_density(self.model_mask),
            kept_weights=kept_count(self.model_mask),
            prunable_weights=total_count(self.model_mask),
            kept_coordinates=self.full_dim,
            layer_densities=layer_densities(self.mask),
            prune_seconds=prune_seconds,
            mask_bytes=mask_nbytes(self.mask),
            sparse_weights_bytes=self.full_sparse_bytes,
            forward_flops_per_example={"dense": flops.dense, "sparse": flops.sparse},
            **self.setup_fields(),
        )

    def setup_fields(self) -> dict[str, object]:
        """Per stage: perturbed coordinates, forward-only memory, FLOPs of a client step."""
        steps = self.cfg.local_steps
        return {
            "zo_progressive": {
                "stages": self.staged.num_stages,
                "split": self.cfg.stage_split,
                "stage_dims": list(self.stage_dims),
                "zo_pruned_dim": self.full_dim,
                "stage_need_bytes": list(self.needs),
                "stage_memory": [m.as_dict() for m in self.memory],
                "full_backprop_need_bytes": self.full_need,
                "stage_step_flops": [
                    {"prefix": f.prefix, "active_pass": f.active_pass, "passes": f.passes}
                    for f in self.stage_flops
                ],
                "client_round_forward_flops": [f.total * steps for f in self.stage_flops],
                "zo_pruned_client_round_forward_flops": self.zo_pruned_step_flops * steps,
            },
            "flops_note": (
                "zo-progressive: per client-round, local steps x (one sparse forward of the "
                "frozen prefix + (K+1 or 2K+1) sparse forwards of the active block and its "
                "output module); FlopCounterMode conv/linear FLOPs scaled by kept fractions"
            ),
        }

    def save_model(self, path: Path) -> None:
        """``model.pt``: the ordinary model, the output modules, the staged mask, the stage."""
        extra = {"step": _stage_dict(self.stage), "optimizer": self.server.optimizer.state_dict()}
        save_staged_model(path, self.cfg, self.staged, self.mask, extra)

    def after_round(self, server_round: int) -> None:
        """No checkpoint: ``resume-from`` is refused for this method (run config)."""

    def resumable_checkpoint(self) -> Path | None:
        """None: the method cannot resume yet."""
        return None

    def run(
        self, grid: Grid, prune_seconds: float, registry: PartitionRegistry | None = None
    ) -> Path:
        """As the base, then the stage changes and never-eligible nodes in ``final``."""
        path = super().run(grid, prune_seconds, registry)
        self.record_stage_final(_stage_dict(self.stage))
        return path
