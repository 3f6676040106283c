"""No reply can end the run or steer the model: regressions of issue 13, through the real apps.

Type-malformed replies (the three crash paths), partition-id and partition-count claims, the
back-off of a node that keeps failing, skipped rounds' real duration, the paths in ``final``,
and an unforeseen exception inside a parser.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from inprocess_grid import InProcessGrid, app_config, server_context

from client_app.client_app import app as client_app
from fedzo_flwr import protocol
from server_app.server_app import app as server_app

BASE = {"k": 12, "prune-iterations": 2, "prune-repeats": 1, "eval-every": 2}


def run(tmp_path, data_dir, name, num_nodes=3, intercept=None, node_config=None, **overrides):
    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": name,
            "num-server-rounds": 2,
            **BASE,
            **overrides,
        }
    )
    grid = InProcessGrid(client_app, num_nodes, config, intercept)
    for index, extra in (node_config or {}).items():
        grid.contexts[grid.node_ids[index]].node_config.update(extra)
    server_app(grid, server_context(config))
    return grid, json.loads((tmp_path / name / "results.json").read_text())


def round_of(message: Message) -> int:
    return message.content.config_records["config"]["server-round"]


def rebuilt(message: Message, reply: Message, zo=None, metrics=None) -> Message:
    """A copy of ``reply`` with some ``zo`` and ``metrics`` values replaced."""
    zo_record = dict(reply.content.config_records[protocol.ZO_KEY])
    zo_record.update(zo or {})
    metric_record = dict(reply.content.metric_records[protocol.METRICS_KEY])
    metric_record.update(metrics or {})
    content = {
        protocol.ZO_KEY: ConfigRecord(zo_record),
        protocol.METRICS_KEY: MetricRecord(metric_record),
    }
    return Message(RecordDict(content), reply_to=message)


def by_round(results: dict) -> dict[int, dict]:
    return {r["round"]: r for r in results["rounds"] if r["round"]}


# ------------------------------------------------------------------ the three crash paths


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        (protocol.ROUND_KEY, "one", "'server-round' must be an int, got str"),
        (protocol.STEP_SEEDS_KEY, 5, "'step-seeds' must be a list of int, got int"),
        (protocol.STEP_SEEDS_KEY, ["a"], "'step-seeds' must hold ints, got str"),
    ],
)
def test_type_malformed_zo_reply_is_rejected_not_fatal(tmp_path, data_dir, field, value, needle):
    """Each of these ended the run with a ValueError/TypeError before the reply loop's refactor."""

    def malformed(node, message, reply):
        if node == 1 and round_of(message) == 1:
            return rebuilt(message, reply, zo={field: value})
        return reply

    grid, results = run(tmp_path, data_dir, "malformed", intercept=malformed)
    rounds = by_round(results)
    [rejection] = rounds[1]["rejected"]
    assert rejection["node_id"] == grid.node_ids[1] and needle in rejection["reason"]
    assert rounds[1]["clients"] == 2 and rounds[2]["clients"] == 3
    assert results["final"]["rejected_replies"] == 1


def test_unforeseen_parser_exception_is_a_rejection_named_by_its_type(
    tmp_path, data_dir, monkeypatch, caplog
):
    from server_app.strategy import FedZO

    honest = FedZO.parse_train_reply

    def buggy(self, server_round, node_id, reply):
        if node_id == 1034:  # InProcessGrid's node 2
            raise KeyError("an oversight in a parser")
        return honest(self, server_round, node_id, reply)

    monkeypatch.setattr(FedZO, "parse_train_reply", buggy)
    with caplog.at_level(logging.WARNING):
        _, results = run(tmp_path, data_dir, "buggy")
    rounds = by_round(results)
    for entry in rounds.values():
        assert entry["clients"] == 2
        assert entry["rejected"] == [
            {"node_id": 1034, "reason": "unexpected KeyError: 'an oversight in a parser'"}
        ]
    assert "rejected reply from node 1034: unexpected KeyError" in caplog.text


# --------------------------------------------------------------------------- identity


def test_second_node_claiming_a_partition_is_refused_and_the_first_keeps_working(
    tmp_path, data_dir, caplog
):
    def impostor(node, message, reply):
        # From round 2 on, node 0 claims node 1's partition; its reply arrives first.
        if node == 0 and round_of(message) >= 2:
            return rebuilt(message, reply, metrics={"partition-id": 1})
        return reply

    with caplog.at_level(logging.WARNING):
        grid, results = run(
            tmp_path, data_dir, "impostor", intercept=impostor, **{"num-server-rounds": 3}
        )
    rounds = by_round(results)
    owner, intruder = grid.node_ids[1], grid.node_ids[0]
    assert rounds[1]["clients"] == 3 and rounds[1]["rejected"] == []
    for r in (2, 3):
        assert rounds[r]["clients"] == 2
        assert sorted(rounds[r]["client_seconds"]["per_client"]) == ["1", "2"]  # owner counts
        assert rounds[r]["rejected"] == [
            {
                "node_id": intruder,
                "reason": f"refused: partition 1 belongs to node {owner}, which claimed it first",
            }
        ]
    assert f"rejected reply from node {intruder}: refused: partition 1" in caplog.text


def test_partition_claimed_first_by_another_node_is_refused(tmp_path, data_dir):
    # Node 2 is configured with node 0's partition: its claim arrives after node 0's.
    grid, results = run(tmp_path, data_dir, "twin", node_config={2: {"partition-id": 0}})
    for entry in by_round(results).values():
        assert entry["clients"] == 2
        assert entry["rejected"] == [
            {
                "node_id": grid.node_ids[2],
                "reason": f"refused: partition 0 belongs to node {grid.node_ids[0]}, "
                "which claimed it first",
            }
        ]


def test_node_whose_num_partitions_disagrees_is_refused(tmp_path, data_dir):
    # Node 2 was started for a 5-way split of the data: its partition overlaps the others'.
    grid, results = run(
        tmp_path,
        data_dir,
        "split",
        node_config={2: {"num-partitions": 5}},
        **{"num-server-rounds": 1},
    )
    entry = by_round(results)[1]
    assert entry["clients"] == 2
    assert entry["rejected"] == [
        {
            "node_id": grid.node_ids[2],
            "reason": "refused: num-partitions 5 disagrees with the federation's 3",
        }
    ]


def test_first_reply_without_num_partitions_is_refused(tmp_path, data_dir):
    def silent(node, message, reply):
        if node == 0 and round_of(message) == 1:
            metrics = dict(reply.content.metric_records[protocol.METRICS_KEY])
            del metrics[protocol.NUM_PARTITIONS_KEY]
            zo = reply.content.config_records[protocol.ZO_KEY]
            content = {protocol.ZO_KEY: zo, protocol.METRICS_KEY: MetricRecord(metrics)}
            return Message(RecordDict(content), reply_to=message)
        return reply

    grid, results = run(tmp_path, data_dir, "silent", intercept=silent)
    rounds = by_round(results)
    assert rounds[1]["rejected"] == [
        {"node_id": grid.node_ids[0], "reason": "a first reply must report 'num-partitions'"}
    ]
    assert rounds[2]["clients"] == 3  # it got the mask again and reported the split


@pytest.mark.parametrize("method", ["zo-pruned", "fedavg"])
def test_later_claim_of_more_examples_than_first_contact_is_refused(tmp_path, data_dir, method):
    def inflate(node, message, reply):
        if node == 0 and round_of(message) == 2:
            metrics = dict(reply.content.metric_records[protocol.METRICS_KEY])
            metrics["num-examples"] = 10**8
            content = dict(reply.content)
            content[protocol.METRICS_KEY] = MetricRecord(metrics)
            return Message(RecordDict(content), reply_to=message)
        return reply

    grid, results = run(
        tmp_path, data_dir, "inflate", intercept=inflate, method=method, **{"local-batches": 1}
    )
    rounds = by_round(results)
    assert rounds[1]["rejected"] == []
    [rejection] = rounds[2]["rejected"]
    assert rejection["node_id"] == grid.node_ids[0]
    assert rejection["reason"].startswith("refused: num-examples 100000000 exceeds partition 0's")


# ----------------------------------------------------------------------------- back-off


def test_failing_node_is_set_aside_with_exponential_backoff(tmp_path, data_dir, caplog):
    with caplog.at_level(logging.WARNING):
        grid, results = run(
            tmp_path,
            data_dir,
            "backoff",
            node_config={1: {"data-dir": str(tmp_path / "missing")}},
            **{"num-server-rounds": 13, "eval-every": 13, "k": 4},
        )
    broken = grid.node_ids[1]
    contacted = [round_of(m) for m in grid.sent if m.metadata.dst_node_id == broken]
    # Fails rounds 1-3, then set aside for 1, 2, 4 rounds between retries.
    assert contacted == [1, 2, 3, 5, 8, 13]
    to_broken = [m for m in grid.sent if m.metadata.dst_node_id == broken]
    masks = [round_of(m) for m in to_broken if protocol.MASK_KEY in m.content["config"]]
    assert masks == contacted  # it never held the mask; but it is not sent every round
    healthy = [m for m in grid.sent if m.metadata.dst_node_id == grid.node_ids[0]]
    assert len(healthy) == 13
    assert results["final"]["rejected_replies"] == 6
    assert "failed 3 rounds in a row" in caplog.text and "set aside for 1 round," in caplog.text
    assert "set aside for 4 rounds, retried in round 13" in caplog.text


def test_node_that_recovers_is_forgiven(tmp_path, data_dir):
    def flaky(node, message, reply):
        return None if node == 1 and round_of(message) in (1, 2) else reply  # two timeouts

    grid, _ = run(tmp_path, data_dir, "flaky", intercept=flaky, **{"num-server-rounds": 5, "k": 4})
    contacted = [round_of(m) for m in grid.sent if m.metadata.dst_node_id == grid.node_ids[1]]
    assert contacted == [1, 2, 3, 4, 5]


# ---------------------------------------------------- skipped rounds, paths in "final"


def test_skipped_round_records_its_real_duration(tmp_path, data_dir, caplog):
    def slow_and_bad(node, message, reply):
        if round_of(message) == 2 and node == 0:
            time.sleep(0.3)
            return None
        return reply

    with caplog.at_level(logging.INFO):
        _, results = run(
            tmp_path, data_dir, "slow", intercept=slow_and_bad, **{"min-clients": 3, "k": 4}
        )
    entry = by_round(results)[2]
    assert entry["skipped"] is True
    assert entry["round_seconds"] >= 0.3
    line = next(x for x in caplog.messages if x.startswith("[fedzo] round 2/2"))
    assert line.endswith(f"{entry['round_seconds']:.2f}s") and not line.endswith(" 0.00s")


@pytest.mark.parametrize(("method", "resumable"), [("zo-pruned", True), ("fedavg", False)])
def test_final_names_the_model_and_the_resumable_checkpoint(tmp_path, data_dir, method, resumable):
    _, results = run(tmp_path, data_dir, "paths", method=method, **{"k": 4, "local-batches": 1})
    run_dir = tmp_path / "paths"
    assert results["final"]["model"] == str(run_dir / "model.pt")
    assert (run_dir / "model.pt").is_file()
    if resumable:
        assert results["final"]["checkpoint"] == str(run_dir / "checkpoint.pt")
        assert (run_dir / "checkpoint.pt").is_file()
    else:
        assert results["final"]["checkpoint"] is None


def test_fedavg_rounds_are_weighted_like_the_zo_server(tmp_path, data_dir):
    """MaskedFedAvg uses fedzo_flwr.aggregation.client_weights (here: uniform)."""
    sent = {}

    def capture(node, message, reply):
        if round_of(message) == 1 and not reply.has_error():
            sent[node] = reply.content.array_records["arrays"]["kept"].numpy().copy()
        return reply

    grid, _ = run(
        tmp_path,
        data_dir,
        "uniform",
        intercept=capture,
        method="fedavg",
        weighting="uniform",
        **{"num-server-rounds": 2, "local-batches": 1, "k": 4},
    )
    second = next(m for m in grid.sent if round_of(m) == 2)
    got = second.content.array_records["arrays"]["kept"].numpy()
    expected = sent[0] * (1 / 3)
    expected += sent[1] * (1 / 3)
    expected += sent[2] * (1 / 3)
    assert np.array_equal(got, expected)
