"""The replay downlink through the real ServerApp, FedZO strategy and ClientApps (in process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array
from inprocess_grid import InProcessGrid, app_config, server_context

from client_app.client_app import app as client_app
from client_app.replay import STATE_ARRAYS
from fedzo_flwr import protocol
from server_app.server_app import app as server_app

BASE = {"k": 8, "prune-iterations": 2, "prune-repeats": 1, "eval-every": 10}


def run(tmp_path, data_dir, name, num_nodes=3, intercept=None, **overrides):
    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": name,
            **BASE,
            **overrides,
        }
    )
    grid = InProcessGrid(client_app, num_nodes, config, intercept=intercept)
    server_app(grid, server_context(config))
    results = json.loads((tmp_path / name / "results.json").read_text())
    return grid, results


def sent_weights(grid):
    """``{(round, node): kept weights}`` of every train message that carried weights."""
    out = {}
    for message in grid.sent:
        if message.metadata.message_type != "train":
            continue
        arrays = message.content.array_records.get(protocol.ARRAYS_KEY)
        if arrays is not None:
            config = message.content.config_records[protocol.CONFIG_KEY]
            out[config[protocol.ROUND_KEY], message.metadata.dst_node_id] = arrays[
                protocol.KEPT_KEY
            ].numpy()
    return out


def node_states():
    """An intercept recording each node's replay weights right after it handled a message.

    Returns the ``{(round, node): weights}`` dict it fills, the intercept, and a list to put the
    grid in once it exists.
    """
    states = {}
    grid_ref: list[InProcessGrid] = []

    def record(node_index, message, reply):
        node_id = grid_ref[0].node_ids[node_index]
        round_ = message.content.config_records[protocol.CONFIG_KEY][protocol.ROUND_KEY]
        stored = grid_ref[0].contexts[node_id].state.array_records.get(STATE_ARRAYS)
        if stored is not None and message.metadata.message_type == "train":
            states[round_, node_id] = stored[protocol.KEPT_KEY].numpy().copy()
        return reply

    return states, record, grid_ref


def trajectory(results):
    keys = ("train_loss", "grad_norm", "accuracy", "loss", "clients")
    return [{k: r.get(k) for k in keys} for r in results["rounds"]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer",
    [
        {"optimizer": "sgd", "lr": 0.05},
        {"optimizer": "momentum", "lr": 0.02},
        {"optimizer": "adam"},
        {
            "optimizer": "adam",
            "adam-beta1": 0.8,
            "adam-beta2": 0.95,
            "weight-decay": 5e-4,
            "clip": 0.05,
            "clip-scope": "client",
            "ema": 0.9,
            "warmup-rounds": 5,
            "lr-schedule": "cosine",
        },
    ],
    ids=["sgd", "momentum", "adam", "adam-recipe-knobs"],
)
def test_every_node_holds_the_servers_weights_after_every_round(tmp_path, data_dir, optimizer):
    rounds = {"num-server-rounds": 32, **optimizer}
    weights_grid, weights_run = run(tmp_path, data_dir, "weights", **rounds)
    states, record, grid_ref = node_states()
    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": "replay",
            **BASE,
            **rounds,
            "downlink": "replay",
        }
    )
    grid = InProcessGrid(client_app, 3, config, intercept=record)
    grid_ref.append(grid)
    server_app(grid, server_context(config))
    replay_run = json.loads((tmp_path / "replay" / "results.json").read_text())
    # The same trajectory, bit for bit: the replaying clients trained on the server's weights.
    assert trajectory(replay_run) == trajectory(weights_run)
    # After each round's message every node holds exactly the weights the server would send.
    expected = sent_weights(weights_grid)
    assert len(states) == 32 * 3
    for (round_, node_id), kept in sorted(states.items()):
        assert np.array_equal(kept, expected[round_, node_id]), (round_, node_id)
    paths = [r["downlink_path"] for r in replay_run["rounds"] if r["round"]]
    assert set(paths[0].values()) == {"weights"}  # first contact
    assert all(set(p.values()) == {"replay"} for p in paths[1:])


def test_corrupted_state_is_detected_and_healed_by_the_full_weights(tmp_path, data_dir):
    holder: list[InProcessGrid] = []

    def corrupt_after_round_3(node_index, message, reply):
        round_ = message.content.config_records[protocol.CONFIG_KEY][protocol.ROUND_KEY]
        if round_ == 3 and node_index == 1:
            context = holder[0].contexts[holder[0].node_ids[1]]
            stored = context.state.array_records[STATE_ARRAYS]
            kept = stored[protocol.KEPT_KEY].numpy().copy()
            kept[0] += 1e-3
            stored[protocol.KEPT_KEY] = Array(kept)
        return reply

    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": "corrupt",
            **BASE,
            "num-server-rounds": 6,
            "downlink": "replay",
        }
    )
    grid = InProcessGrid(client_app, 3, config, intercept=corrupt_after_round_3)
    holder.append(grid)
    server_app(grid, server_context(config))
    results = json.loads((tmp_path / "corrupt" / "results.json").read_text())
    rounds = {r["round"]: r for r in results["rounds"]}
    # Round 4: the corrupted node cannot reproduce the hash; it says so and does not train.
    assert rounds[4]["clients"] == 2
    assert [r["reason"].split(":")[0] for r in rounds[4]["rejected"]] == ["replay-mismatch"]
    pid = str(grid.contexts[grid.node_ids[1]].node_config["partition-id"])
    assert rounds[4]["downlink_path"][pid] == "replay"
    # Round 5: it gets the full weights, trains, and replays again from round 6 on.
    assert rounds[5]["downlink_path"][pid] == "weights" and rounds[5]["clients"] == 3
    assert rounds[6]["downlink_path"][pid] == "replay" and rounds[6]["clients"] == 3


def test_stale_nodes_get_missed_rounds_or_the_weights(tmp_path, data_dir):
    """With 2 of 4 nodes per round and a 2-round history, both paths are taken."""
    _, results = run(
        tmp_path,
        data_dir,
        "stale",
        num_nodes=4,
        **{
            "num-server-rounds": 12,
            "clients-per-round": 2,
            "downlink": "replay",
            "replay-history": 2,
        },
    )
    last_seen: dict[str, int] = {}
    checked = {"replay": 0, "weights": 0}
    for entry in results["rounds"]:
        if not entry["round"]:
            continue
        assert entry["rejected"] == [] and entry["clients"] == 2
        for pid, path in entry["downlink_path"].items():
            # A node last trained in round s holds the weights after s - 1 and needs the updates
            # of rounds s .. r - 1: r - s of them. Weights for a new node or one more than the
            # history (2 rounds) behind; replay otherwise.
            missed = entry["round"] - last_seen.get(pid, -99)
            assert path == ("replay" if missed <= 2 else "weights"), (entry["round"], pid)
            checked[path] += 1
            last_seen[pid] = entry["round"]
    assert checked["replay"] > 0 and checked["weights"] > 4


def test_replay_downlink_bytes(tmp_path, data_dir):
    """After the first round a node receives the envelope and 4K + 35 bytes of round update."""
    k = 200
    grid, results = run(
        tmp_path,
        data_dir,
        "bytes",
        **{"k": k, "num-server-rounds": 3, "downlink": "replay", "optimizer": "sgd"},
    )
    rounds = {r["round"]: r for r in results["rounds"]}
    down = {r: rounds[r]["downlink_bytes"]["per_client"] for r in (1, 2, 3)}
    replay_messages = [
        m
        for m in grid.sent
        if m.metadata.message_type == "train"
        and protocol.REPLAY_KEY in m.content.config_records[protocol.CONFIG_KEY]
    ]
    assert len(replay_messages) == 6
    for message in replay_messages:
        payload = message.content.config_records[protocol.CONFIG_KEY][protocol.REPLAY_KEY]
        assert len(payload) == 4 * k + 35
        assert protocol.ARRAYS_KEY not in message.content.array_records
    weights_bytes = 4 * results["setup"]["kept_coordinates"]
    for pid in down[2]:
        assert down[2][pid] < 4 * k + 35 + 1024  # envelope under 1 kB
        assert down[1][pid] > weights_bytes  # first contact: the weights (and the mask)


def test_a_node_that_lost_its_state_gets_the_weights_again(tmp_path, data_dir):
    """A restarted node (empty context.state, mask still cached in the process) recovers."""
    holder: list[InProcessGrid] = []

    def restart_after_round_2(node_index, message, reply):
        round_ = message.content.config_records[protocol.CONFIG_KEY][protocol.ROUND_KEY]
        if round_ == 2 and node_index == 2:
            context = holder[0].contexts[holder[0].node_ids[2]]
            del context.state.array_records[STATE_ARRAYS]
        return reply

    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": "restart",
            **BASE,
            "num-server-rounds": 5,
            "downlink": "replay",
        }
    )
    grid = InProcessGrid(client_app, 3, config, intercept=restart_after_round_2)
    holder.append(grid)
    server_app(grid, server_context(config))
    rounds = {
        r["round"]: r
        for r in json.loads((tmp_path / "restart" / "results.json").read_text())["rounds"]
    }
    pid = str(grid.contexts[grid.node_ids[2]].node_config["partition-id"])
    assert rounds[3]["clients"] == 2
    assert ["no replay state" in r["reason"] for r in rounds[3]["rejected"]] == [True]
    assert rounds[4]["downlink_path"][pid] == "weights" and rounds[4]["clients"] == 3
    assert rounds[5]["downlink_path"][pid] == "replay" and rounds[5]["clients"] == 3
