"""Memory-profile eligibility of the zeroth-order methods (server_app/memory_gate.py).

On a ``profl-uniform`` population some budgets are below a zeroth-order client's analytic need:
those nodes must never receive a train message, every other node must, and the need recorded
must be the memory model's own number for the configured engine.
"""

from __future__ import annotations

import json

import pytest
import torch
from inprocess_grid import InProcessGrid, app_config, run_server_logged

from client_app.client_app import app as client_app
from fedzo_flwr.config import RunConfig
from fedzo_flwr.measure.memory_model import stream_breakdown, zo_breakdown
from fedzo_flwr.models import build_model
from fedzo_flwr.progressive import device_budget
from fedzo_flwr.progressive.memory import full_backprop_memory
from fedzo_flwr.run.setup import initial_model
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.client_need import per_copy_bytes, zo_client_need
from fedzo_flwr.zo.engines.fused import chunk_for_budget

NODES = 8
BASE = {
    "num-server-rounds": 2,
    "eval-every": 2,
    "k": 4,
    "checkpoint-every": 0,
    "prune-iterations": 2,
    "prune-repeats": 1,
    "memory-profile": "profl-uniform",
}


def run(tmp_path, data_dir, name, **overrides):
    config = app_config(
        **{"data-dir": str(data_dir), "output-dir": str(tmp_path), "run-name": name},
        **{**BASE, **overrides},
    )
    grid = InProcessGrid(client_app, NODES, config, message_ids=True)
    lines = run_server_logged(grid, config)
    results = json.loads((tmp_path / name / "results.json").read_text())
    return grid, RunConfig.from_run_config(config), results, lines


def budgets(grid):
    """Each node's profl-uniform budget: U[0.12, 1.07] x LeNet-5 full backprop, by partition."""
    full = full_backprop_memory(build_model("lenet5"), 32).total_bytes
    return {
        node: device_budget("profl-uniform", pid, full).budget_bytes
        for pid, node in enumerate(grid.node_ids)
    }


@pytest.mark.parametrize(
    ("method", "engine", "micro_batch"),
    [("zo-dense", "stream", 4), ("zo-pruned", "lean", 0)],
)
def test_zo_nodes_below_the_client_need_never_train(
    tmp_path, data_dir, method, engine, micro_batch
):
    grid, cfg, results, lines = run(
        tmp_path,
        data_dir,
        method,
        method=method,
        engine=engine,
        **{"micro-batch": micro_batch, "downlink": "replay"},
    )
    # Ground truth: the memory model on the run's own θ0 and mask.
    init = initial_model(cfg)
    x = torch.zeros(32, 3, 32, 32)
    expected = (
        stream_breakdown(init.model, init.mask, x, micro_batch)
        if engine == "stream"
        else zo_breakdown(init.model, init.mask, x)
    ).total_bytes
    budget = budgets(grid)
    fits = sorted(n for n in grid.node_ids if budget[n] >= expected)
    assert 0 < len(fits) < NODES, "the seeded population must hold nodes on both sides"
    for server_round in (1, 2):
        sent = sorted(
            m.metadata.dst_node_id
            for m in grid.sent
            if m.metadata.message_type == "train"
            and m.content.config_records["config"]["server-round"] == server_round
        )
        assert sent == fits
    rounds = {r["round"]: r for r in results["rounds"] if r["round"]}
    for entry in rounds.values():
        assert entry["zo_need_bytes"] == expected
        assert entry["clients"] == len(fits)
        assert entry["ineligible"] == sorted(set(grid.node_ids) - set(fits))
    assert rounds[1]["probe"]["nodes"] == NODES and rounds[1]["probe"]["uplink_bytes"] > 0
    assert rounds[2]["probe"]["nodes"] == 0
    assert results["setup"]["zo_client_need"]["total_bytes"] == expected
    assert results["setup"]["zo_client_need"]["engine"] == engine
    for node in set(grid.node_ids) - set(fits):  # logged once, like FedAvg's misfits
        logged = [line for line in lines if f"node {node} (partition" in line]
        assert len(logged) == 1 and f"zeroth-order client step ({engine} engine)" in logged[0]


def test_memory_margin_scales_the_need(tmp_path, data_dir):
    margin = 0.5
    grid, _, results, _ = run(
        tmp_path,
        data_dir,
        "margin",
        method="zo-dense",
        engine="lean",
        **{"memory-margin": margin, "num-server-rounds": 1, "eval-every": 1},
    )
    need = zo_breakdown(build_model("lenet5", seed=0), None, torch.zeros(32, 3, 32, 32))
    budget = budgets(grid)
    fits = sorted(n for n in grid.node_ids if budget[n] >= need.total_bytes * (1 + margin))
    bare = [n for n in grid.node_ids if budget[n] >= need.total_bytes]
    assert 0 < len(fits) < len(bare), "the margin must set aside a node that fits the bare need"
    sent = sorted(m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train")
    assert sent == fits
    assert results["rounds"][-1]["ineligible"] == sorted(set(grid.node_ids) - set(fits))


def test_without_a_memory_profile_every_node_trains(tmp_path, data_dir):
    grid, _, results, _ = run(
        tmp_path,
        data_dir,
        "none",
        method="zo-dense",
        **{"memory-profile": "none", "num-server-rounds": 1, "eval-every": 1},
    )
    sent = sorted(m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train")
    assert sent == sorted(grid.node_ids)
    assert not [m for m in grid.sent if m.metadata.message_type.startswith("query")]
    assert "zo_need_bytes" not in results["rounds"][-1]
    assert "zo_client_need" not in results["setup"]


@pytest.mark.parametrize("fd", ["forward", "central"])
def test_fused_need_adds_the_chunk_the_engine_sizes_to_its_budget(fd):
    model = build_model("lenet5", seed=0)
    x = torch.zeros(32, 3, 32, 32)
    cfg = RunConfig(engine="fused", k=200, fd=fd, engine_memory_mb=8.0)
    need = zo_client_need(cfg, model, None)
    rows = 1 if fd == "forward" else 2
    copy = per_copy_bytes(model, KeptSpace(model), x)
    # A copy: every parameter, one direction over them, one forward pass's activations.
    params = sum(p.numel() for p in model.parameters())
    assert copy > 8 * params
    assert need.chunk == chunk_for_budget(copy, rows, 8.0, 200)
    assert need.chunk * rows * copy <= 8 * 2**20 < (need.chunk + 1) * rows * copy
    assert need.total_bytes == zo_breakdown(model, None, x).total_bytes + need.working_bytes
    assert need.working_bytes == need.chunk * rows * copy
    # An explicit chunk-size wins, bounded by K; lean and stream add nothing.
    small = zo_client_need(RunConfig(engine="fused", k=3, chunk_size=16), model, None)
    assert small.chunk == 3
    assert zo_client_need(RunConfig(engine="lean"), model, None).working_bytes == 0
    stream = zo_client_need(RunConfig(engine="stream", micro_batch=2), model, None)
    assert stream.total_bytes == stream_breakdown(model, None, x, 2).total_bytes
