"""Checkpoints: everything needed to resume a run bit-exactly, written atomically.

A checkpoint holds the validated config, the round it was taken after, the mask, the server
optimizer state (kept weights, Adam/momentum buffers, EMA, step count) and the results so far.
Every other random draw of a run derives from ``(seed, round)``, so nothing else is needed.
The payload is stored with its SHA-256; a truncated or altered file is refused, and so is one
whose model, mask or trajectory-relevant settings differ from the run being resumed.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import CheckpointError
from fedzo_flwr.files import atomic_write_bytes
from fedzo_flwr.sparse.mask import Mask

CHECKPOINT_VERSION = 1


def save_checkpoint(
    path: Path,
    cfg: RunConfig,
    server_round: int,
    mask: Mask,
    server_state: dict[str, Any],
    results: dict[str, Any],
) -> None:
    """Write a checkpoint to ``path`` (temporary file, then rename)."""
    buffer = io.BytesIO()
    torch.save(
        {
            "config": cfg.to_run_config(),
            "round": server_round,
            "mask": {k: v.clone() for k, v in mask.items()},
            "server": server_state,
            "results": results,
        },
        buffer,
    )
    payload = buffer.getvalue()
    envelope = {
        "format": "fedzo-flwr-checkpoint",
        "version": CHECKPOINT_VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": payload,
    }
    atomic_write_bytes(path, pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and integrity-check a checkpoint (does not check compatibility with a run)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"resume-from: no checkpoint at {path}")
    try:
        envelope = pickle.loads(path.read_bytes())  # our own file format (see save_checkpoint)
    except Exception as err:  # truncated or not a checkpoint at all
        raise CheckpointError(f"resume-from: {path} is not a readable checkpoint ({err})") from None
    if not isinstance(envelope, dict) or envelope.get("format") != "fedzo-flwr-checkpoint":
        raise CheckpointError(f"resume-from: {path} is not a fedzo-flwr checkpoint")
    if envelope.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"resume-from: {path} has checkpoint version {envelope.get('version')}, "
            f"this fedzo-flwr reads version {CHECKPOINT_VERSION}"
        )
    payload = envelope.get("payload", b"")
    if hashlib.sha256(payload).hexdigest() != envelope.get("sha256"):
        raise CheckpointError(f"resume-from: {path} is corrupt (SHA-256 mismatch)")
    state = torch.load(io.BytesIO(payload), weights_only=False)
    if not isinstance(state, dict):
        raise CheckpointError(f"resume-from: {path} does not hold a checkpoint state (a dict)")
    return state


def check_compatible(state: dict[str, Any], cfg: RunConfig, mask: Mask, path: Path) -> None:
    """Refuse a checkpoint whose settings or mask differ from the run being resumed."""
    saved = RunConfig.from_run_config(state["config"])
    differing = saved.trajectory_differences(cfg)
    if differing:
        details = ", ".join(
            f"{k}: checkpoint {saved.to_run_config()[k]!r} vs run {cfg.to_run_config()[k]!r}"
            for k in differing
        )
        raise CheckpointError(f"resume-from: {path} was made with different settings ({details})")
    saved_mask = state["mask"]
    if set(saved_mask) != set(mask) or any(
        saved_mask[k].shape != mask[k].shape or not torch.equal(saved_mask[k], mask[k])
        for k in mask
    ):
        raise CheckpointError(f"resume-from: the mask in {path} differs from this run's mask")
    if state["round"] >= cfg.num_server_rounds:
        raise CheckpointError(
            f"resume-from: {path} is at round {state['round']}, nothing left to do for "
            f"num-server-rounds={cfg.num_server_rounds}"
        )
