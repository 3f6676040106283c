"""Validation of train replies: every field checked before use, any failure a ``ReplyRejected``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.protocol import validate as v
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
    num_partitions: int | None = None


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
    """Validate a ZO train reply's records and decode its scalars.

    Every field is type-, range- and length-checked through :mod:`fedzo_flwr.protocol.validate`
    before it is used; nothing is converted before it is checked.

    Raises
    ------
    ReplyRejected
        Missing keys, a value of the wrong type (e.g. a string round, an int or a list of
        strings for the step seeds), another round, a wrong scalar count, non-finite or absurd
        values, or step seeds other than the ones the server expects from this client.
    """
    for key in REQUIRED_METRICS:
        if key not in metrics:
            raise ReplyRejected(f"reply lacks metric '{key}'")
    reported_round = v.require_int(zo, ROUND_KEY, low=0)
    if reported_round != server_round:
        raise ReplyRejected(f"reply is for round {reported_round}, this is round {server_round}")
    raw = v.require_bytes(zo, DELTAS_KEY)
    deltas = v.float32_payload(raw, DELTAS_KEY, count=local_steps * k, max_abs=max_abs_delta)
    seeds = v.require_int_list(zo, STEP_SEEDS_KEY, length=local_steps, low=0, high=2**63 - 1)
    if expected_seeds is not None and list(expected_seeds) != seeds:
        raise ReplyRejected("step seeds differ from the ones assigned to this client")
    common = v.client_metrics(metrics)
    base_loss = v.require_float(metrics, "base-loss", low=0.0, high=v.MAX_LOSS)
    budget = (
        v.require_float(metrics, MEMORY_BUDGET_KEY, low=0.0, high=v.MAX_MEM_BYTES)
        if MEMORY_BUDGET_KEY in metrics
        else None
    )
    return ParsedReply(
        partition_id=common.partition_id,
        num_examples=common.num_examples,
        deltas=deltas.reshape(local_steps, k),
        step_seeds=seeds,
        base_loss=base_loss,
        seconds=common.seconds,
        peak_mem_bytes=common.peak_mem_bytes,
        extra_mem_bytes=common.extra_mem_bytes,
        memory_budget_mb=budget,
        num_partitions=common.num_partitions,
    )
