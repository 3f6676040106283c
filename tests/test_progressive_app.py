"""Progressive block training through the real apps (InProcessGrid): smartfreeze and profl."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array
from inprocess_grid import InProcessGrid, app_config, run_server_logged

from client_app.client_app import app as client_app
from fedzo_flwr.aggregation import client_weights
from fedzo_flwr.data import load_dataset, to_tensor
from fedzo_flwr.models import build_model
from fedzo_flwr.progressive import build_staged, device_budget
from fedzo_flwr.progressive.memory import full_backprop_memory, stage_memory
from fedzo_flwr.run.evaluation import evaluate
from fedzo_flwr.seeding import model_seed
from server_app.message_size import message_nbytes

# LeNet-5, stage split: what each step trains (travels every round) and keeps frozen.
GROW = {
    0: ["conv1.weight", "conv1.bias", "output.0.0.weight", "output.0.3.weight", "output.0.3.bias"],
    1: ["conv2.weight", "conv2.bias", "output.1.2.weight", "output.1.2.bias"],
    2: ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"],
}
GROW_FROZEN = {0: [], 1: ["conv1.weight", "conv1.bias"], 2: [*GROW[0][:2], *GROW[1][:2]]}
SHRINK = {1: ["output.1.2.weight", "output.1.2.bias"], 0: GROW[0][2:]}
SHRINK_FROZEN = {
    1: [*GROW[0][:2], *GROW[1][:2], *GROW[2]],
    0: [*GROW[0][:2], *GROW[1][:2], *SHRINK[1]],
}


def run(tmp_path, data_dir, name, num_nodes=4, intercept=None, **overrides):
    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": name,
            "method": "smartfreeze",
            "num-server-rounds": 5,
            "eval-every": 1,
            "local-batches": 1,
            "pace": "fixed",
            "stage-rounds": "2",
            "checkpoint-every": 0,
            **overrides,
        }
    )
    grid = InProcessGrid(client_app, num_nodes, config, intercept=intercept, message_ids=True)
    lines = run_server_logged(grid, config)
    results = json.loads((tmp_path / name / "results.json").read_text())
    return grid, results, lines


def train_messages(grid):
    return [m for m in grid.sent if m.metadata.message_type == "train"]


def cfg_of(message):
    return message.content.config_records["config"]


@pytest.mark.parametrize("method", ["smartfreeze", "profl"])
def test_only_the_steps_tensors_travel_and_bytes_are_measured(tmp_path, data_dir, method):
    replies = {}

    def keep(node_index, message, reply):
        if message.metadata.message_type == "train":
            replies[message.object_id] = reply
        return reply

    grid, results, _ = run(
        tmp_path, data_dir, method, intercept=keep, **{"method": method, "profl-shrink-rounds": 1}
    )
    rounds = {r["round"]: r for r in results["rounds"]}
    expected_steps = (
        ["grow 0", "grow 0", "grow 1", "grow 1", "grow 2"]
        if method == "smartfreeze"
        else ["shrink 1", "shrink 0", "grow 0", "grow 0", "grow 1"]
    )
    assert [f"{rounds[r]['phase']} {rounds[r]['stage']}" for r in range(1, 6)] == expected_steps
    seen_frozen: set[tuple[int, str, int]] = set()
    for message in train_messages(grid):
        cfg = cfg_of(message)
        phase, stage, rnd = cfg["phase"], cfg["stage"], cfg["server-round"]
        trains = (GROW if phase == "grow" else SHRINK)[stage]
        frozen = (GROW_FROZEN if phase == "grow" else SHRINK_FROZEN)[stage]
        assert list(message.content.array_records["arrays"].keys()) == trains
        node = message.metadata.dst_node_id
        first = (node, phase, stage) not in seen_frozen
        seen_frozen.add((node, phase, stage))
        if frozen and first:  # sent once per step and node, then cached on the node
            assert list(message.content.array_records["frozen"].keys()) == frozen
        else:
            assert "frozen" not in message.content.array_records
        reply = replies[message.object_id]
        assert list(reply.content.array_records["arrays"].keys()) == trains
        pid = str(grid.node_ids.index(node))
        assert rounds[rnd]["downlink_bytes"]["per_client"][pid] == message_nbytes(message)
        assert rounds[rnd]["uplink_bytes"]["per_client"][pid] == message_nbytes(reply)
    if method == "smartfreeze":  # the frozen conv1 costs its float32 values once, in round 3
        down = rounds[3]["downlink_bytes"]["per_client"]["0"]
        again = rounds[4]["downlink_bytes"]["per_client"]["0"]
        floats = sum(build_model("lenet5").state_dict()[n].numel() for n in GROW_FROZEN[1])
        # ... plus the Flower envelope of one ArrayRecord and two Arrays (headers, object ids).
        assert 4 * floats < down - again <= 4 * floats + 1200
    assert all(rounds[r]["clients"] == 4 and rounds[r]["rejected"] == [] for r in range(1, 6))
    changes = results["final"]["stage_changes"]
    assert [(c["round"], c["to"]["phase"], c["to"]["stage"]) for c in changes] == (
        [(2, "grow", 1), (4, "grow", 2)]
        if method == "smartfreeze"
        else [(1, "shrink", 0), (2, "grow", 0), (4, "grow", 1)]
    )


def test_frozen_blocks_stay_bit_identical_and_the_last_stage_is_the_model(tmp_path, data_dir):
    replies = {}

    def keep(node_index, message, reply):
        if message.metadata.message_type == "train":
            replies.setdefault(cfg_of(message)["server-round"], []).append(reply)
        return reply

    grid, results, _ = run(tmp_path, data_dir, "frozen", intercept=keep, **{"num-server-rounds": 6})
    # Ground truth of round 2 (the last of stage 0): the example-weighted mean of the replies.
    last = replies[2]
    examples = [int(r.content.metric_records["metrics"]["num-examples"]) for r in last]
    weights = client_weights(examples, "examples", 0.5)
    block0 = {}
    for name in GROW[0][:2]:
        values = [r.content.array_records["arrays"][name].numpy() for r in last]
        mean = sum(w * v.astype(np.float64) for w, v in zip(weights, values)) / sum(weights)
        block0[name] = np.asarray(mean, dtype=np.float32)
    # Every later message carrying frozen tensors carries exactly those bytes.
    carried = [
        m.content.array_records["frozen"]
        for m in train_messages(grid)
        if "frozen" in m.content.array_records
    ]
    assert len(carried) == 8  # 4 nodes x stages 1 and 2
    for record in carried:
        for name, value in block0.items():
            assert np.array_equal(record[name].numpy(), value)
    checkpoint = torch.load(tmp_path / "frozen" / "model.pt", weights_only=True)
    state = checkpoint["model_state"]
    for name, value in block0.items():
        assert np.array_equal(state[name].numpy(), value)
    assert checkpoint["step"] == {"phase": "grow", "stage": 2}
    # After the last stage the staged model is the ordinary model: same tensors, same outputs.
    model = build_model("lenet5", 10, seed=model_seed(3407))
    model.load_state_dict(state)
    staged = build_staged("lenet5", 10, seed=model_seed(3407))
    staged.model.load_state_dict(state)
    staged.output_modules.load_state_dict(checkpoint["output_modules"])
    data = load_dataset("cifar10", data_dir)
    x = to_tensor(data.x_test[:64], "cifar10")
    with torch.no_grad():
        assert torch.equal(staged.forward_stage(x, 2), model(x))
    _, accuracy = evaluate(model, data.x_test, data.y_test, "cifar10")
    assert accuracy == results["final"]["accuracy"]


def test_a_node_below_a_stages_need_is_never_selected_and_is_logged(tmp_path, data_dir):
    grid, results, lines = run(
        tmp_path, data_dir, "budgets", num_nodes=8, **{"memory-profile": "profl-uniform"}
    )
    staged = build_staged("lenet5", 10, seed=model_seed(3407))
    needs = [stage_memory(staged, t, 32).total_bytes for t in range(3)]
    full = full_backprop_memory(staged.model, 32).total_bytes
    budget = {
        node: device_budget("profl-uniform", pid, full).budget_bytes
        for pid, node in enumerate(grid.node_ids)
    }
    never = sorted(n for n in grid.node_ids if budget[n] < min(needs))
    assert never, "the seeded population should hold a node that fits no stage"
    for message in train_messages(grid):
        stage = cfg_of(message)["stage"]
        assert budget[message.metadata.dst_node_id] >= needs[stage]
    rounds = {r["round"]: r for r in results["rounds"]}
    for r in range(1, 6):
        fits = [n for n in grid.node_ids if budget[n] >= needs[rounds[r]["stage"]]]
        assert rounds[r]["clients"] == rounds[r]["eligible"] == len(fits)
        assert rounds[r]["ineligible"] == sorted(set(grid.node_ids) - set(fits))
        assert rounds[r]["stage_need_bytes"] == needs[rounds[r]["stage"]]
    assert results["final"]["never_eligible"] == never
    assert results["setup"]["eligibility"]["never_eligible"] == [
        grid.node_ids.index(n) for n in never
    ]
    for node in never:
        logged = [line for line in lines if f"node {node} (partition" in line]
        assert len(logged) == 1 and "fits no stage" in logged[0] and "never trains" in logged[0]


def test_fedavg_trains_only_the_nodes_that_fit_full_backprop(tmp_path, data_dir):
    grid, results, lines = run(
        tmp_path,
        data_dir,
        "fedavg",
        num_nodes=8,
        **{"method": "fedavg", "memory-profile": "profl-uniform", "num-server-rounds": 2},
    )
    full = full_backprop_memory(build_model("lenet5"), 32).total_bytes
    fits = sorted(
        node
        for pid, node in enumerate(grid.node_ids)
        if device_budget("profl-uniform", pid, full).budget_bytes >= full
    )
    assert 0 < len(fits) < 8
    for server_round in (1, 2):
        sent = sorted(
            m.metadata.dst_node_id
            for m in train_messages(grid)
            if cfg_of(m)["server-round"] == server_round
        )
        assert sent == fits
    entry = {r["round"]: r for r in results["rounds"]}[1]
    assert entry["clients"] == len(fits)
    assert entry["ineligible"] == sorted(set(grid.node_ids) - set(fits))
    assert entry["probe"]["nodes"] == 8 and entry["probe"]["uplink_bytes"] > 0
    for node in set(grid.node_ids) - set(fits):
        assert sum(f"node {node} (partition" in line for line in lines) == 1


def test_untrusted_replies_are_rejected_and_a_lost_cache_is_resent(tmp_path, data_dir):
    message_grid = []

    def tamper(node_index, message, reply):
        rnd = cfg_of(message)["server-round"]
        if message.metadata.message_type != "train":
            return reply
        arrays = reply.content.array_records.get("arrays") if not reply.has_error() else None
        if rnd == 1 and node_index == 0:
            arrays["conv1.bias"] = Array(np.full(6, np.nan, dtype=np.float32))
        if rnd == 1 and node_index == 1:
            arrays["conv2.weight"] = arrays["conv1.weight"]  # a tensor of another block
        if rnd == 1 and node_index == 2:
            arrays["conv1.weight"] = Array(np.zeros((6, 3, 5, 5), dtype=np.float64))
        if rnd == 3 and node_index == 3:  # the node loses its cached frozen tensors
            del message_grid[0].contexts[message_grid[0].node_ids[3]].state["fedzo-frozen"]
        return reply

    original = InProcessGrid.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        message_grid.append(self)

    InProcessGrid.__init__ = remember
    try:
        grid, results, _ = run(
            tmp_path, data_dir, "tamper", intercept=tamper, **{"stage-rounds": "2,3"}
        )
    finally:
        InProcessGrid.__init__ = original
    rounds = {r["round"]: r for r in results["rounds"]}
    reasons = [r["reason"] for r in rounds[1]["rejected"]]
    assert rounds[1]["clients"] == 1 and len(reasons) == 3
    assert "'conv1.bias' contains NaN or inf" in reasons[0]
    assert "unexpected ['conv2.weight']" in reasons[1]
    assert "'conv1.weight' must be float32 (6, 3, 5, 5), got float64" in reasons[2]
    # Round 4: node 3 answers mask-missing; round 5 sends it the frozen tensors again.
    assert rounds[4]["clients"] == 3
    assert rounds[4]["rejected"][0]["reason"].startswith("mask-missing: no frozen tensors")
    to_node = {
        cfg_of(m)["server-round"]: m
        for m in train_messages(grid)
        if m.metadata.dst_node_id == grid.node_ids[3]
    }
    assert [("frozen" in to_node[r].content.array_records) for r in (3, 4, 5)] == [
        True,
        False,
        True,
    ]
    assert rounds[5]["clients"] == 4


def test_stage_changes_survive_checkpoint_and_resume_bit_exactly(tmp_path, data_dir):
    pace = {
        "pace": "effective-movement",
        "pace-window": 2,
        "pace-tau": 1.0,
        "pace-patience": 1,
        "stage-min-rounds": 3,
        "eval-every": 2,
    }
    _, straight, _ = run(tmp_path, data_dir, "straight", **pace, **{"num-server-rounds": 6})
    run(tmp_path, data_dir, "first", **pace, **{"num-server-rounds": 4})
    checkpoint = tmp_path / "first" / "checkpoint.pt"
    _, resumed, _ = run(
        tmp_path,
        data_dir,
        "resumed",
        **pace,
        **{"num-server-rounds": 6, "resume-from": str(checkpoint)},
    )
    changes = straight["final"]["stage_changes"]
    assert [(c["round"], c["to"]["stage"]) for c in changes] == [(3, 1), (6, 2)]
    assert resumed["final"]["stage_changes"] == changes
    assert resumed["resumed_from"]["round"] == 4
    same = ("accuracy", "loss", "train_loss", "pace_metric", "pace_settled", "stage", "phase")
    for a, b in zip(straight["rounds"], resumed["rounds"], strict=True):
        assert {k: a.get(k) for k in same} == {k: b.get(k) for k in same}, a["round"]
    final = {
        name: torch.load(tmp_path / name / "model.pt", weights_only=True)
        for name in ("straight", "resumed")
    }
    for key, value in final["straight"]["model_state"].items():
        assert torch.equal(value, final["resumed"]["model_state"][key]), key
    for key, value in final["straight"]["output_modules"].items():
        assert torch.equal(value, final["resumed"]["output_modules"][key]), key
