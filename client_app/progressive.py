"""ClientApp handlers of progressive block training (``method = smartfreeze | profl``).

``train``: the node loads the step's frozen tensors (from the message the first time, then from
its ``context.state``), the trainable tensors from the message, trains only those with backprop
(the frozen prefix under ``torch.no_grad()``: :func:`fedzo_flwr.progressive.client.train_stage`,
or ProFL's shrink step :func:`fedzo_flwr.progressive.shrink.distil_output_module`) and replies
with exactly the trained tensors and its metrics. ``query.node_info``: the node's partition id,
size, label histogram and declared memory budget (:mod:`fedzo_flwr.protocol.progressive`).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client_app.client_app import (
    add_memory_budget,
    backprop_metrics,
    config_value,
    node_data,
    node_partition,
    node_run_config,
    status_reply,
)
from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import NUM_CLASSES
from fedzo_flwr.errors import ConfigError
from fedzo_flwr.progressive.client import train_stage
from fedzo_flwr.progressive.schedule import (
    Step,
    all_tensors,
    frozen_names,
    stage_train_settings,
    trainable_names,
)
from fedzo_flwr.progressive.shrink import distil_output_module
from fedzo_flwr.progressive.staged import StagedModel, build_staged
from fedzo_flwr.protocol import progressive as keys
from fedzo_flwr.seeding import model_seed

#: ``context.state`` entries: the cached frozen tensors and the id they were sent under.
FROZEN_STATE_KEY = "fedzo-frozen"
FROZEN_ID_STATE_KEY = "fedzo-frozen-id"

# (model, dataset, split, layers-per-block, seed) -> staged model; one run per process.
_STAGED: dict[tuple[str, str, str, int, int], StagedModel] = {}


def staged_model(cfg: RunConfig) -> StagedModel:
    """The run's staged model structure (its values are overwritten by every message)."""
    key = (cfg.model, cfg.dataset, cfg.stage_split, cfg.layers_per_block, cfg.seed)
    if key not in _STAGED:
        _STAGED.clear()
        _STAGED[key] = build_staged(
            cfg.model,
            NUM_CLASSES[cfg.dataset],
            seed=model_seed(cfg.seed),
            split=cfg.stage_split,
            layers_per_block=cfg.layers_per_block,
        )
    return _STAGED[key]


@torch.no_grad()
def load_tensors(staged: StagedModel, record: ArrayRecord, names: tuple[str, ...]) -> None:
    """Copy exactly ``names`` from ``record`` into the staged model (shapes, dtypes checked)."""
    if set(record.keys()) != set(names):
        raise ConfigError(
            f"message tensors do not match the step: {len(record.keys())} sent, {len(names)} "
            "expected"
        )
    params = all_tensors(staged)
    for name in names:
        value = record[name].numpy()
        param = params[name]
        if value.dtype != np.float32 or value.shape != tuple(param.shape):
            raise ConfigError(f"tensor {name!r}: expected float32 {tuple(param.shape)}")
        param.copy_(torch.from_numpy(value.copy()))


def _step(config: ConfigRecord, staged: StagedModel) -> Step:
    phase = config_value(config, keys.PHASE_KEY, str)
    stage = config_value(config, keys.STAGE_KEY, int)
    last = staged.num_stages - 1 if phase == "grow" else staged.num_stages - 2
    if phase not in ("grow", "shrink") or not 0 <= stage <= last:
        raise ConfigError(f"message names an impossible step: {phase} stage {stage}")
    return Step("grow" if phase == "grow" else "shrink", stage)


def frozen_from(msg: Message, context: Context, wanted: str) -> ArrayRecord | None:
    """The frozen tensors named ``wanted``: from the message (then cached) or the node state."""
    record = msg.content.array_records.get(keys.FROZEN_KEY)
    if record is not None:
        got = keys.frozen_id({n: record[n].numpy() for n in record.keys()})
        if got != wanted:
            raise ConfigError(f"frozen tensors arrived as {got}, the message names {wanted}")
        context.state[FROZEN_STATE_KEY] = record
        context.state[FROZEN_ID_STATE_KEY] = ConfigRecord({protocol.MASK_ID_KEY: wanted})
        return record
    held = context.state.config_records.get(FROZEN_ID_STATE_KEY)
    cached = context.state.array_records.get(FROZEN_STATE_KEY)
    if held is None or cached is None or held.get(protocol.MASK_ID_KEY) != wanted:
        return None
    if keys.frozen_id({n: cached[n].numpy() for n in cached.keys()}) != wanted:
        return None  # a damaged cache: ask for the tensors again
    return cached


def load_frozen(
    msg: Message, context: Context, staged: StagedModel, names: tuple[str, ...], wanted: str
) -> str | None:
    """Load the frozen tensors ``names`` (id ``wanted``, :func:`frozen_from`) into ``staged``.

    Returns ``None`` once they are loaded, else why not (the node answers ``mask-missing``).
    """
    record = frozen_from(msg, context, wanted)
    if record is None:
        return f"no frozen tensors {wanted} cached on this node"
    load_tensors(staged, record, names)
    return None


def train_progressive(msg: Message, context: Context) -> Message:
    """One round of the step the message names; reply with exactly the trained tensors."""
    cfg = node_run_config(context)
    if cfg.client_threads:
        torch.set_num_threads(cfg.client_threads)
    config = msg.content.config_records[protocol.CONFIG_KEY]
    staged = staged_model(cfg)
    step = _step(config, staged)
    frozen = frozen_names(staged, step)
    if frozen:
        wanted = config_value(config, protocol.MASK_ID_KEY, str)
        missing = load_frozen(msg, context, staged, frozen, wanted)
        if missing is not None:
            return status_reply(msg, protocol.STATUS_MASK_MISSING, missing)
    trainable = msg.content.array_records[protocol.ARRAYS_KEY]
    load_tensors(staged, trainable, trainable_names(staged, step))
    partition_id, num_partitions = node_partition(context)
    x, y = node_data(cfg, context)
    seed = config_value(config, protocol.ROUND_SEED_KEY, int)
    settings = stage_train_settings(cfg, step)
    trainer = distil_output_module if step.phase == "shrink" else train_stage
    result = trainer(staged, step.stage, x, y, settings, seed, partition_id)
    metrics = backprop_metrics(result, partition_id)
    # Every reply: the server checks the federation's split (the cost is 22 bytes).
    metrics[protocol.NUM_PARTITIONS_KEY] = num_partitions
    metrics[keys.STAGE_KEY] = step.stage
    metrics[keys.SHRINK_KEY] = int(step.phase == "shrink")
    add_memory_budget(metrics, context)
    arrays = ArrayRecord({n: Array(t.numpy().copy()) for n, t in result.tensors.items()})
    return Message(
        RecordDict({protocol.ARRAYS_KEY: arrays, protocol.METRICS_KEY: metrics}), reply_to=msg
    )


def node_info(msg: Message, context: Context) -> Message:
    """The node's partition id and size, label histogram and declared memory budget."""
    cfg = node_run_config(context)
    partition_id, _ = node_partition(context)
    _, y = node_data(cfg, context)
    histogram = np.bincount(y.astype(np.int64), minlength=NUM_CLASSES[cfg.dataset])
    metrics = MetricRecord(
        {
            "partition-id": partition_id,
            "num-examples": len(y),
            keys.LABEL_HISTOGRAM_KEY: [int(v) for v in histogram],
        }
    )
    add_memory_budget(metrics, context)
    return Message(RecordDict({protocol.METRICS_KEY: metrics}), reply_to=msg)
