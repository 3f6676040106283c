"""The Flower apps end to end, in process: real ServerApp, strategy and ClientApps."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from inprocess_grid import ROOT, InProcessGrid, app_config, server_context

from client_app.client_app import app as client_app
from fedzo_flwr import protocol
from fedzo_flwr.config import ConfigError, RunConfig
from fedzo_flwr.models import build_model
from fedzo_flwr.protocol.wire import encode_scalars, mask_nbytes
from fedzo_flwr.run.setup import initial_model
from server_app.server_app import RunSetupError
from server_app.server_app import app as server_app

ROUND_FIELDS = {
    "round",
    "uplink_bytes",
    "downlink_bytes",
    "client_seconds",
    "client_peak_mem_bytes",
    "forward_flops",
    "density",
    "clients",
    "rejected",
    "train_loss",
}


def run_inprocess(tmp_path, data_dir, num_nodes=4, intercept=None, **overrides):
    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": "run",
            "num-server-rounds": 3,
            "eval-every": 3,
            "k": 20,
            "prune-iterations": 2,
            **overrides,
        }
    )
    grid = InProcessGrid(client_app, num_nodes, config, intercept=intercept)
    server_app(grid, server_context(config))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    return grid, results, RunConfig.from_run_config(config)


def test_pyproject_defaults_are_the_config_defaults():
    with open(ROOT / "pyproject.toml", "rb") as handle:
        table = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_run_config(table) == RunConfig()
    assert set(table) == set(RunConfig().to_run_config())


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    grid, results, cfg = run_inprocess(tmp, data_dir)
    return tmp, grid, results, cfg


def test_results_schema_and_scalars_arrive(three_rounds):
    tmp, _, results, _ = three_rounds
    assert results["config"]["k"] == 20 and results["config"]["model"] == "lenet5"
    rounds = {r["round"]: r for r in results["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    assert set(rounds[0]) == {"round", "accuracy", "loss"}
    for r in (1, 2, 3):
        entry = rounds[r]
        assert ROUND_FIELDS <= set(entry), ROUND_FIELDS - set(entry)
        assert entry["clients"] == 4 and entry["rejected"] == []
        assert sorted(entry["uplink_bytes"]["per_client"]) == ["0", "1", "2", "3"]
        assert entry["density"] == pytest.approx(0.1)
        assert (
            entry["forward_flops"]["per_client"]["0"]
            == results["setup"]["client_round_forward_flops"]
        )
        assert all(v > 0 for v in entry["client_seconds"]["per_client"].values())
        assert entry["client_peak_mem_bytes"]["max"] > 50 * 2**20
    assert 0.0 <= rounds[3]["accuracy"] <= 1.0 and np.isfinite(rounds[3]["loss"])
    assert results["final"]["accuracy"] == rounds[3]["accuracy"]
    assert (tmp / "run" / "results.png").stat().st_size > 10_000
    assert results["setup"]["kept_weights"] == 6177  # ceil(0.1 * 61,770)


def test_global_model_changes_and_pruned_weights_stay_zero(three_rounds):
    tmp, _, _, cfg = three_rounds
    checkpoint = torch.load(tmp / "run" / "model.pt", weights_only=True)
    start = initial_model(cfg)
    mask = checkpoint["mask"]
    assert all(torch.equal(mask[n], start.mask[n]) for n in mask)
    state = checkpoint["model_state"]
    changed = 0
    for name, tensor in start.model.state_dict().items():
        final = state[name]
        if name in mask:
            assert torch.count_nonzero(final[~mask[name]]) == 0, name
        changed += int(torch.count_nonzero(final != tensor))
    assert changed > 0.9 * (6177 + 236)  # Adam moves (almost) every kept coordinate


def test_mask_is_sent_once_per_node(three_rounds):
    _, grid, results, _ = three_rounds
    train_messages = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_messages) == 12
    with_mask = [
        m for m in train_messages if protocol.MASK_KEY in m.content.config_records["config"]
    ]
    assert len(with_mask) == 4 and {m.metadata.dst_node_id for m in with_mask} == set(grid.node_ids)
    down = {r["round"]: r["downlink_bytes"]["per_client"] for r in results["rounds"] if r["round"]}
    mask_bytes = results["setup"]["mask_bytes"]
    assert mask_bytes == mask_nbytes(build_model("lenet5")) == 7722
    for pid in down[1]:
        # Round 1 also carries the mask bitmap and the fingerprint seed (keys, prefixes, value).
        assert mask_bytes <= down[1][pid] - down[2][pid] <= mask_bytes + 64
        assert abs(down[2][pid] - down[3][pid]) <= 2  # seed and round are varint-coded


def test_uplink_is_k_float32_plus_fixed_envelope(three_rounds):
    _, _, results, cfg = three_rounds
    up = {r["round"]: r["uplink_bytes"]["per_client"] for r in results["rounds"] if r["round"]}
    later = [v - 4 * cfg.k for r in (2, 3) for v in up[r].values()]
    assert max(later) == min(later)  # a fixed envelope: measured values travel as doubles
    assert 0 < later[0] < 1024
    # First contact adds the generator fingerprint (its key and 64 hex digits) and the
    # num-partitions metric (its key and an int), nothing else.
    first = [v - 4 * cfg.k - later[0] for v in up[1].values()]
    assert all(64 + len("num-partitions") < extra <= 96 + 32 for extra in first)

    # The scalars travel as float32 bytes: K more directions cost exactly 4K more bytes.
    def record_size(k: int) -> int:
        deltas = encode_scalars(np.linspace(-1e-3, 1e-3, k))
        return len(ConfigRecord({protocol.DELTAS_KEY: deltas, protocol.ROUND_KEY: 1}).deflate())

    assert record_size(200) - record_size(100) == 400


def test_shared_seed_mode_reconstructs_once_per_round(tmp_path, data_dir):
    _, results, _ = run_inprocess(
        tmp_path, data_dir, num_nodes=3, **{"seed-mode": "shared", "num-server-rounds": 2}
    )
    assert [r["reconstructions"] for r in results["rounds"] if r["round"]] == [1, 1]


def test_per_client_mode_with_local_steps(tmp_path, data_dir):
    _, results, _ = run_inprocess(
        tmp_path,
        data_dir,
        num_nodes=3,
        **{"local-steps": 2, "num-server-rounds": 2, "seed-mode": "per-client"},
    )
    entries = [r for r in results["rounds"] if r["round"]]
    assert [r["reconstructions"] for r in entries] == [6, 6]
    assert all(r["clients"] == 3 for r in entries)
    # Two steps of 20 scalars each travel: 160 bytes of payload.
    assert all(min(r["uplink_bytes"]["per_client"].values()) > 160 for r in entries)


def test_stream_engine_through_the_apps_trains_like_lean(tmp_path, data_dir):
    # The engine is chosen by the run config alone; two local steps exercise the client's
    # local SGD between stream steps, micro-batches the loss in parts.
    runs = {}
    for engine, extra in (("lean", {}), ("stream", {"micro-batch": 8})):
        _, results, _ = run_inprocess(
            tmp_path / engine,
            data_dir,
            num_nodes=2,
            **{"engine": engine, "num-server-rounds": 2, "local-steps": 2, **extra},
        )
        runs[engine] = [r for r in results["rounds"] if r["round"]]
    for lean, streamed in zip(runs["lean"], runs["stream"], strict=True):
        assert streamed["train_loss"] == pytest.approx(lean["train_loss"], rel=1e-5)
        assert streamed["uplink_bytes"] == lean["uplink_bytes"]
        assert streamed["downlink_bytes"] == lean["downlink_bytes"]


@pytest.mark.parametrize("method", ["zo-pruned", "fedavg"])
def test_node_that_lost_its_mask_gets_it_again(tmp_path, data_dir, method):
    from client_app import client_app as client_module

    replies = {}

    def forget(node_index, message, reply):
        # Node 1 loses its state after round 1 (e.g. a restarted SuperNode), and in round 2 it
        # runs in a fresh process (no module cache), as a deployed ClientApp always does.
        server_round = message.content.config_records["config"]["server-round"]
        replies[(node_index, server_round)] = reply
        if node_index == 1 and server_round == 1:
            del grid.contexts[grid.node_ids[1]].state["fedzo"]
        if node_index == 0 and server_round == 2:
            client_module._MODELS.clear()
        return reply

    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": "run",
            "method": method,
            "num-server-rounds": 3,
            "eval-every": 3,
            "k": 10,
            "local-batches": 1,
            "prune-iterations": 2,
        }
    )
    grid = InProcessGrid(client_app, 3, config, intercept=forget, message_ids=True)
    server_app(grid, server_context(config))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rounds = {r["round"]: r for r in results["rounds"]}
    # The protocol state travels as a code in a normal reply, not as an error text.
    lost = replies[(1, 2)]
    assert not lost.has_error()
    assert set(lost.content.config_records) == {protocol.STATUS_KEY}
    assert lost.content.config_records[protocol.STATUS_KEY]["code"] == "mask-missing"
    assert rounds[2]["clients"] == 2
    assert rounds[2]["rejected"] == [
        {
            "node_id": grid.node_ids[1],
            "reason": f"mask-missing: no mask {_mask_id(grid)} cached on this node",
        }
    ]
    to_node_1 = {
        m.content.config_records["config"]["server-round"]: m
        for m in grid.sent
        if m.metadata.dst_node_id == grid.node_ids[1]
    }
    assert protocol.MASK_KEY not in to_node_1[2].content.config_records["config"]
    assert protocol.MASK_KEY in to_node_1[3].content.config_records["config"]  # re-sent
    assert rounds[3]["clients"] == 3 and rounds[3]["rejected"] == []
    assert results["final"]["rejected_replies"] == 1


def _mask_id(grid):
    return grid.sent[0].content.config_records["config"][protocol.MASK_ID_KEY]


def test_status_codes_are_type_checked(tmp_path, data_dir):
    bad = {1: {"code": 7}, 2: {"code": "reboot", "detail": "x"}}

    def odd_status(node_index, message, reply):
        server_round = message.content.config_records["config"]["server-round"]
        if server_round == 1 and node_index in bad:
            status = ConfigRecord(bad[node_index])
            return Message(RecordDict({protocol.STATUS_KEY: status}), reply_to=message)
        return reply

    _, results, _ = run_inprocess(
        tmp_path, data_dir, num_nodes=3, intercept=odd_status, **{"num-server-rounds": 2}
    )
    first = {r["round"]: r for r in results["rounds"]}[1]
    reasons = [r["reason"] for r in first["rejected"]]
    assert first["clients"] == 1 and len(reasons) == 2
    assert all(f"status code must be one of {sorted(protocol.STATUS_CODES)}" in r for r in reasons)
    assert "got '7'" in reasons[0] and "got 'reboot'" in reasons[1]


def test_node_that_lost_its_mask_before_evaluating_reports_it(tmp_path, data_dir):
    from client_app import client_app as client_module

    replies = []

    def forget_before_evaluating(node_index, message, reply):
        # Node 2 loses its state after training round 1 and evaluates in a fresh process (the
        # in-process nodes share one module cache: clear it before node 2 runs).
        if message.metadata.message_type == "evaluate":
            replies.append(reply)
            client_module._MODELS.clear()
        elif node_index == 2 and message.content.config_records["config"]["server-round"] == 1:
            del grid.contexts[grid.node_ids[2]].state["fedzo"]
        return reply

    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": "run",
            "num-server-rounds": 2,
            "eval-every": 2,
            "k": 10,
            "prune-iterations": 2,
            "fraction-evaluate": 1.0,
        }
    )
    grid = InProcessGrid(client_app, 3, config, intercept=forget_before_evaluating)
    server_app(grid, server_context(config))
    lost = [r for r in replies if protocol.STATUS_KEY in r.content.config_records]
    assert len(lost) == 1 and not lost[0].has_error()
    assert lost[0].content.config_records[protocol.STATUS_KEY]["code"] == "mask-missing"
    # Round 2's train message re-sends node 2 the mask it reported missing.
    second = [
        m
        for m in grid.sent
        if m.metadata.message_type == "train"
        and m.content.config_records["config"]["server-round"] == 2
    ]
    with_mask = {m.metadata.dst_node_id for m in second if protocol.MASK_KEY in m.content["config"]}
    assert with_mask == {grid.node_ids[2]}


def test_federated_evaluation_samples_a_bounded_seeded_share(tmp_path, data_dir):
    import random

    from fedzo_flwr.seeding import evaluate_sample_seed

    def evaluated(name, seed):
        config = app_config(
            **{
                "data-dir": str(data_dir),
                "output-dir": str(tmp_path),
                "run-name": name,
                "seed": seed,
                "num-server-rounds": 3,
                "eval-every": 3,
                "k": 10,
                "prune-iterations": 2,
                "fraction-evaluate": 0.4,
            }
        )
        grid = InProcessGrid(client_app, 5, config)
        server_app(grid, server_context(config))
        rounds = {}
        for m in grid.sent:
            if m.metadata.message_type == "evaluate":
                cfg = m.content.config_records["config"]
                assert cfg[protocol.MASK_ID_KEY] == _mask_id(grid)
                rounds.setdefault(cfg["server-round"], []).append(m.metadata.dst_node_id)
        return grid.node_ids, rounds

    node_ids, rounds = evaluated("a", 7)
    # ceil(0.4 x 5) = 2 nodes per round, drawn from the evaluate_sample_seed stream.
    for server_round in (1, 2, 3):
        chooser = random.Random(evaluate_sample_seed(7, server_round))
        assert sorted(rounds[server_round]) == sorted(chooser.sample(node_ids, 2))
    assert evaluated("b", 7)[1] == rounds  # reproducible


def test_federated_evaluation_takes_the_ceiling_of_the_fraction(tmp_path, data_dir):
    evaluations = []

    def capture(node_index, message, reply):
        if message.metadata.message_type == "evaluate":
            evaluations.append(message.metadata.dst_node_id)
        return reply

    run_inprocess(
        tmp_path,
        data_dir,
        num_nodes=3,
        intercept=capture,
        **{"num-server-rounds": 1, "fraction-evaluate": 0.5},
    )
    assert len(evaluations) == 2  # ceil(0.5 x 3); Flower's int(0.5 x 3) gives 1


@pytest.mark.parametrize("method", ["zo-pruned", "fedavg"])
def test_federated_evaluation_reaches_every_node(tmp_path, data_dir, method):
    evaluations = []

    def capture(node_index, message, reply):
        if message.metadata.message_type == "evaluate":
            evaluations.append(reply)
        return reply

    run_inprocess(
        tmp_path,
        data_dir,
        num_nodes=3,
        intercept=capture,
        method=method,
        **{"num-server-rounds": 1, "fraction-evaluate": 1.0, "local-batches": 1},
    )
    assert len(evaluations) == 3
    for reply in evaluations:
        assert not reply.has_error(), reply.error.reason
        metrics = reply.content.metric_records["metrics"]
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num-examples"] > 0


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"density": 1.5}, "'density'"),
        ({"model": "foo"}, "'model'"),
        ({"fd": "sideways"}, "'fd'"),
        ({"k": 0}, "'k'"),
    ],
)
def test_bad_run_config_fails_fast_naming_the_key(tmp_path, data_dir, overrides, needle):
    config = app_config(**{"data-dir": str(data_dir), "output-dir": str(tmp_path), **overrides})
    grid = InProcessGrid(client_app, 2, config)
    with pytest.raises(RunSetupError, match=needle):
        server_app(grid, server_context(config))
    assert grid.sent == []  # nothing reached a client


def test_missing_data_file_fails_fast_naming_the_path(tmp_path):
    config = app_config(**{"data-dir": str(tmp_path / "nowhere"), "output-dir": str(tmp_path)})
    grid = InProcessGrid(client_app, 2, config)
    with pytest.raises(RunSetupError, match="nowhere"):
        server_app(grid, server_context(config))
    assert grid.sent == []


def test_config_error_lists_allowed_values():
    with pytest.raises(ConfigError, match="'forward' or 'central'"):
        RunConfig.from_run_config({"fd": "x"})
    with pytest.raises(ConfigError, match="key 'nope': unknown key"):
        RunConfig.from_run_config({"nope": 1})
    with pytest.raises(ConfigError, match="valid models: lenet-gn, lenet5, resnet18, resnet20"):
        RunConfig.from_run_config({"model": "vgg"})
