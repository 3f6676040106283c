"""Record keys and protocol codes shared by the ServerApp and the ClientApps.

Pure Python (no Flower import). What each message carries is described in
:mod:`fedzo_flwr.protocol` (the package docstring).
"""

from __future__ import annotations

import hashlib

PROTOCOL_VERSION = 2
"""Version of what the scalars mean. 2: a direction is drawn per KeptSpace tensor, block by
block (:func:`fedzo_flwr.seeding.direction_block_seed`); 1 drew it whole. The direction
fingerprint covers it, so nodes of different versions refuse each other at first contact."""

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
#: ``downlink = replay``: the node could not rebuild the global weights from the round updates
#: it was sent (its state was lost or does not match the server's hash): it did not train, and
#: the server sends it the full weights at its next train message.
STATUS_REPLAY_MISMATCH = "replay-mismatch"
#: Every status code a ClientApp may send.
STATUS_CODES: frozenset[str] = frozenset({STATUS_MASK_MISSING, STATUS_REPLAY_MISMATCH})

#: ``downlink = replay``: the round updates a node has not applied (bytes, protocol/replay.py),
#: sent instead of the kept weights.
REPLAY_KEY = "replay"
#: With full weights under ``downlink = replay``: the server optimizer's step count, so the node
#: can take the same steps (its per-coordinate buffers travel in the ArrayRecord).
OPTIMIZER_STEPS_KEY = "optimizer-steps"

REQUIRED_METRICS = ("num-examples", "base-loss", "client-seconds", "peak-mem-bytes", "partition-id")


def mask_id(mask_bytes: bytes) -> str:
    """Identifier of a mask bitmap: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(mask_bytes).hexdigest()[:16]
