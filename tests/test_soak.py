"""Soak: 500 in-process rounds in which a seeded 20 % of the replies are faulty in random ways.

The real ServerApp, FedZO strategy and ClientApps (tiny: LeNet-5, K = 4, one pruning
iteration, 4 nodes) run 500 rounds. From round 2 on (round 1 binds every node's partition),
each train reply is, with probability 0.2, replaced by one of :data:`FAULTS` (malformed types,
wrong lengths, NaN, inflated example counts, another node's partition, a different partition
count, missing or garbage records, a crash, or no reply at all); node 3 also crashes for rounds
200-259. The run must complete, ``results.json`` must be valid, and the rejections it records
must be exactly the faults injected (node, round and a reason naming the fault), no more.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from inprocess_grid import InProcessGrid, app_config, server_context

from client_app.client_app import app as client_app
from fedzo_flwr import protocol
from server_app.server_app import app as server_app

ROUNDS = 500
NODES = 4
FAULT_RATE = 0.2
CRASH_NODE, CRASH_ROUNDS = 3, range(200, 260)

#: Fault kind -> what the rejection reason must contain (``None``: no reply arrives).
FAULTS: dict[str, str | None] = {
    "round-as-string": "'server-round' must be an int, got str",
    "seeds-as-int": "'step-seeds' must be a list of int, got int",
    "seeds-as-strings": "'step-seeds' must hold ints, got str",
    "nan-deltas": "'deltas' contains NaN or inf",
    "short-deltas": "'deltas' has 12 bytes, expected 16",
    "inflated-examples": "refused: num-examples 100000000 exceeds partition",
    "foreign-partition": "refused: partition",
    "other-split": "refused: num-partitions 7 disagrees with the federation's 4",
    "no-metrics": "reply lacks the 'zo' or 'metrics' record",
    "garbage-zo": "reply lacks metric",
    "crash": "client error: injected crash",
    "no-reply": None,
}


def faulty(kind: str, message: Message, reply: Message, node: int) -> Message | None:
    """``reply`` turned into a fault of ``kind``."""
    if kind == "no-reply":
        return None
    if kind == "crash":
        return Message(Error(code=0, reason="injected crash"), reply_to=message)
    zo = dict(reply.content.config_records[protocol.ZO_KEY])
    metrics = dict(reply.content.metric_records[protocol.METRICS_KEY])
    content: dict[str, object] = {}
    if kind == "round-as-string":
        zo[protocol.ROUND_KEY] = "next"
    elif kind == "seeds-as-int":
        zo[protocol.STEP_SEEDS_KEY] = 7
    elif kind == "seeds-as-strings":
        zo[protocol.STEP_SEEDS_KEY] = ["a"]
    elif kind == "nan-deltas":
        zo[protocol.DELTAS_KEY] = np.full(4, np.nan, dtype="<f4").tobytes()
    elif kind == "short-deltas":
        zo[protocol.DELTAS_KEY] = bytes(12)
    elif kind == "inflated-examples":
        metrics["num-examples"] = 10**8
    elif kind == "foreign-partition":
        metrics["partition-id"] = (node + 1) % NODES
    elif kind == "other-split":
        metrics[protocol.NUM_PARTITIONS_KEY] = 7
    elif kind == "garbage-zo":
        metrics = {"num-examples": 5}
    if kind == "no-metrics":
        content = {protocol.ZO_KEY: ConfigRecord(zo)}
    else:
        content = {protocol.ZO_KEY: ConfigRecord(zo), protocol.METRICS_KEY: MetricRecord(metrics)}
    return Message(RecordDict(content), reply_to=message)


@pytest.mark.slow
def test_soak_500_rounds_with_20_percent_faulty_replies(tmp_path, data_dir):
    rng = random.Random(20260413)
    injected: dict[tuple[int, int], str] = {}  # (round, node id) -> fault kind
    replies = 0

    def inject(node, message, reply):
        nonlocal replies
        if message.metadata.message_type != "train":
            return reply
        replies += 1
        server_round = message.content.config_records["config"]["server-round"]
        kind = None
        if node == CRASH_NODE and server_round in CRASH_ROUNDS:
            kind = "crash"
        elif server_round > 1 and rng.random() < FAULT_RATE:
            kind = rng.choice(sorted(FAULTS))
        if kind is None:
            return reply
        injected[(server_round, message.metadata.dst_node_id)] = kind
        return faulty(kind, message, reply, node)

    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": "soak",
            "num-server-rounds": ROUNDS,
            "eval-every": 250,
            "k": 4,
            "prune-iterations": 1,
            "prune-repeats": 1,
            "checkpoint-every": 0,
        }
    )
    grid = InProcessGrid(client_app, NODES, config, intercept=inject)
    started = time.perf_counter()
    server_app(grid, server_context(config))
    wall = time.perf_counter() - started

    results = json.loads((tmp_path / "soak" / "results.json").read_text())
    rounds = [r for r in results["rounds"] if r["round"]]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all("round_seconds" in r for r in rounds)
    assert results["final"]["accuracy"] is not None
    recorded = {(r["round"], x["node_id"]): x["reason"] for r in rounds for x in r["rejected"]}
    arriving = {key: kind for key, kind in injected.items() if FAULTS[kind] is not None}
    assert set(recorded) == set(arriving)  # every fault rejected, no honest reply rejected
    for key, kind in arriving.items():
        assert FAULTS[kind] in recorded[key], (key, kind, recorded[key])
    assert results["final"]["rejected_replies"] == len(arriving)
    by_kind = Counter(injected.values())
    assert len(by_kind) == len(FAULTS)  # every kind was exercised
    skipped = sum(1 for r in rounds if r.get("skipped"))
    crash_contacts = sum(
        1 for (r, n) in injected if n == grid.node_ids[CRASH_NODE] and r in CRASH_ROUNDS
    )
    assert crash_contacts < len(CRASH_ROUNDS) // 2  # set aside, retried with back-off
    summary = {
        "rounds": ROUNDS,
        "nodes": NODES,
        "train_replies_sent": replies,
        "faults_injected": len(injected),
        "faults_by_kind": dict(sorted(by_kind.items())),
        "rejections_counted": results["final"]["rejected_replies"],
        "no_reply": by_kind["no-reply"],
        "skipped_rounds": skipped,
        "crash_node_contacts_in_crash_window": crash_contacts,
        "final_accuracy": results["final"]["accuracy"],
        "wall_seconds": round(wall, 1),
    }
    print("SOAK", json.dumps(summary))
