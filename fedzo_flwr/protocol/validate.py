"""Strict field validators for everything a reply carries: the one boundary for untrusted data.

Every reply kind (ZO train, FedAvg train, evaluate, pruning phase, and any new one) is parsed by
a function that reads its records **only** through these helpers. Each helper checks the type
(``bool`` is never an int, a float is never an int, a list is never a number), the range, and
for payloads the length, shape and dtype, and raises
:class:`~fedzo_flwr.errors.ReplyRejected` naming the key and what was wrong. Nothing here
converts a value before checking it, so no ``int("x")`` / ``float([1])`` can raise anything
else. The reply loop (``server_app.masked_rounds``) additionally turns any exception a parser
still lets through into a rejection (logged with its type), so an oversight costs one reply, not
the run.

Records are read as plain ``Mapping`` objects (a Flower ``ConfigRecord`` or ``MetricRecord`` is
one), so this module has no Flower import.

Writing a parser for a new reply kind
-------------------------------------
::

    from fedzo_flwr.protocol import validate as v

    def parse_my_reply(metrics: Mapping[str, object], config: Mapping[str, object]) -> MyReply:
        common = v.client_metrics(metrics)               # partition, examples, timings, memory
        stage = v.require_int(config, "stage", low=0, high=16)
        blob = v.require_bytes(config, "payload", length=4 * n)
        values = v.float32_payload(blob, "payload", count=n)
        return MyReply(common, stage, values)

and return the parsed object from the strategy's ``parse_train_reply``: the reply loop counts a
``ReplyRejected`` (or anything else raised) as a rejection with the node id and the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.protocol.keys import NUM_PARTITIONS_KEY

#: Largest value an integer field may hold unless a tighter bound is given (int64 is what a
#: MetricRecord carries; anything near it is nonsense for counts, rounds or ids).
MAX_INT: Final = 2**53
#: Largest believable training-set size of one partition.
MAX_EXAMPLES: Final = 10**9
#: Largest partition id / partition count a federation may use.
MAX_PARTITIONS: Final = 10**6
#: Largest believable memory reading (1 PiB) and compute time (a year), in bytes and seconds.
MAX_MEM_BYTES: Final = float(2**50)
MAX_SECONDS: Final = 3.2e7
#: Largest believable loss value (cross-entropy of a diverged model stays far below it).
MAX_LOSS: Final = 1e6
#: Longest string kept in a rejection reason.
_SHOWN = 40


class _Missing:
    """Sentinel: the field is required."""


REQUIRED: Final = _Missing()


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _lookup(record: Mapping[str, object], key: str, default: object) -> object:
    if key in record:
        return record[key]
    if isinstance(default, _Missing):
        raise ReplyRejected(f"reply lacks '{key}'")
    return default


def require_int(
    record: Mapping[str, object],
    key: str,
    *,
    low: int = -MAX_INT,
    high: int = MAX_INT,
    default: int | _Missing = REQUIRED,
) -> int:
    """``record[key]`` as an ``int`` in ``[low, high]`` (a ``bool`` or a float is refused)."""
    value = _lookup(record, key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReplyRejected(f"'{key}' must be an int, got {type(value).__name__} {_shown(value)}")
    if not low <= value <= high:
        raise ReplyRejected(f"'{key}' = {_shown(value)} is outside [{low}, {high}]")
    return value


def require_float(
    record: Mapping[str, object],
    key: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    default: float | _Missing = REQUIRED,
) -> float:
    """``record[key]`` as a finite ``float`` in ``[low, high]`` (an int is accepted, a bool not)."""
    value = _lookup(record, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyRejected(f"'{key}' must be a number, got {type(value).__name__} {_shown(value)}")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ReplyRejected(f"'{key}' = {_shown(value)} is outside [{low}, {high}]")
    number = float(value)
    if not math.isfinite(number):
        raise ReplyRejected(f"'{key}' is not finite ({number})")
    if not low <= number <= high:
        raise ReplyRejected(f"'{key}' = {number:.6g} is outside [{low:g}, {high:g}]")
    return number


def require_str(record: Mapping[str, object], key: str, *, max_len: int = 256) -> str:
    """``record[key]`` as a ``str`` of at most ``max_len`` characters."""
    value = _lookup(record, key, REQUIRED)
    if not isinstance(value, str):
        raise ReplyRejected(f"'{key}' must be a str, got {type(value).__name__}")
    if len(value) > max_len:
        raise ReplyRejected(f"'{key}' has {len(value)} characters, at most {max_len} allowed")
    return value


def require_bytes(
    record: Mapping[str, object],
    key: str,
    *,
    length: int | None = None,
    max_len: int | None = None,
) -> bytes:
    """``record[key]`` as ``bytes``: exactly ``length`` long, or at most ``max_len``."""
    value = _lookup(record, key, REQUIRED)
    if not isinstance(value, bytes):
        raise ReplyRejected(f"'{key}' must be bytes, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ReplyRejected(f"'{key}' has {len(value)} bytes, expected {length}")
    if max_len is not None and len(value) > max_len:
        raise ReplyRejected(f"'{key}' has {len(value)} bytes, at most {max_len} allowed")
    return value


def require_int_list(
    record: Mapping[str, object],
    key: str,
    *,
    length: int,
    low: int = -MAX_INT,
    high: int = MAX_INT,
) -> list[int]:
    """``record[key]`` as a list of exactly ``length`` ints, each in ``[low, high]``."""
    value = _lookup(record, key, REQUIRED)
    if not isinstance(value, list):
        raise ReplyRejected(f"'{key}' must be a list of int, got {type(value).__name__}")
    if len(value) != length:
        raise ReplyRejected(f"'{key}' has {len(value)} entries, expected {length}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ReplyRejected(f"'{key}' must hold ints, got {type(item).__name__}")
        if not low <= item <= high:
            raise ReplyRejected(f"'{key}' entry {_shown(item)} is outside [{low}, {high}]")
    return list(value)


def float32_payload(data: bytes, key: str, *, count: int, max_abs: float = math.inf) -> np.ndarray:
    """``count`` finite little-endian float32 values packed in ``data`` (``4 * count`` bytes).

    Returns a writable native ``float32`` array; refuses a wrong length, NaN/inf and any value
    whose magnitude exceeds ``max_abs``.
    """
    if len(data) != 4 * count:
        raise ReplyRejected(
            f"'{key}' has {len(data)} bytes, expected {4 * count} ({count} float32 values)"
        )
    values = np.frombuffer(data, dtype="<f4").astype(np.float32)
    return finite_values(values, key, max_abs=max_abs)


def float32_vector(value: object, key: str, *, dim: int) -> np.ndarray:
    """A 1-D ``float32`` array of exactly ``dim`` finite values (e.g. uploaded kept weights)."""
    if not isinstance(value, np.ndarray):
        raise ReplyRejected(f"'{key}' must be an array, got {type(value).__name__}")
    if value.dtype != np.float32 or value.shape != (dim,):
        raise ReplyRejected(
            f"'{key}' must be float32 ({dim},), got {value.dtype} {tuple(value.shape)}"
        )
    return finite_values(value, key)


def finite_values(values: np.ndarray, key: str, *, max_abs: float = math.inf) -> np.ndarray:
    """``values`` if all are finite and within ``max_abs`` in magnitude."""
    if not np.all(np.isfinite(values)):
        raise ReplyRejected(f"'{key}' contains NaN or inf")
    worst = float(np.max(np.abs(values))) if values.size else 0.0
    if worst > max_abs:
        raise ReplyRejected(f"'{key}': a value of {worst:.3g} exceeds the bound {max_abs:.3g}")
    return values


@dataclass(frozen=True)
class ClientMetrics:
    """The fields every train reply's ``metrics`` record carries, whatever the method.

    Attributes
    ----------
    partition_id : int
        The partition the node trains on, in ``[0, MAX_PARTITIONS)``.
    num_partitions : int or None
        The node's partition count (reported at first contact; ``None`` when absent).
    num_examples : int
        The node's partition size as it reports it, in ``[1, MAX_EXAMPLES]``.
    seconds : float
        Client compute time of the round.
    peak_mem_bytes, extra_mem_bytes : int
        Memory readings (sent as doubles; ``extra-mem-bytes`` defaults to 0).
    """

    partition_id: int
    num_partitions: int | None
    num_examples: int
    seconds: float
    peak_mem_bytes: int
    extra_mem_bytes: int


def client_metrics(metrics: Mapping[str, object]) -> ClientMetrics:
    """Validate the common fields of a train reply's ``metrics`` record."""
    num_partitions = (
        require_int(metrics, NUM_PARTITIONS_KEY, low=1, high=MAX_PARTITIONS)
        if NUM_PARTITIONS_KEY in metrics
        else None
    )
    partition_id = require_int(metrics, "partition-id", low=0, high=MAX_PARTITIONS - 1)
    if num_partitions is not None and partition_id >= num_partitions:
        raise ReplyRejected(
            f"'partition-id' = {partition_id} is not below 'num-partitions' = {num_partitions}"
        )
    return ClientMetrics(
        partition_id=partition_id,
        num_partitions=num_partitions,
        num_examples=require_int(metrics, "num-examples", low=1, high=MAX_EXAMPLES),
        seconds=require_float(metrics, "client-seconds", low=0.0, high=MAX_SECONDS),
        peak_mem_bytes=int(require_float(metrics, "peak-mem-bytes", low=0.0, high=MAX_MEM_BYTES)),
        extra_mem_bytes=int(
            require_float(metrics, "extra-mem-bytes", low=0.0, high=MAX_MEM_BYTES, default=0.0)
        ),
    )


#: Longest rejection reason kept (reasons go to the log and to ``results.json``).
MAX_REASON: Final = 300


def rejection_reason(err: Exception) -> str:
    """The reason recorded for a rejected reply; an unforeseen exception is named by its type."""
    text = str(err) if isinstance(err, ReplyRejected) else f"unexpected {type(err).__name__}: {err}"
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."
