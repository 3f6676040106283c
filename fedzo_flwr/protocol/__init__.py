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
    ``peak-mem-bytes``, ``extra-mem-bytes``, ``partition-id`` and, if the node declares one in
    its node config, ``memory-budget-mb``.
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
    MASK_MISSING,
    MEMORY_BUDGET_KEY,
    METRICS_KEY,
    PROTOCOL_VERSION,
    REQUIRED_METRICS,
    ROUND_KEY,
    ROUND_SEED_KEY,
    STEP_SEEDS_KEY,
    ZO_KEY,
    mask_id,
)
from fedzo_flwr.protocol.replies import ParsedReply, parse_reply

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "DELTAS_KEY",
    "FINGERPRINT_KEY",
    "FINGERPRINT_SEED_KEY",
    "KEPT_KEY",
    "MASK_ID_KEY",
    "MASK_KEY",
    "MASK_MISSING",
    "MEMORY_BUDGET_KEY",
    "METRICS_KEY",
    "PROTOCOL_VERSION",
    "REQUIRED_METRICS",
    "ROUND_KEY",
    "ROUND_SEED_KEY",
    "STEP_SEEDS_KEY",
    "ZO_KEY",
    "ParsedReply",
    "ReplyRejected",
    "mask_id",
    "parse_reply",
]
