"""Progressive block training (``method = smartfreeze | profl``) as a MaskedRounds strategy.

The model is dense (mask of ones). Each round the strategy

1. probes nodes it has not seen (:mod:`server_app.node_info`: partition, size, labels, memory
   budget), so a budget is known before a node can be selected;
2. picks the participants with the selector (:class:`~fedzo_flwr.progressive.selector.Selector`)
   among the nodes whose budget covers the current step's analytic need
   (:func:`~fedzo_flwr.progressive.memory.stage_memory` at ``batch-size``, computed once) times
   ``1 + memory-margin``; nodes that fit no stage are logged and listed in ``results.json``;
3. sends each of them the step's trainable tensors, and the step's frozen tensors only if the
   node does not hold them yet (cached in the node's ``context.state``, named by ``mask-id``);
4. validates the replies (exactly the trained tensors: names, shapes, float32, finite),
   averages them with :func:`fedzo_flwr.aggregation.client_weights` (``weighting``,
   ``max-client-share``), and steps the pace controller on the active block (grow phase) or
   counts the shrink step's rounds (ProFL), recording the pace metric and any stage change.

Evaluation uses the model as trained so far: blocks ``0..t`` and output module ``t`` of the
step trained last (the ordinary model at the last stage). ``model.pt`` holds the ordinary
model's ``state_dict`` (and the output modules separately); checkpoints hold every tensor, the
step, the pace controller and the speed tracker, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log as flower_log
from flwr.serverapp import Grid
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedzo_flwr import protocol
from fedzo_flwr.aggregation import client_weights
from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import NUM_CLASSES, DatasetArrays
from fedzo_flwr.errors import CheckpointError, ReplyRejected
from fedzo_flwr.progressive.memory import full_backprop_memory, stage_memory
from fedzo_flwr.progressive.pace import PaceController
from fedzo_flwr.progressive.schedule import (
    Step,
    all_tensors,
    first_step,
    frozen_names,
    next_step,
    pace_settings,
    trainable_names,
)
from fedzo_flwr.progressive.staged import StagedModel, build_staged
from fedzo_flwr.protocol import progressive as keys
from fedzo_flwr.run.checkpoint import save_checkpoint
from fedzo_flwr.run.results import RunRecorder, per_client_summary
from fedzo_flwr.seeding import model_seed, round_seed
from fedzo_flwr.sparse.mask import dense_mask
from fedzo_flwr.sparse.space import KeptSpace
from server_app.fedavg_strategy import BackpropReply
from server_app.identity import PartitionRegistry
from server_app.logs import log
from server_app.masked_rounds import MaskedRounds, RoundUpdate
from server_app.message_size import SizeCache, message_nbytes
from server_app.staged_rounds import (
    FrozenTensors,
    PacedStages,
    StageParticipants,
    StageView,
    save_staged_model,
)

#: Metrics every progressive train reply carries, and whether each must be an int.
STAGE_METRICS = {
    "num-examples": True,
    "train-loss": False,
    "train-examples": True,
    "steps": True,
    "client-seconds": False,
    "peak-mem-bytes": False,
    "extra-mem-bytes": False,
    "partition-id": True,
    keys.STAGE_KEY: True,
    keys.SHRINK_KEY: True,
}


@dataclass(frozen=True)
class StageReply(BackpropReply):
    """A validated progressive train reply: the metrics and exactly the trained tensors."""

    tensors: dict[str, np.ndarray]


def _metric(metrics: Mapping[str, object], key: str, integer: bool) -> float:
    value = metrics.get(key)
    if value is None:
        raise ReplyRejected(f"reply lacks metric '{key}'")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ReplyRejected(f"metric '{key}' must be a finite number, got {value!r:.40}")
    if integer and not isinstance(value, int):
        raise ReplyRejected(f"metric '{key}' must be an int, got {value!r:.40}")
    return float(value)


def _step_dict(step: Step | None) -> dict[str, object] | None:
    return None if step is None else {"phase": step.phase, "stage": step.stage}


class ProgressiveRounds(PacedStages, MaskedRounds[StageReply]):
    """SmartFreeze (and ProFL with its shrinking phase) over Flower (see the module docstring).

    Parameters
    ----------
    cfg : RunConfig
        Validated run config (``method`` ``smartfreeze`` or ``profl``).
    staged : StagedModel
        The global model's staged view at θ0 (updated in place).
    recorder : RunRecorder
        Where the setup and per-round results go.
    test_data : DatasetArrays
        Test split for central evaluation.
    start_round : int
        Rounds already done (when resuming).
    """

    def __init__(
        self,
        cfg: RunConfig,
        staged: StagedModel,
        recorder: RunRecorder,
        test_data: DatasetArrays,
        start_round: int = 0,
    ) -> None:
        mask = dense_mask(staged.model)
        super().__init__(cfg, mask, KeptSpace(staged.model, mask), recorder, test_data, start_round)
        self.staged = staged
        self.tensors = all_tensors(staged)
        self.needs = tuple(
            stage_memory(staged, t, cfg.batch_size).total_bytes for t in range(staged.num_stages)
        )
        self.full_need = full_backprop_memory(staged.model, cfg.batch_size).total_bytes
        self.participants = StageParticipants(cfg, self.needs, self.full_need, recorder)
        self.speeds = self.participants.speeds
        self.pace = PaceController(pace_settings(cfg))
        self.step: Step = first_step(cfg.method, staged.num_stages)
        self.trained_step: Step = self.step  # the step whose model is evaluated
        self.step_rounds = 0
        self.last_stage_settled = False
        if self.step.phase == "grow":
            self.pace.begin_stage(self.step.stage, staged.block_vector(self.step.stage))
        self.frozen = FrozenTensors(self.tensors)
        self.round_info: dict[str, object] = {}
        self._full_view = False
        self._flops: dict[Step, int] = {}

    @classmethod
    def for_run(
        cls, cfg: RunConfig, recorder: RunRecorder, test_data: DatasetArrays
    ) -> ProgressiveRounds:
        """The strategy with θ0 = ``build_model(model, classes, model_seed(seed))``."""
        staged = build_staged(
            cfg.model,
            NUM_CLASSES[cfg.dataset],
            seed=model_seed(cfg.seed),
            split=cfg.stage_split,
            layers_per_block=cfg.layers_per_block,
        )
        return cls(cfg, staged, recorder, test_data)

    def summary(self) -> None:
        """Log the strategy's configuration."""
        cfg = self.cfg
        flower_log(
            INFO,
            "\t├── %s: %s in %d stages (%s split), needs %s MiB vs %.1f MiB full backprop",
            cfg.method,
            cfg.model,
            self.staged.num_stages,
            cfg.stage_split,
            ", ".join(f"{n / 2**20:.1f}" for n in self.needs),
            self.full_need / 2**20,
        )
        flower_log(
            INFO,
            "\t└── pace %s, selector %s, memory-profile %s (margin %g)",
            cfg.pace,
            cfg.selector,
            cfg.memory_profile,
            cfg.memory_margin,
        )

    # ------------------------------------------------------------------------- stepping

    def need(self, step: Step) -> int:
        """Analytic need of ``step``: stage ``t``'s (a shrink step trains a subset of it)."""
        return self.needs[step.stage]

    def _advance(self, server_round: int, reason: str) -> dict[str, object]:
        old, new = self.step, next_step(self.step, self.staged.num_stages)
        assert new is not None
        self.step, self.step_rounds = new, 0
        if new.phase == "grow":
            self.pace.begin_stage(new.stage, self.staged.block_vector(new.stage))
        event: dict[str, object] = {
            "round": server_round,
            "from": _step_dict(old),
            "to": _step_dict(new),
            "reason": reason,
        }
        log(
            INFO,
            "Round %d: stage change %s %d -> %s %d (%s)",
            server_round,
            old.phase,
            old.stage,
            new.phase,
            new.stage,
            reason,
        )
        return event

    # ----------------------------------------------------------------------- selection

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Probe new nodes, select eligible participants, send the step's tensors."""
        server_round += self.start_round
        self.round_started = time.perf_counter()
        picks, fields = self.participants.select(
            grid,
            server_round,
            self.min_available_nodes,
            self.step.stage,
            f"{self.step.phase} stage {self.step.stage}",
        )
        self.round_info = {"phase": self.step.phase, "stage": self.step.stage, **fields}
        return self.stage_messages(server_round, config, picks)

    # ------------------------------------------------------------------------ messages

    def _record(self, names: Iterable[str]) -> ArrayRecord:
        return ArrayRecord({n: Array(self.tensors[n].detach().numpy().copy()) for n in names})

    def frozen_record(self) -> tuple[str, ArrayRecord | None]:
        """The current step's frozen tensors and their id (built once per step)."""
        return self.frozen.record(self.step, frozen_names(self.staged, self.step))

    def stage_messages(
        self, server_round: int, config: ConfigRecord, node_ids: list[int]
    ) -> list[Message]:
        """One train message per node: trainable tensors always, frozen ones if not cached."""
        self.round_downlink, self.message_node = {}, {}
        if not node_ids:
            return []
        trainable = self._record(trainable_names(self.staged, self.step))
        ident, frozen = self.frozen_record()
        sizes = SizeCache()
        messages = []
        for node_id in node_ids:
            node_config = ConfigRecord(dict(config))
            node_config[protocol.ROUND_KEY] = server_round
            node_config[protocol.ROUND_SEED_KEY] = round_seed(self.cfg.seed, server_round)
            node_config[keys.PHASE_KEY] = self.step.phase
            node_config[keys.STAGE_KEY] = self.step.stage
            node_config[protocol.MASK_ID_KEY] = ident
            content = RecordDict({protocol.ARRAYS_KEY: trainable, protocol.CONFIG_KEY: node_config})
            if frozen is not None and self.frozen.needs(node_id, ident):
                content[keys.FROZEN_KEY] = frozen
            message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)
            self.round_downlink[node_id] = message_nbytes(message, sizes)
            self.message_node[message.object_id] = node_id
            messages.append(message)
        return messages

    # ------------------------------------------------------------------------- replies

    def screen(self, reply: Message, node_id: int) -> None:
        """As the base; a ``mask-missing`` status also forgets the node's cached frozen set."""
        try:
            super().screen(reply, node_id)
        except ReplyRejected:
            record = (
                reply.content.config_records.get(protocol.STATUS_KEY)
                if not (reply.has_error())
                else None
            )
            if record is not None and record.get(protocol.STATUS_CODE_KEY) == (
                protocol.STATUS_MASK_MISSING
            ):
                self.frozen.forget(node_id)
            raise

    def parse_train_reply(self, server_round: int, node_id: int, reply: Message) -> StageReply:
        """Exactly the step's trained tensors (float32, shapes, finite) and the metrics."""
        metrics = reply.content.metric_records.get(protocol.METRICS_KEY)
        arrays = reply.content.array_records.get(protocol.ARRAYS_KEY)
        if metrics is None or arrays is None or len(reply.content.array_records) != 1:
            raise ReplyRejected("reply needs exactly the 'arrays' and 'metrics' records")
        values = {key: _metric(metrics, key, integer) for key, integer in STAGE_METRICS.items()}
        if values[keys.STAGE_KEY] != self.step.stage or values[keys.SHRINK_KEY] != int(
            self.step.phase == "shrink"
        ):
            raise ReplyRejected(
                f"reply is for stage {int(values[keys.STAGE_KEY])}, this round trains "
                f"{self.step.phase} stage {self.step.stage}"
            )
        profile = self.participants.node_info.profiles.get(node_id)
        partition_id = int(values["partition-id"])
        if profile is None or profile.partition_id != partition_id:
            raise ReplyRejected(f"partition-id {partition_id} is not the one this node reported")
        if values["num-examples"] < 1:
            raise ReplyRejected("num-examples must be a positive int")
        num_partitions = metrics.get(protocol.NUM_PARTITIONS_KEY)
        if num_partitions is not None and (
            isinstance(num_partitions, bool) or not isinstance(num_partitions, int)
        ):
            raise ReplyRejected(f"num-partitions must be an int, got {num_partitions!r:.40}")
        names = trainable_names(self.staged, self.step)
        if set(arrays.keys()) != set(names):
            missing = sorted(set(names) - set(arrays.keys()))
            extra = sorted(set(arrays.keys()) - set(names))[:5]
            raise ReplyRejected(f"reply tensors: missing {missing[:5]}, unexpected {extra}")
        tensors: dict[str, np.ndarray] = {}
        for name in names:
            value = arrays[name].numpy()
            expected = tuple(self.tensors[name].shape)
            if value.dtype != np.float32 or value.shape != expected:
                raise ReplyRejected(
                    f"tensor {name!r} must be float32 {expected}, got {value.dtype} {value.shape}"
                )
            if not np.all(np.isfinite(value)):
                raise ReplyRejected(f"tensor {name!r} contains NaN or inf")
            tensors[name] = value
        return StageReply(
            partition_id=partition_id,
            # A claim is capped at the partition size the node reported when probed.
            num_examples=min(int(values["num-examples"]), profile.num_examples),
            train_loss=values["train-loss"],
            train_examples=int(values["train-examples"]),
            steps=int(values["steps"]),
            seconds=values["client-seconds"],
            peak_mem_bytes=int(values["peak-mem-bytes"]),
            extra_mem_bytes=int(values["extra-mem-bytes"]),
            tensors=tensors,
            num_partitions=num_partitions,
        )

    def accept_reply(self, node_id: int, reply: StageReply) -> None:
        """The node now holds the step's frozen tensors; fold its time into the speed EMA."""
        self.frozen.hold(node_id, self.frozen_record()[0])
        self.speeds.update(node_id, reply.seconds)

    def round_fields(self) -> dict[str, object]:
        """Step, need, eligibility and probe of the round (skipped rounds included)."""
        return dict(self.round_info)

    @torch.no_grad()
    def aggregate(self, server_round: int, replies: Mapping[int, StageReply]) -> RoundUpdate:
        """Weighted mean of the trained tensors; step the pace controller or the shrink count."""
        ordered = [replies[pid] for pid in sorted(replies)]
        weights = client_weights(
            [r.num_examples for r in ordered], self.cfg.weighting, self.cfg.max_client_share
        )
        total = float(sum(weights))
        for name in trainable_names(self.staged, self.step):
            mean = (
                sum(w * r.tensors[name].astype(np.float64) for w, r in zip(weights, ordered))
                / total
            )
            self.tensors[name].copy_(torch.from_numpy(np.asarray(mean, dtype=np.float32)))
        train_loss = float(np.average([r.train_loss for r in ordered], weights=weights))
        self.step_rounds += 1
        self.trained_step = self.step
        fields: dict[str, object] = {"round_in_stage": self.step_rounds}
        if self.step.phase == "grow":
            fields.update(self.pace_round(server_round, self.step.stage, self.step_rounds))
        elif self.step_rounds >= self.cfg.profl_shrink_rounds:
            fields["stage_change"] = self._advance(server_round, "shrink-rounds")
        fields["local_steps"] = per_client_summary({pid: r.steps for pid, r in replies.items()})
        return RoundUpdate(train_loss, fields)

    # ----------------------------------------------------------------------- FLOPs

    def step_flops(self, step: Step) -> int:
        """FLOPs of one training example of ``step``, counted by ``FlopCounterMode``.

        A real forward pass of the step at batch 1 (the frozen prefix under no_grad) plus the
        backward pass to the trained tensors; a shrink step adds the teacher's forward pass.
        Convolutions and matrix products only, as :mod:`fedzo_flwr.measure.flops` counts.
        """
        if step not in self._flops:
            flags = [(p, p.requires_grad) for p in self.staged.parameters()]
            x = torch.zeros(1, *self.test_data.x_test.shape[1:][::-1])
            counter = FlopCounterMode(display=False)
            try:
                for param in self.staged.parameters():
                    param.requires_grad_(False)
                trainable = [self.tensors[n] for n in trainable_names(self.staged, step)]
                for param in trainable:
                    param.requires_grad_(True)
                with counter, torch.enable_grad():
                    out = self.staged.forward_stage(x, step.stage)
                    torch.autograd.grad(out.sum(), trainable)
                    if step.phase == "shrink":
                        with torch.no_grad():
                            self.staged.forward_stage(x, step.stage + 1)
            finally:
                for param, flag in flags:
                    param.requires_grad_(flag)
            self._flops[step] = int(counter.get_total_flops())
        return self._flops[step]

    def client_flops(self, reply: StageReply) -> int:
        """Examples trained x FLOPs per example of the round's step."""
        return reply.train_examples * self.step_flops(self.trained_step)

    # ---------------------------------------------------------------- evaluate, save

    def kept_values(self) -> torch.Tensor:
        """The ordinary model's parameters (dense), as the base's bookkeeping expects."""
        return self.space.gather(self.staged.model)

    @contextmanager
    def evaluation_model(self) -> Iterator[nn.Module]:
        """Blocks ``0..t`` and output module ``t`` of the step trained last (or the model)."""
        stage = self.trained_step.stage
        if self._full_view or (self.trained_step.phase == "grow" and stage == self.last_stage):
            yield self.staged.model
        else:
            yield StageView(self.staged, stage)

    def record_setup(self, prune_seconds: float) -> None:
        """The base's setup record, measured on the ordinary (dense) model."""
        self._full_view = True
        try:
            super().record_setup(prune_seconds)
        finally:
            self._full_view = False

    def setup_fields(self) -> dict[str, object]:
        """The stages: their tensors, analytic needs and FLOPs per example; the first step."""
        stages = range(self.staged.num_stages)
        return {
            "progressive": {
                "stages": self.staged.num_stages,
                "split": self.cfg.stage_split,
                "stage_tensors": [len(self.staged.stage_parameters(t)) for t in stages],
                "stage_need_bytes": list(self.needs),
                "full_backprop_need_bytes": self.full_need,
                "first_step": _step_dict(first_step(self.cfg.method, self.staged.num_stages)),
                "flops_per_example": {
                    f"grow {t}": self.step_flops(Step("grow", t)) for t in stages
                },
            },
            "flops_note": (
                "progressive: forward_flops per client-round = examples trained x FLOPs per "
                "example of the round's step (forward of the frozen prefix, forward+backward of "
                "the trained tensors; shrink steps add the teacher's forward)"
            ),
        }

    def save_model(self, path: Path) -> None:
        """``model.pt``: the ordinary model's state, the output modules, the step."""
        extra = {"step": _step_dict(self.step), "optimizer": None}
        save_staged_model(path, self.cfg, self.staged, self.mask, extra)

    def run(
        self, grid: Grid, prune_seconds: float, registry: PartitionRegistry | None = None
    ) -> Path:
        """As the base, then the stage changes and never-eligible nodes in ``final``."""
        checkpoint = super().run(grid, prune_seconds, registry)
        self.record_stage_final(_step_dict(self.step))
        return checkpoint

    # ----------------------------------------------------------------- checkpoints

    def after_round(self, server_round: int) -> None:
        """Write a checkpoint every ``checkpoint-every`` rounds and after the last one."""
        every = self.cfg.checkpoint_every
        last = server_round == self.cfg.num_server_rounds
        if server_round and (last or (every and server_round % every == 0)):
            save_checkpoint(
                self.recorder.run_dir / "checkpoint.pt",
                self.cfg,
                server_round,
                self.mask,
                self.state_dict(),
                self.recorder.data,
            )
            log(INFO, "checkpoint after round %d", server_round)

    def state_dict(self) -> dict[str, Any]:
        """Every tensor, the step, the pace controller and the speed tracker."""
        return {
            "tensors": {n: p.detach().clone() for n, p in self.tensors.items()},
            "phase": self.step.phase,
            "stage": self.step.stage,
            "trained_phase": self.trained_step.phase,
            "trained_stage": self.trained_step.stage,
            "step_rounds": self.step_rounds,
            "last_stage_settled": self.last_stage_settled,
            "pace": self.pace.state_dict(),
            "speeds": self.speeds.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (raises ``CheckpointError`` if it does not fit)."""
        try:
            tensors = state["tensors"]
            if set(tensors) != set(self.tensors):
                raise CheckpointError("progressive state: tensor names differ from this model")
            for name, param in self.tensors.items():
                if tensors[name].shape != param.shape or tensors[name].dtype != param.dtype:
                    raise CheckpointError(f"progressive state: tensor {name!r} does not fit")
            step = Step(state["phase"], int(state["stage"]))
            trained = Step(state["trained_phase"], int(state["trained_stage"]))
            if step.phase not in ("shrink", "grow") or not 0 <= step.stage <= self.last_stage:
                raise CheckpointError(f"progressive state: bad step {step}")
            for name, param in self.tensors.items():
                param.copy_(tensors[name])
            self.step, self.trained_step = step, trained
            self.step_rounds = int(state["step_rounds"])
            self.last_stage_settled = bool(state["last_stage_settled"])
            self.pace.load_state_dict(state["pace"])
            self.speeds.load_state_dict(state["speeds"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"progressive state is malformed: {err!r}") from None
