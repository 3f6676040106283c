"""Validation of train replies: every field checked before use, any failure a ``ReplyRejected``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.protocol.keys import (
    DELTAS_KEY,
    MEMORY_BUDGET_KEY,
    REQUIRED_METRICS,
    ROUND_KEY,
    STATUS_CODE_KEY,
    STATUS_CODES,
    STATUS_DETAIL_KEY,
    STEP_SEEDS_KEY,
)
from fedzo_flwr.protocol.wire import decode_scalars


@dataclass(frozen=True)
class ParsedReply:
    """A validated train reply."""

    partition_id: int
    num_examples: int
    deltas: np.ndarray  # (local_steps, K) float32
    step_seeds: list[int]
    base_loss: float
    seconds: float
    peak_mem_bytes: int
    extra_mem_bytes: int
    memory_budget_mb: float | None = None


@dataclass(frozen=True)
class Status:
    """A validated status record: a code of :data:`~fedzo_flwr.protocol.keys.STATUS_CODES`."""

    code: str
    detail: str


#: Longest ``detail`` kept from a status record (the rest is cut: it only goes to the log).
MAX_STATUS_DETAIL = 200


def parse_status(record: Mapping[str, object]) -> Status:
    """Validate a ``status`` record of a reply (sent instead of a result).

    Raises
    ------
    ReplyRejected
        If ``code`` is not a ``str`` among the known codes, or ``detail`` is present and not a
        ``str``.
    """
    code = record.get(STATUS_CODE_KEY)
    if not isinstance(code, str) or code not in STATUS_CODES:
        raise ReplyRejected(
            f"status code must be one of {sorted(STATUS_CODES)}, got {str(code)[:40]!r}"
        )
    detail = record.get(STATUS_DETAIL_KEY, "")
    if not isinstance(detail, str):
        raise ReplyRejected(f"status detail must be a str, got {type(detail).__name__}")
    return Status(code, detail[:MAX_STATUS_DETAIL])


def parse_reply(
    zo: Mapping[str, object],
    metrics: Mapping[str, object],
    *,
    server_round: int,
    k: int,
    local_steps: int,
    max_abs_delta: float,
    expected_seeds: Sequence[int] | None = None,
) -> ParsedReply:
    """Validate a train reply's records and decode its scalars.

    Raises
    ------
    ReplyRejected
        Missing keys, another round, wrong scalar count, non-finite or absurd values, or step
        seeds other than the ones the server expects from this client, or a value of the
        wrong type (e.g. a list where a number belongs).
    """
    try:
        return _parse_reply(
            zo,
            metrics,
            server_round=server_round,
            k=k,
            local_steps=local_steps,
            max_abs_delta=max_abs_delta,
            expected_seeds=expected_seeds,
        )
    except ReplyRejected:
        raise
    except (TypeError, ValueError, OverflowError) as err:
        raise ReplyRejected(f"malformed reply: {err}") from None


def _parse_reply(
    zo: Mapping[str, object],
    metrics: Mapping[str, object],
    *,
    server_round: int,
    k: int,
    local_steps: int,
    max_abs_delta: float,
    expected_seeds: Sequence[int] | None = None,
) -> ParsedReply:
    for key in (DELTAS_KEY, STEP_SEEDS_KEY, ROUND_KEY):
        if key not in zo:
            raise ReplyRejected(f"reply lacks '{key}'")
    for key in REQUIRED_METRICS:
        if key not in metrics:
            raise ReplyRejected(f"reply lacks metric '{key}'")
    if int(zo[ROUND_KEY]) != server_round:  # type: ignore[call-overload]
        raise ReplyRejected(f"reply is for round {zo[ROUND_KEY]}, this is round {server_round}")
    try:
        raw = zo[DELTAS_KEY]
        deltas = decode_scalars(raw, expected_count=local_steps * k)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ReplyRejected(f"bad scalars: {err}") from None
    if not np.all(np.isfinite(deltas)):
        raise ReplyRejected("scalars contain NaN or inf")
    worst = float(np.max(np.abs(deltas))) if deltas.size else 0.0
    if worst > max_abs_delta:
        raise ReplyRejected(
            f"a loss difference of {worst:.3g} exceeds the bound {max_abs_delta:.3g}"
        )
    seeds = [int(s) for s in zo[STEP_SEEDS_KEY]]  # type: ignore[attr-defined]
    if len(seeds) != local_steps:
        raise ReplyRejected(f"reply has {len(seeds)} step seeds, expected {local_steps}")
    if expected_seeds is not None and list(expected_seeds) != seeds:
        raise ReplyRejected("step seeds differ from the ones assigned to this client")
    num_examples = metrics["num-examples"]
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ReplyRejected(f"num-examples must be a positive int, got {num_examples!r}")
    base_loss = float(metrics["base-loss"])  # type: ignore[arg-type]
    if not math.isfinite(base_loss):
        raise ReplyRejected("base-loss is not finite")
    budget = metrics.get(MEMORY_BUDGET_KEY)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        raise ReplyRejected(f"{MEMORY_BUDGET_KEY} must be a number, got {type(budget).__name__}")
    return ParsedReply(
        partition_id=int(metrics["partition-id"]),  # type: ignore[call-overload]
        num_examples=num_examples,
        deltas=deltas.reshape(local_steps, k),
        step_seeds=seeds,
        base_loss=base_loss,
        seconds=float(metrics["client-seconds"]),  # type: ignore[arg-type]
        peak_mem_bytes=int(metrics["peak-mem-bytes"]),  # type: ignore[call-overload]
        extra_mem_bytes=int(metrics.get("extra-mem-bytes", 0)),  # type: ignore[call-overload]
        memory_budget_mb=None if budget is None else float(budget),
    )
