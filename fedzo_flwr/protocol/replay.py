"""Byte format of the replay downlink: the round updates a node has not applied yet.

One ``bytes`` value (a single ConfigRecord entry, so record keys cost nothing per round), all
little-endian::

    header   u8 version (1) | u16 number of updates
    update   u32 server round | 8 B kept-weights hash | u16 number of seed groups
    group    f64 share | u16 local steps
    step     u64 seed | K x f32 coefficients

So one round of ``seed-mode = shared`` with one local step costs ``4K + 32`` bytes, plus 3 for
the header: K = 200 gives 835 bytes. Decoding is strict (exact length, known version, finite
coefficients, shares in (0, 1], increasing rounds): the bytes come over the network, and a
malformed payload is refused whole with :class:`ReplayFormatError`, never half applied.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedzo_flwr.errors import FedZOError
from fedzo_flwr.zo.replay import RoundUpdate, SeedGroup

VERSION = 1
_HEADER = struct.Struct("<BH")
_UPDATE = struct.Struct("<I8sH")
_GROUP = struct.Struct("<dH")
_SEED = struct.Struct("<Q")


class ReplayFormatError(FedZOError, ValueError):
    """Replay bytes that do not decode to valid round updates."""


def encoded_nbytes(updates: Sequence[RoundUpdate]) -> int:
    """Length of :func:`encode_updates` of ``updates`` (without encoding them)."""
    size = _HEADER.size
    for update in updates:
        size += _UPDATE.size
        for group in update.groups:
            steps, k = group.coefficients.shape
            size += _GROUP.size + steps * (_SEED.size + 4 * k)
    return size


def encode_updates(updates: Sequence[RoundUpdate]) -> bytes:
    """Pack ``updates`` (oldest first) into the replay format."""
    parts = [_HEADER.pack(VERSION, len(updates))]
    for update in updates:
        parts.append(
            _UPDATE.pack(update.server_round, bytes.fromhex(update.kept_hash), len(update.groups))
        )
        for group in update.groups:
            parts.append(_GROUP.pack(group.share, len(group.seeds)))
            for seed, row in zip(group.seeds, group.coefficients, strict=True):
                parts.append(_SEED.pack(seed))
                parts.append(np.ascontiguousarray(row, dtype="<f4").tobytes())
    return b"".join(parts)


def decode_updates(data: object, *, k: int, max_updates: int) -> list[RoundUpdate]:
    """Unpack and validate replay bytes for a run with ``k`` directions per step.

    Raises
    ------
    ReplayFormatError
        Wrong type, version, length or values; nothing is returned half decoded.
    """
    if not isinstance(data, bytes):
        raise ReplayFormatError(f"replay payload must be bytes, got {type(data).__name__}")
    reader = _Reader(data)
    version, count = reader.take(_HEADER)
    if version != VERSION:
        raise ReplayFormatError(f"replay format version {version}, this node reads {VERSION}")
    if count > max_updates:
        raise ReplayFormatError(f"{count} round updates, at most {max_updates} expected")
    updates: list[RoundUpdate] = []
    for _ in range(count):
        server_round, digest, n_groups = reader.take(_UPDATE)
        if n_groups < 1:
            raise ReplayFormatError(f"round {server_round}: no seed groups")
        groups = []
        for _ in range(n_groups):
            share, steps = reader.take(_GROUP)
            if not (math.isfinite(share) and 0 < share <= 1) or steps < 1:
                raise ReplayFormatError(f"round {server_round}: bad share {share} or steps {steps}")
            seeds, rows = [], []
            for _ in range(steps):
                (seed,) = reader.take(_SEED)
                row = np.frombuffer(reader.raw(4 * k), dtype="<f4").astype(np.float32)
                if not np.all(np.isfinite(row)):
                    raise ReplayFormatError(f"round {server_round}: non-finite coefficients")
                seeds.append(int(seed))
                rows.append(row)
            groups.append(SeedGroup(float(share), tuple(seeds), np.stack(rows)))
        updates.append(RoundUpdate(int(server_round), tuple(groups), digest.hex()))
    if reader.left:
        raise ReplayFormatError(f"{reader.left} trailing bytes after the last update")
    rounds = [u.server_round for u in updates]
    if rounds != sorted(set(rounds)):
        raise ReplayFormatError(f"round numbers must increase, got {rounds}")
    return updates


class _Reader:
    """Sequential reads from a bytes object with exact-length checks."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.offset

    def raw(self, size: int) -> bytes:
        if size > self.left:
            raise ReplayFormatError(
                f"truncated replay payload: {size} bytes needed, {self.left} left"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def take(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.raw(layout.size))
