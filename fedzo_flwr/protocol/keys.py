"""Record keys and protocol codes shared by the ServerApp and the ClientApps.

Pure Python (no Flower import). What each message carries is described in
:mod:`fedzo_flwr.protocol` (the package docstring).
"""

from __future__ import annotations

import hashlib

ARRAYS_KEY = "arrays"
KEPT_KEY = "kept"
CONFIG_KEY = "config"
ZO_KEY = "zo"
METRICS_KEY = "metrics"
MASK_KEY = "mask"
MASK_ID_KEY = "mask-id"
ROUND_KEY = "server-round"
ROUND_SEED_KEY = "round-seed"
DELTAS_KEY = "deltas"
STEP_SEEDS_KEY = "step-seeds"
FINGERPRINT_SEED_KEY = "fingerprint-seed"
FINGERPRINT_KEY = "fingerprint"
MEMORY_BUDGET_KEY = "memory-budget-mb"
#: Metric a node reports in its first reply: its partition count (the server checks it).
NUM_PARTITIONS_KEY = "num-partitions"

#: ConfigRecord a ClientApp replies with, instead of a result, when it cannot act on a message.
STATUS_KEY = "status"
STATUS_CODE_KEY = "code"
STATUS_DETAIL_KEY = "detail"
#: The node does not hold the mask the message names (e.g. a restarted SuperNode): the server
#: sends it the mask again at its next train message.
STATUS_MASK_MISSING = "mask-missing"
#: Every status code a ClientApp may send.
STATUS_CODES: frozenset[str] = frozenset({STATUS_MASK_MISSING})

REQUIRED_METRICS = ("num-examples", "base-loss", "client-seconds", "peak-mem-bytes", "partition-id")


def mask_id(mask_bytes: bytes) -> str:
    """Identifier of a mask bitmap: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(mask_bytes).hexdigest()[:16]
