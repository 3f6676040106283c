"""Baselines through the real Flower apps (in process): FedAvg, dense ZO, every pruner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from inprocess_grid import ROOT, InProcessGrid, app_config, server_context

from client_app.client_app import app as client_app
from fedzo_flwr.config import RunConfig
from fedzo_flwr.data.client_data import load_client_data
from fedzo_flwr.errors import ReplyRejected
from fedzo_flwr.fedavg.client import local_batch_indices, train_round_backprop
from fedzo_flwr.pruning import client as cp
from fedzo_flwr.pruning import local_ntk_mask, prune, snip_mask
from fedzo_flwr.pruning.common import one_shot_prune
from fedzo_flwr.run.setup import build_global_model, initial_model
from fedzo_flwr.sparse.mask import apply_mask_, dense_mask, kept_count, kept_target
from fedzo_flwr.sparse.space import KeptSpace
from server_app.server_app import RunSetupError
from server_app.server_app import app as server_app

NODES = 3
ROUND_FIELDS = {
    "uplink_bytes",
    "downlink_bytes",
    "client_seconds",
    "client_peak_mem_bytes",
    "forward_flops",
    "density",
    "clients",
    "train_loss",
}
# name -> overrides; every run shares the rest of the config (and so data, partitions, seeds).
RUNS = {
    "fedavg-dense": {"method": "fedavg", "density": 1.0},
    "fedavg-ntk": {"method": "fedavg"},
    "zo-dense": {"method": "zo-dense"},
    "zo-ntk": {"method": "zo-pruned", "prune-method": "ntk"},
    "zo-ntk-local": {"method": "zo-pruned", "prune-method": "ntk-local"},
    "zo-snip": {"method": "zo-pruned", "prune-method": "snip"},
    "zo-synflow": {"method": "zo-pruned", "prune-method": "synflow"},
    "zo-magnitude": {"method": "zo-pruned", "prune-method": "magnitude"},
    "zo-random": {"method": "zo-pruned", "prune-method": "random"},
}


def base_config(tmp_path, data_dir, **overrides) -> dict:
    return app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "num-server-rounds": 2,
            "eval-every": 2,
            "k": 10,
            "prune-iterations": 2,
            "prune-repeats": 1,
            "prune-samples": 32,
            "local-batches": 4,
            "local-lr": 0.05,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Every baseline, 2 rounds on 3 nodes: ``name -> (results, model.pt, config dict)``."""
    tmp = tmp_path_factory.mktemp("baselines")
    out = {}
    for name, overrides in RUNS.items():
        config = base_config(tmp, data_dir, **{"run-name": name, **overrides})
        server_app(InProcessGrid(client_app, NODES, config), server_context(config))
        results = json.loads((tmp / name / "results.json").read_text())
        checkpoint = torch.load(tmp / name / "model.pt", weights_only=True)
        out[name] = (results, checkpoint, config)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_each_method_runs_two_rounds(runs, name):
    results, checkpoint, _ = runs[name]
    assert results["config"]["method"] == RUNS[name]["method"]
    rounds = {r["round"]: r for r in results["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    for r in (1, 2):
        assert ROUND_FIELDS <= set(rounds[r]), ROUND_FIELDS - set(rounds[r])
        assert rounds[r]["clients"] == NODES and rounds[r]["rejected"] == []
        assert sorted(rounds[r]["uplink_bytes"]["per_client"]) == ["0", "1", "2"]
        assert all(v > 0 for v in rounds[r]["forward_flops"]["per_client"].values())
        assert rounds[r]["client_peak_mem_bytes"]["max"] > 0
    assert 0.0 <= results["final"]["accuracy"] <= 1.0
    mask = checkpoint["mask"]
    state = checkpoint["model_state"]
    for layer, keep in mask.items():
        assert torch.count_nonzero(state[layer][~keep]) == 0, layer
    expected = kept_target(results["setup"]["density"], results["setup"]["prunable_weights"])
    assert kept_count(mask) == results["setup"]["kept_weights"] == expected


def test_fedavg_with_a_mask_keeps_pruned_weights_zero_and_trains_the_rest(runs, data_dir):
    results, checkpoint, config = runs["fedavg-ntk"]
    cfg = RunConfig.from_run_config(config)
    start = initial_model(cfg)  # data-free NTK: the server's mask is reproducible here
    mask = checkpoint["mask"]
    assert all(torch.equal(mask[n], start.mask[n]) for n in mask)
    assert results["setup"]["density"] == pytest.approx(0.1, abs=1e-4)
    changed = 0
    for name, tensor in start.model.state_dict().items():
        final = checkpoint["model_state"][name]
        if name in mask:
            assert torch.count_nonzero(final[~mask[name]]) == 0
        changed += int(torch.count_nonzero(final != tensor))
    # SGD moves every kept weight that gets a gradient (ReLU units dead on the batch get none).
    assert changed > 0.5 * KeptSpace(start.model, start.mask).dim
    # FedAvg uploads the kept weights (float32) and counts forward + backward FLOPs.
    up = results["rounds"][1]["uplink_bytes"]["per_client"]["0"]
    assert (
        4 * results["setup"]["kept_coordinates"]
        < up
        < 4 * results["setup"]["kept_coordinates"] + 2048
    )
    flops = results["rounds"][1]["forward_flops"]["per_client"]["0"]
    assert flops == 4 * 32 * results["setup"]["backprop_flops_per_example"]
    dense = runs["fedavg-dense"][0]
    assert dense["setup"]["density"] == 1.0
    assert dense["rounds"][1]["forward_flops"]["per_client"]["0"] > 2 * flops


def test_zo_dense_has_density_one(runs):
    results, checkpoint, config = runs["zo-dense"]
    assert config["density"] == pytest.approx(0.1)  # the key is set, zo-dense ignores it
    assert results["setup"]["density"] == 1.0
    assert results["setup"]["kept_weights"] == results["setup"]["prunable_weights"]
    assert all(r["density"] == 1.0 for r in results["rounds"] if r["round"])
    assert all(bool(m.all()) for m in checkpoint["mask"].values())


def test_switching_method_changes_nothing_else(runs):
    dumps = {}
    for name, (results, _, config) in runs.items():
        validated = RunConfig.from_run_config(config).to_run_config()
        assert results["config"] == validated
        dumps[name] = {k: v for k, v in validated.items() if k not in {"run-name"}}
    # Same config but method: identical validated configs, key by key.
    pairs = [("zo-ntk", "fedavg-ntk"), ("zo-ntk", "zo-dense")]
    for a, b in pairs:
        diff = {k for k in dumps[a] if dumps[a][k] != dumps[b][k]}
        assert diff == {"method"}, (a, b, diff)
    # Same θ0 and mask, so the same model before round 1; same nodes and partitions.
    acc0 = {name: runs[name][0]["rounds"][0]["accuracy"] for name in runs}
    assert acc0["zo-ntk"] == acc0["fedavg-ntk"]
    assert acc0["zo-dense"] == acc0["fedavg-dense"]
    for name in runs:
        assert sorted(runs[name][0]["rounds"][1]["uplink_bytes"]["per_client"]) == ["0", "1", "2"]


def test_ntk_local_phase_over_flower_equals_the_in_process_phase(runs, data_dir):
    results, checkpoint, config = runs["zo-ntk-local"]
    cfg = RunConfig.from_run_config(config)
    model = build_global_model(cfg)
    batches, weights = [], []
    for pid in range(NODES):
        x, y = load_client_data(cfg, pid, NODES)
        batches.append([cp.prune_batch(cfg, x, y, pid)[0]])
        weights.append(len(y))
    expected = local_ntk_mask(
        model, cfg.model, cfg.density, batches, weights, cp.ntk_config(cfg), cp.prune_seed(cfg)
    )
    assert all(torch.equal(checkpoint["mask"][n], expected[n]) for n in expected)
    phase = results["setup"]["pruning_phase"]
    n_w = results["setup"]["prunable_weights"]
    assert phase["iterations"] == 2 and phase["nodes"] == NODES and phase["failures"] == []
    assert phase["uplink_bytes"] > 2 * NODES * 4 * n_w  # float32 signed gradients
    assert phase["downlink_bytes"] > 0


def test_snip_phase_bytes_and_client_gradients_match_snip(runs, data_dir):
    results, _, config = runs["zo-snip"]
    phase = results["setup"]["pruning_phase"]
    n_w = results["setup"]["prunable_weights"]
    assert phase["iterations"] == 1
    assert NODES * 4 * n_w < phase["uplink_bytes"] < NODES * (4 * n_w + 2048)
    assert phase["downlink_bytes"] > NODES * 4 * n_w  # θ0 goes down for SNIP
    # One client's federated SNIP score ranks like SNIP on the same examples.
    cfg = RunConfig.from_run_config(config)
    model = build_global_model(cfg)
    x, y = load_client_data(cfg, 0, NODES)
    dense = dense_mask(model)
    grads = cp.client_prune_gradients(cfg, model, dense, x, y, 0, 0)
    mine = one_shot_prune(model, cfg.density, cp.aggregate_scores([grads], [len(y)], dense))
    reference = snip_mask(model, cfg.density, [cp.prune_batch(cfg, x, y, 0)])
    assert all(torch.equal(mine[n], reference[n]) for n in mine)


def test_gradient_payload_round_trip_and_validation():
    model = build_global_model(RunConfig())
    mask = prune("random", model, "lenet5", 0.5, seed=1)
    grads = {n: torch.randn(m.shape) for n, m in mask.items()}
    data = cp.encode_gradients(grads, mask)
    assert len(data) == 4 * sum(m.numel() for m in mask.values())
    back = cp.decode_gradients(data, mask)
    assert all(torch.equal(back[n], grads[n]) for n in mask)
    with pytest.raises(ReplyRejected, match="bad gradients"):
        cp.decode_gradients(data[:-4], mask)
    with pytest.raises(ReplyRejected, match="must be bytes"):
        cp.decode_gradients([1.0, 2.0], mask)
    nan = cp.encode_gradients({n: torch.full(m.shape, float("nan")) for n, m in mask.items()}, mask)
    with pytest.raises(ReplyRejected, match="NaN"):
        cp.decode_gradients(nan, mask)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_backprop_round_keeps_pruned_weights_exactly_zero(data_dir, optimizer):
    cfg = RunConfig(
        data_dir=str(data_dir),
        method="fedavg",
        client_optimizer=optimizer,
        local_batches=3,
        weight_decay=1e-3,
        local_lr=0.05,
    )
    model = build_global_model(cfg)
    mask = prune("random", model, cfg.model, 0.2, seed=0)
    apply_mask_(model, mask)
    space = KeptSpace(model, mask)
    before = space.gather(model)
    x, y = load_client_data(cfg, 0, 10)
    result = train_round_backprop(cfg, model, space, x, y, 123, 0)
    assert result.steps == 3 and result.train_examples == 96 and result.num_examples == len(y)
    assert not torch.equal(result.weights, before)
    for name, param in model.named_parameters():
        if name in mask:
            assert torch.count_nonzero(param.detach()[~mask[name]]) == 0


def test_local_batches_cover_epochs_or_a_fixed_count():
    epochs = local_batch_indices(RunConfig(batch_size=32, local_epochs=2), 100, seed=1)
    assert len(epochs) == 8 and sum(len(b) for b in epochs) == 200
    assert sorted(np.concatenate(epochs[:4]).tolist()) == list(range(100))
    fixed = local_batch_indices(RunConfig(batch_size=32, local_batches=5), 100, seed=1)
    assert [len(b) for b in fixed] == [32] * 5


def test_fedavg_cannot_resume(tmp_path, data_dir):
    config = base_config(
        tmp_path, data_dir, **{"method": "fedavg", "resume-from": str(tmp_path / "x.pt")}
    )
    with pytest.raises(RunSetupError, match="resume-from"):
        server_app(InProcessGrid(client_app, 1, config), server_context(config))


def test_memory_breakdown_peaks_not_sums():
    from fedzo_flwr.measure.memory_model import activation_bytes, backprop_breakdown, zo_breakdown

    model = build_global_model(RunConfig())
    x = torch.zeros(8, 3, 32, 32)
    saved, peak = activation_bytes(model, x)
    assert saved > peak > 0
    sgd = backprop_breakdown(model, None, x, "sgd")
    adam = backprop_breakdown(model, None, x, "adam")
    params = sum(p.numel() for p in model.parameters())
    assert sgd.gradients == 4 * params and adam.optimizer_state == 8 * params
    assert adam.step_bytes == adam.gradients + max(saved, adam.optimizer_state)
    mask = prune("random", model, "lenet5", 0.1, seed=0)
    dense, pruned = zo_breakdown(model, None, x), zo_breakdown(model, mask, x)
    assert dense.gradients == dense.optimizer_state == 0
    assert dense.step_bytes == 4 * params + max(4 * params, peak)
    assert pruned.perturbation < dense.perturbation and pruned.weights == dense.weights


def test_comparison_matrix_varies_only_the_method_keys(tmp_path, data_dir):
    import argparse
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_comparison as pc

    runs = pc.matrix(quick=False)
    assert {r["alpha"] for r in runs} == {"0.1", "0.5", "iid"}
    methods = {(r["method"], r.get("prune-method", "ntk")) for r in runs}
    for pruner in ("ntk", "ntk-local", "snip", "synflow", "magnitude", "random"):
        assert ("zo-pruned", pruner) in methods
    assert ("zo-dense", "ntk") in methods and ("fedavg", "ntk") in methods
    args = argparse.Namespace(
        data_dir=data_dir,
        out_dir=tmp_path,
        rounds=5,
        eval_every=5,
        k=10,
        local_batches=5,
        fedavg_lr=0.05,
        prune_iterations=2,
        prune_repeats=1,
    )
    configs = [RunConfig.from_run_config(pc.run_config(r, args)).to_run_config() for r in runs]
    allowed = {"method", "prune-method", "density", "partitioner", "alpha", "run-name"}
    for config in configs[1:]:
        assert {k for k in config if config[k] != configs[0][k]} <= allowed
