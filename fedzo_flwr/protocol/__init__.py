"""The protocol between the ServerApp and the ClientApps: record keys, replies, byte formats.

Pure Python (no Flower import) so both apps and the tests share one definition.

Train message (server -> client)
    ``arrays``: ArrayRecord ``{"kept": float32 (dim,)}`` — the global model's kept coordinates.
    ``config``: ConfigRecord with ``server-round``, ``round-seed`` and ``mask-id`` (SHA-256 of
    the mask bitmap), plus ``mask`` (the bitmap, bytes) the first time a node is contacted.

Train reply (client -> server)
    ``zo``: ConfigRecord with ``deltas`` (bytes: local-steps x K float32 loss differences),
    ``step-seeds`` (list of int) and ``server-round``; at first contact also ``fingerprint``
    (SHA-256 of the node's directions for ``fingerprint-seed``), which the server checks.
    ``metrics``: MetricRecord with ``num-examples``, ``base-loss``, ``client-seconds``,
    ``peak-mem-bytes``, ``extra-mem-bytes``, ``partition-id``, at first contact (the message
    carried the mask) ``num-partitions``, and, if the node declares one in its node config,
    ``memory-budget-mb``. Every field is validated by :mod:`fedzo_flwr.protocol.validate`.

Progressive block training (``method = smartfreeze | profl``)
    its node-info query, train message and reply: :mod:`fedzo_flwr.protocol.progressive`.

Status reply (client -> server, instead of a result)
    ``status``: ConfigRecord with ``code`` (one of ``STATUS_CODES``, e.g. ``mask-missing``: the
    node does not hold the mask named by ``mask-id``; the server sends it again with the node's
    next train message) and ``detail`` (free text, for the log). Only a node that cannot act on a
    message sends one; normal replies carry no status record.

Replay downlink (``downlink = replay``, server -> client)
    After a node's first contact, a train message may carry ``replay`` (bytes: the round updates
    the node has not applied, :mod:`fedzo_flwr.protocol.replay`) and no ArrayRecord; the node
    rebuilds the weights from its own copy and checks the hash. Full-weight messages under
    ``replay`` also carry the optimizer's per-coordinate buffers (ArrayRecord entries
    ``optimizer.<name>``) and ``optimizer-steps``. A node that cannot rebuild the weights
    replies with the status ``replay-mismatch``.
"""

from __future__ import annotations

from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.protocol.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DELTAS_KEY,
    FINGERPRINT_KEY,
    FINGERPRINT_SEED_KEY,
    KEPT_KEY,
    MASK_ID_KEY,
    MASK_KEY,
    MEMORY_BUDGET_KEY,
    METRICS_KEY,
    NUM_PARTITIONS_KEY,
    OPTIMIZER_STEPS_KEY,
    PROTOCOL_VERSION,
    REPLAY_KEY,
    REQUIRED_METRICS,
    ROUND_KEY,
    ROUND_SEED_KEY,
    STATUS_CODE_KEY,
    STATUS_CODES,
    STATUS_DETAIL_KEY,
    STATUS_KEY,
    STATUS_MASK_MISSING,
    STATUS_REPLAY_MISMATCH,
    STEP_SEEDS_KEY,
    ZO_KEY,
    mask_id,
)
from fedzo_flwr.protocol.replies import ParsedReply, Status, parse_reply, parse_status

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "DELTAS_KEY",
    "FINGERPRINT_KEY",
    "FINGERPRINT_SEED_KEY",
    "KEPT_KEY",
    "MASK_ID_KEY",
    "MASK_KEY",
    "MEMORY_BUDGET_KEY",
    "METRICS_KEY",
    "NUM_PARTITIONS_KEY",
    "OPTIMIZER_STEPS_KEY",
    "PROTOCOL_VERSION",
    "REPLAY_KEY",
    "REQUIRED_METRICS",
    "ROUND_KEY",
    "ROUND_SEED_KEY",
    "STATUS_CODES",
    "STATUS_CODE_KEY",
    "STATUS_DETAIL_KEY",
    "STATUS_KEY",
    "STATUS_MASK_MISSING",
    "STATUS_REPLAY_MISMATCH",
    "STEP_SEEDS_KEY",
    "ZO_KEY",
    "ParsedReply",
    "ReplyRejected",
    "Status",
    "mask_id",
    "parse_reply",
    "parse_status",
]
