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
MASK_MISSING = "mask-missing"
FINGERPRINT_SEED_KEY = "fingerprint-seed"
FINGERPRINT_KEY = "fingerprint"
MEMORY_BUDGET_KEY = "memory-budget-mb"

REQUIRED_METRICS = ("num-examples", "base-loss", "client-seconds", "peak-mem-bytes", "partition-id")


def mask_id(mask_bytes: bytes) -> str:
    """Identifier of a mask bitmap: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(mask_bytes).hexdigest()[:16]
