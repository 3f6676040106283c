r"""Checkpoints: everything needed to resume a run bit-exactly, written atomically and safely.

A checkpoint holds the validated config, the round it was taken after, the mask, the server
optimizer state (kept weights, Adam/momentum buffers, EMA, step count) and the results so far.
Every other random draw of a run derives from ``(seed, round)``, so nothing else is needed.

File format (version 2), designed so that loading never executes code from the file::

    8 B magic  b"FEDZOCK\x02"
    8 B        length H of the header (little-endian u64)
    H B        header: UTF-8 JSON {"format", "version", "round", "config", "results",
               "tensors_sha256", "tensors_bytes"}
    rest       the tensors (mask, server state) as ``torch.save`` output, read back with
               ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only

The SHA-256 of the tensor part is checked before it is parsed; a truncated, altered or crafted
file (an older pickle-based checkpoint included) is refused with :class:`CheckpointError`, and
so is one whose model, mask or trajectory-relevant settings differ from the run being resumed.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from fedzo_flwr.config import RunConfig
from fedzo_flwr.errors import CheckpointError
from fedzo_flwr.files import atomic_write_bytes
from fedzo_flwr.sparse.mask import Mask

CHECKPOINT_VERSION = 2
MAGIC = b"FEDZOCK\x02"
FORMAT = "fedzo-flwr-checkpoint"
_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 256 * 2**20


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
    torch.save({"mask": {k: v.clone() for k, v in mask.items()}, "server": server_state}, buffer)
    tensors = buffer.getvalue()
    header = json.dumps(
        {
            "format": FORMAT,
            "version": CHECKPOINT_VERSION,
            "round": server_round,
            "config": cfg.to_run_config(),
            "results": results,
            "tensors_sha256": hashlib.sha256(tensors).hexdigest(),
            "tensors_bytes": len(tensors),
        },
        allow_nan=True,
    ).encode()
    atomic_write_bytes(path, MAGIC + _LENGTH.pack(len(header)) + header + tensors)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and integrity-check a checkpoint (does not check compatibility with a run).

    Returns ``{"config", "round", "results", "mask", "server"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"resume-from: no checkpoint at {path}")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(
            f"resume-from: {path} is not a fedzo-flwr checkpoint of version {CHECKPOINT_VERSION} "
            "(wrong magic bytes; checkpoints of version 1 were pickles and are not loaded)"
        )
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise CheckpointError(f"resume-from: {path} is not a readable checkpoint (truncated)")
    (header_bytes,) = _LENGTH.unpack_from(data, len(MAGIC))
    if header_bytes > min(MAX_HEADER_BYTES, len(data) - start):
        raise CheckpointError(f"resume-from: {path} is not a readable checkpoint (truncated)")
    try:
        header = json.loads(data[start : start + header_bytes])
    except ValueError as err:
        raise CheckpointError(f"resume-from: {path} is not a readable checkpoint ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"resume-from: {path} is not a fedzo-flwr checkpoint")
    if header.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"resume-from: {path} has checkpoint version {header.get('version')}, "
            f"this fedzo-flwr reads version {CHECKPOINT_VERSION}"
        )
    tensors = data[start + header_bytes :]
    if len(tensors) != header.get("tensors_bytes") or hashlib.sha256(
        tensors
    ).hexdigest() != header.get("tensors_sha256"):
        raise CheckpointError(f"resume-from: {path} is corrupt (SHA-256 mismatch)")
    try:
        arrays = torch.load(io.BytesIO(tensors), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as err:
        raise CheckpointError(
            f"resume-from: {path} holds objects other than tensors and plain data; refused ({err})"
        ) from None
    if not isinstance(arrays, dict) or set(arrays) != {"mask", "server"}:
        raise CheckpointError(f"resume-from: {path} lacks the mask or the server state")
    if not isinstance(header.get("round"), int) or not isinstance(header.get("config"), dict):
        raise CheckpointError(f"resume-from: {path} has a malformed header")
    return {
        "config": header["config"],
        "round": header["round"],
        "results": header.get("results", {}),
        "mask": arrays["mask"],
        "server": arrays["server"],
    }


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
