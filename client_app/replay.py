"""The client's half of the replay downlink (``downlink = replay``).

A node keeps its copy of the global kept weights and of the server optimizer's per-coordinate
buffers in ``context.state`` (it persists per node across rounds, in simulation and deployment).
A train message then carries either the full weights (first contact, or after a mismatch),
which the node stores, or only the round updates it has not applied, from which it takes the
server's optimizer steps itself and checks each result against the server's hash.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import FedZOError
from fedzo_flwr.protocol.replay import ReplayFormatError, decode_updates
from fedzo_flwr.zo.replay import ReplayState
from fedzo_flwr.zo.settings import optimizer_settings, zo_settings

STATE_ARRAYS = "fedzo-replay"
STATE_META = "fedzo-replay-meta"
_APPLIED = "applied-round"
_STEPS = "optimizer-steps"


class ReplayOutOfSync(FedZOError, LookupError):
    """The node cannot rebuild the global weights from the updates it was sent."""


def _int(config: ConfigRecord, key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReplayOutOfSync(f"message config key {key!r} must be an int, got {value!r:.40}")
    return value


def received_weights(
    cfg: RunConfig, msg: Message, context: Context, sizes: Sequence[int]
) -> torch.Tensor:
    """The global kept weights a train or evaluate message stands for.

    Under ``downlink = replay`` a train message's full weights are stored as the node's replay
    state (they are the weights after the previous round), and a message with ``replay``
    bytes is answered from that state.

    Raises
    ------
    ReplayOutOfSync
        No usable state, updates that do not follow on from it, or a hash mismatch.
    """
    config = msg.content.config_records[protocol.CONFIG_KEY]
    if protocol.REPLAY_KEY in config:
        return _replayed(cfg, config, context, sizes)
    arrays = msg.content.array_records[protocol.ARRAYS_KEY]
    kept = torch.from_numpy(arrays[protocol.KEPT_KEY].numpy().copy())
    if cfg.downlink == "replay" and msg.metadata.message_type == "train":
        values = {name: np.array(array.numpy()) for name, array in arrays.items()}
        _store(context, values, config, _int(config, protocol.ROUND_KEY) - 1)
        context.state.config_records[STATE_META][_STEPS] = _int(
            config, protocol.OPTIMIZER_STEPS_KEY
        )
    return kept


def _replayed(
    cfg: RunConfig, config: ConfigRecord, context: Context, sizes: Sequence[int]
) -> torch.Tensor:
    meta = context.state.config_records.get(STATE_META)
    stored = context.state.array_records.get(STATE_ARRAYS)
    if meta is None or stored is None:
        raise ReplayOutOfSync("no replay state on this node (first contact or restarted)")
    if meta.get(protocol.MASK_ID_KEY) != config.get(protocol.MASK_ID_KEY):
        raise ReplayOutOfSync("the replay state belongs to another mask")
    server_round = _int(config, protocol.ROUND_KEY)
    applied = _int(meta, _APPLIED)
    try:
        updates = decode_updates(
            config.get(protocol.REPLAY_KEY), k=cfg.k, max_updates=cfg.replay_history
        )
    except ReplayFormatError as err:
        raise ReplayOutOfSync(f"unreadable replay payload: {err}") from None
    todo = [u for u in updates if u.server_round > applied]
    if any(u.server_round >= server_round for u in todo):
        raise ReplayOutOfSync(f"updates for round {server_round} or later")
    # Gaps are rounds the server skipped (no update); a missed update shows as a hash mismatch.
    state = ReplayState.from_arrays(
        {name: array.numpy() for name, array in stored.items()},
        sizes,
        zo_settings(cfg),
        optimizer_settings(cfg),
        steps=_int(meta, _STEPS),
    )
    for update in todo:
        if not state.apply(update):
            raise ReplayOutOfSync(f"weights after round {update.server_round} differ (hash)")
    _store(context, state.arrays(), config, server_round - 1)
    context.state.config_records[STATE_META][_STEPS] = state.optimizer.steps
    return state.weights.clone()


def _store(
    context: Context, arrays: dict[str, np.ndarray], config: ConfigRecord, applied: int
) -> None:
    context.state.array_records[STATE_ARRAYS] = ArrayRecord(
        {name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()}
    )
    context.state.config_records[STATE_META] = ConfigRecord(
        {_APPLIED: applied, protocol.MASK_ID_KEY: str(config.get(protocol.MASK_ID_KEY))}
    )
