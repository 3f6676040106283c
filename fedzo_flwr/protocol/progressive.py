"""Record keys of progressive block training (``method = smartfreeze | profl``).

Pure Python and numpy (no Flower import).

Node-info query (server -> client, ``query.node_info``, once per node before it can train)
    ``config``: ConfigRecord with ``server-round``.

Node-info reply (client -> server)
    ``metrics``: MetricRecord with ``partition-id``, ``num-examples`` (the partition size),
    ``label-histogram`` (examples per class, list of int) and, if the node declares one in its
    node config, ``memory-budget-mb``. The server takes the declared budget, or else draws the
    node's simulated budget from ``memory-profile`` seeded by the reported partition id.

Train message (server -> client)
    ``arrays``: the step's trainable tensors by name (model ``state_dict`` keys and
    ``output.<t>.<name>``), every round. ``frozen``: the step's frozen tensors, only when the
    node does not hold them yet (once per step). ``config``: ``server-round``, ``round-seed``,
    ``phase`` (``grow`` or ``shrink``), ``stage`` and ``mask-id`` = :func:`frozen_id` of the
    frozen tensors the node must use (a node that lacks them answers with status
    ``mask-missing`` and gets them with its next train message).

Train reply (client -> server)
    ``arrays``: exactly the trained tensors (float32, their shapes, finite);
    ``metrics``: ``num-examples``, ``train-loss``, ``train-examples``, ``steps``,
    ``client-seconds``, ``peak-mem-bytes``, ``extra-mem-bytes``, ``partition-id``, ``stage``,
    ``shrink`` (1 while shrinking, else 0) and, if declared, ``memory-budget-mb``.

``zo-progressive`` (zeroth-order progressive training) uses the node-info query as above and
the zeroth-order train messages (:mod:`fedzo_flwr.protocol.keys`): ``arrays`` holds ``kept``,
the active stage's kept coordinates (its KeptSpace order); ``frozen`` the stage's frozen tensors
(blocks ``0..t-1`` by name, dense with zeros at pruned entries) only when the node does not hold
them; ``config`` adds ``stage`` and ``frozen-id`` = :func:`frozen_id` of those tensors (``""``
at stage 0) to the zeroth-order keys (``mask-id`` names the staged mask, whose bitmap travels at
first contact; ``fingerprint-seed`` travels at a node's first message of every stage). The reply
is a zeroth-order reply whose ``zo`` record also carries ``stage``; its ``fingerprint`` is over
the active stage's KeptSpace sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

__all__ = [
    "FROZEN_ID_KEY",
    "FROZEN_KEY",
    "LABEL_HISTOGRAM_KEY",
    "NODE_INFO_ACTION",
    "PHASE_KEY",
    "SHRINK_KEY",
    "STAGE_KEY",
    "frozen_id",
]

NODE_INFO_ACTION = "node_info"
FROZEN_KEY = "frozen"
FROZEN_ID_KEY = "frozen-id"
PHASE_KEY = "phase"
STAGE_KEY = "stage"
SHRINK_KEY = "shrink"
LABEL_HISTOGRAM_KEY = "label-histogram"


def frozen_id(tensors: Mapping[str, np.ndarray]) -> str:
    """Identifier of a set of frozen tensors: 16 hex digits of the SHA-256 of names and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]
