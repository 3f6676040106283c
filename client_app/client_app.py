"""ClientApp: forward-only training; receives weights and a seed, returns K loss differences.

``method = "fedavg"`` (the backprop baseline) trains by local SGD instead and returns its kept
weights; ``method = "smartfreeze" | "profl"`` train one block at a time
(``client_app/progressive.py``), ``method = "zo-progressive"`` forward-only, one block at a time
(``client_app/zo_progressive.py``), and ``query.node_info`` messages ask a node for its partition,
label histogram and memory budget; ``query.prune`` messages score pruning masks on local data
(``snip``, ``ntk-local``).
A node that does not hold the mask a train or evaluate message names answers with a ``status``
record (code ``mask-missing``), not an error, so the server sends the mask again.

With ``engine = "stream"`` (zeroth-order methods) the node holds its model sparse at rest: a
:class:`~fedzo_flwr.zo.engines.stream_model.StreamModel` built straight from the mask bitmap
(:func:`fedzo_flwr.zo.client.stream_model`), into whose kept-value vector every round's weights
(sent or replayed) are loaded; no dense weight tensor and no bool mask exists in the process.
Every other engine (and ``fedavg``) holds the dense masked model and its KeptSpace.
"""

from __future__ import annotations

import logging
import time
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.replay import ReplayOutOfSync, received_weights
from fedzo_flwr import protocol
from fedzo_flwr.config import PROGRESSIVE_METHODS, ZO_PROGRESSIVE, RunConfig
from fedzo_flwr.data import NUM_CLASSES
from fedzo_flwr.data.client_data import load_client_data, load_partition_file
from fedzo_flwr.errors import ConfigError, FedZOError
from fedzo_flwr.fedavg.client import BackpropRound, train_round_backprop
from fedzo_flwr.models import build_model
from fedzo_flwr.protocol.progressive import NODE_INFO_ACTION
from fedzo_flwr.protocol.wire import decode_mask, encode_scalars
from fedzo_flwr.pruning import client as cp
from fedzo_flwr.run.evaluation import evaluate
from fedzo_flwr.seeding import model_seed
from fedzo_flwr.sparse.layout import PackedLayout
from fedzo_flwr.sparse.mask import apply_mask_
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.client import ClientResult, stream_model, train_round
from fedzo_flwr.zo.directions import fingerprint
from fedzo_flwr.zo.engines import StreamModel, UnsupportedModel

app = ClientApp()
logger = logging.getLogger(__name__)

STATE_KEY = "fedzo"
ZO_METHODS = ("zo-pruned", "zo-dense")
Layout = KeptSpace | PackedLayout
# (model, dataset, mask-id, sparse) -> (model, space); survives across rounds inside a simulation
# actor. sparse: a StreamModel and its PackedLayout; else the dense model and its KeptSpace.
_MODELS: dict[tuple[str, str, str, bool], tuple[torch.nn.Module, Layout]] = {}

T = TypeVar("T", int, float, str, bytes)


class MaskMissing(FedZOError, LookupError):
    """The node does not hold the mask a message names (answered with a status code)."""


def config_value(config: ConfigRecord, key: str, kind: type[T]) -> T:
    """``config[key]``, checked to be of type ``kind`` (a missing or mistyped key names itself)."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"message config key {key!r} must be {kind.__name__}, got {value!r:.40}")
    return value


def status_reply(msg: Message, code: str, detail: str) -> Message:
    """A normal reply carrying only a ``status`` record (a protocol state, not a failure)."""
    status = ConfigRecord({protocol.STATUS_CODE_KEY: code, protocol.STATUS_DETAIL_KEY: detail})
    return Message(RecordDict({protocol.STATUS_KEY: status}), reply_to=msg)


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (simulation or SuperNode)."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ConfigError(
            f"node config lacks {err.args[0]!r}: start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None


def sparse_at_rest(cfg: RunConfig) -> bool:
    """Whether the node holds its model sparse at rest (``engine = "stream"``, zeroth-order)."""
    return cfg.engine == "stream" and cfg.method in ZO_METHODS


def masked_model(
    cfg: RunConfig, config: ConfigRecord, context: Context
) -> tuple[torch.nn.Module, Layout]:
    """The model with this run's mask, from the message (first contact) or the node's state.

    A dense masked model and its KeptSpace, or, with :func:`sparse_at_rest`, a StreamModel and
    its PackedLayout (a model the stream engine cannot run falls back to the dense pair).
    """
    wanted = config_value(config, protocol.MASK_ID_KEY, str)
    if protocol.MASK_KEY in config:  # first contact: keep the mask in the node's state
        mask_bytes = config_value(config, protocol.MASK_KEY, bytes)
        context.state[STATE_KEY] = ConfigRecord(
            {protocol.MASK_ID_KEY: wanted, protocol.MASK_KEY: mask_bytes}
        )
    key = (cfg.model, cfg.dataset, wanted, sparse_at_rest(cfg))
    if key in _MODELS:
        return _MODELS[key]
    state = context.state.config_records.get(STATE_KEY)
    if state is None or state.get(protocol.MASK_ID_KEY) != wanted:
        raise MaskMissing(f"no mask {wanted} cached on this node")
    mask_bytes = config_value(state, protocol.MASK_KEY, bytes)
    if protocol.mask_id(mask_bytes) != wanted:
        raise MaskMissing(f"mask bytes do not match mask-id {wanted}")
    _MODELS.clear()  # one run at a time per process
    built: tuple[torch.nn.Module, Layout] | None = None
    if key[3]:
        try:
            sparse = stream_model(cfg.model, NUM_CLASSES[cfg.dataset], mask_bytes)
            built = (sparse, sparse.layout)
        except UnsupportedModel as err:
            logger.warning("model %s held dense: %s", cfg.model, err)
    if built is None:
        model = build_model(cfg.model, NUM_CLASSES[cfg.dataset])
        mask = decode_mask(mask_bytes, model)
        apply_mask_(model, mask)
        built = (model, KeptSpace(model, mask))
    _MODELS[key] = built
    return built


def node_data(cfg: RunConfig, context: Context) -> tuple[np.ndarray, np.ndarray]:
    """The node's training partition, from its ``partition-file`` or the full dataset.

    A ``partition-file`` in the node config (written by ``scripts/split_partitions.py``) lets a
    device store only its own share; otherwise the share is cut from the full dataset.
    """
    partition_id, num_partitions = node_partition(context)
    partition_file = context.node_config.get("partition-file")
    if partition_file:
        return load_partition_file(str(partition_file), cfg, partition_id, num_partitions)
    return load_client_data(cfg, partition_id, num_partitions)


def node_run_config(context: Context) -> RunConfig:
    """The run config, with this node's own ``data-dir`` (``--node-config``) taking precedence."""
    cfg = RunConfig.from_run_config(dict(context.run_config))
    node_data_dir = context.node_config.get("data-dir")
    if node_data_dir:
        cfg = cfg.model_copy(update={"data_dir": str(node_data_dir)})
    return cfg


def _setup(msg: Message, context: Context) -> tuple[RunConfig, torch.nn.Module, Layout]:
    cfg = node_run_config(context)
    if cfg.client_threads:
        torch.set_num_threads(cfg.client_threads)
    config = msg.content.config_records[protocol.CONFIG_KEY]
    model, space = masked_model(cfg, config, context)
    weights = received_weights(cfg, msg, context, space.sizes)
    if isinstance(model, StreamModel):
        model.load_values_(weights)  # into the kept-value vector: nothing dense
    elif isinstance(space, KeptSpace):
        space.scatter_(model, weights)
    del weights
    return cfg, model, space


def backprop_metrics(result: BackpropRound, partition_id: int) -> MetricRecord:
    """The metrics of a backprop train reply (FedAvg, progressive), in their wire order."""
    return MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.train_loss,
            "train-examples": result.train_examples,
            "steps": result.steps,
            "client-seconds": result.seconds,
            # Floats travel as fixed 8-byte doubles: a constant envelope, whatever the value.
            "peak-mem-bytes": float(result.peak_mem_bytes),
            "extra-mem-bytes": float(result.extra_mem_bytes),
            "partition-id": partition_id,
        }
    )


def add_memory_budget(metrics: MetricRecord, context: Context) -> None:
    """Add the node's declared ``memory-budget`` (node config) to ``metrics``, if it has one."""
    budget = context.node_config.get(protocol.MEMORY_BUDGET_KEY)
    if budget:
        metrics[protocol.MEMORY_BUDGET_KEY] = float(budget)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of forward-only training: reply with the K loss differences per local step."""
    if context.run_config.get("method") == ZO_PROGRESSIVE:
        from client_app.zo_progressive import train_zo_progressive  # imports this module

        return train_zo_progressive(msg, context)
    if context.run_config.get("method") in PROGRESSIVE_METHODS:
        from client_app.progressive import train_progressive  # imports this module

        return train_progressive(msg, context)
    try:
        cfg, model, space = _setup(msg, context)
    except MaskMissing as err:
        return status_reply(msg, protocol.STATUS_MASK_MISSING, str(err))
    except ReplayOutOfSync as err:
        return status_reply(msg, protocol.STATUS_REPLAY_MISMATCH, str(err))
    if cfg.method == "fedavg":
        if not isinstance(space, KeptSpace):  # never: sparse_at_rest is zeroth-order only
            raise ConfigError("method 'fedavg' needs the dense model")
        return train_fedavg(msg, context, cfg, model, space)
    config = msg.content.config_records[protocol.CONFIG_KEY]
    partition_id, _ = node_partition(context)
    x, y = node_data(cfg, context)
    seed = config_value(config, protocol.ROUND_SEED_KEY, int)
    result = train_round(cfg, model, space, x, y, seed, partition_id)
    return zo_reply(msg, context, cfg, result, space)


def zo_reply(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    result: ClientResult,
    space: Layout,
    zo_extra: dict[str, int] | None = None,
) -> Message:
    """A zeroth-order train reply: K float32 loss differences per local step and the metrics.

    The generator fingerprint over ``space`` when the message asks for it, the partition count
    at first contact (the message carries the mask), the declared memory budget, and
    ``zo_extra`` in the ``zo`` record (e.g. the stage of ``zo-progressive``).
    """
    config = msg.content.config_records[protocol.CONFIG_KEY]
    partition_id, num_partitions = node_partition(context)
    deltas = [step.deltas for step in result.steps]
    zo = ConfigRecord(
        {
            protocol.DELTAS_KEY: encode_scalars(
                torch.cat([torch.from_numpy(d) for d in deltas]).numpy()
            ),
            protocol.STEP_SEEDS_KEY: [step.seed for step in result.steps],
            protocol.ROUND_KEY: config_value(config, protocol.ROUND_KEY, int),
            **(zo_extra or {}),
        }
    )
    if protocol.FINGERPRINT_SEED_KEY in config:  # first contact: prove generator agreement
        zo[protocol.FINGERPRINT_KEY] = fingerprint(
            space.sizes, config_value(config, protocol.FINGERPRINT_SEED_KEY, int), cfg.directions
        )
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "base-loss": result.base_loss,
            "client-seconds": result.seconds,
            # Floats travel as fixed 8-byte doubles: a constant envelope, whatever the value.
            "peak-mem-bytes": float(result.peak_mem_bytes),
            "extra-mem-bytes": float(result.extra_mem_bytes),
            "partition-id": partition_id,
        }
    )
    if protocol.MASK_KEY in config:  # first contact: the server checks the federation's split
        metrics[protocol.NUM_PARTITIONS_KEY] = num_partitions
    add_memory_budget(metrics, context)
    return Message(RecordDict({protocol.ZO_KEY: zo, protocol.METRICS_KEY: metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received model on (up to 1000 examples of) the local partition."""
    try:
        cfg, model, _ = _setup(msg, context)
    except MaskMissing as err:
        return status_reply(msg, protocol.STATUS_MASK_MISSING, str(err))
    x, y = node_data(cfg, context)
    loss, accuracy = evaluate(model, x[:1000], y[:1000], cfg.dataset)
    metrics = MetricRecord(
        {"loss": loss, "accuracy": accuracy, "num-examples": int(min(len(y), 1000))}
    )
    return Message(RecordDict({protocol.METRICS_KEY: metrics}), reply_to=msg)


def train_fedavg(
    msg: Message, context: Context, cfg: RunConfig, model: torch.nn.Module, space: KeptSpace
) -> Message:
    """The FedAvg baseline: local backprop SGD on the masked model; reply with its kept weights."""
    config = msg.content.config_records[protocol.CONFIG_KEY]
    partition_id, num_partitions = node_partition(context)
    x, y = node_data(cfg, context)
    seed = config_value(config, protocol.ROUND_SEED_KEY, int)
    result = train_round_backprop(cfg, model, space, x, y, seed, partition_id)
    metrics = backprop_metrics(result, partition_id)
    if protocol.MASK_KEY in config:  # first contact: the server checks the federation's split
        metrics[protocol.NUM_PARTITIONS_KEY] = num_partitions
    arrays = ArrayRecord({protocol.KEPT_KEY: Array(result.weights.numpy().copy())})
    return Message(
        RecordDict({protocol.ARRAYS_KEY: arrays, protocol.METRICS_KEY: metrics}), reply_to=msg
    )


@app.query(NODE_INFO_ACTION)
def node_info(msg: Message, context: Context) -> Message:
    """Partition id and size, label histogram and declared memory budget (probed once)."""
    from client_app.progressive import node_info as reply  # imports this module

    return reply(msg, context)


@app.query(cp.PRUNE_ACTION)
def prune_scores(msg: Message, context: Context) -> Message:
    """One iteration of a federated pruning phase: signed mask gradients on local data."""
    start = time.perf_counter()
    cfg = node_run_config(context)
    if cfg.client_threads:
        torch.set_num_threads(cfg.client_threads)
    config = msg.content.config_records[cp.PRUNE_KEY]
    # θ0 of the run (the server's initial weights): NTK-SAP keeps its biases when it redraws the
    # prunable weights (prune-reinit = weights), so every client must score the same θ0.
    model = build_model(cfg.model, NUM_CLASSES[cfg.dataset], seed=model_seed(cfg.seed))
    weights = msg.content.array_records.get(cp.WEIGHTS_KEY)
    if weights is not None:  # snip scores the server's θ0 as sent
        model.load_state_dict(weights.to_torch_state_dict())
    mask = decode_mask(config_value(config, protocol.MASK_KEY, bytes), model)
    partition_id, num_partitions = node_partition(context)
    x, y = node_data(cfg, context)
    grads = cp.client_prune_gradients(
        cfg,
        model,
        mask,
        x,
        y,
        partition_id,
        config_value(config, cp.SCORING_SEED_KEY, int),
    )
    record = ConfigRecord(
        {
            cp.GRADIENTS_KEY: cp.encode_gradients(grads, mask),
            cp.ITERATION_KEY: config_value(config, cp.ITERATION_KEY, int),
        }
    )
    metrics = MetricRecord(
        {
            "num-examples": len(y),
            "partition-id": partition_id,
            protocol.NUM_PARTITIONS_KEY: num_partitions,
            "client-seconds": time.perf_counter() - start,
        }
    )
    return Message(RecordDict({cp.PRUNE_KEY: record, protocol.METRICS_KEY: metrics}), reply_to=msg)
