"""The frontier section says what its data says (benchmarks/frontier_report.py, frontier.py).

Two synthetic frontiers with opposite outcomes must give opposite sentences; without the JSON the
section says the frontier was not run; a run's row is computed from its results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from frontier import METHODS, eligible_count, full_config, method_keys, summarize  # noqa: E402
from frontier_report import pareto, render_frontier  # noqa: E402

MIB = 2**20


def _row(key: str, accuracy: float, eligible: int, memory_mib: float, kind: str = "measured"):
    method = {"fedavg-all": "fedavg", "fedavg-fit": "fedavg"}.get(key, key)
    zo = method.startswith("zo-")
    return {
        "name": f"profl-uniform-{key}",
        "key": key,
        "profile": "profl-uniform",
        "method": method,
        "density": 0.1 if key == "zo-pruned" else 1.0,
        "nodes": 20,
        "curve": [[0, 0.1], [50, accuracy / 2], [100, accuracy]],
        "final_accuracy": accuracy,
        "eligible": eligible,
        "eligible_fraction": eligible / 20,
        "took_part": eligible,
        "took_part_fraction": eligible / 20,
        "rounds_trained": 100 if eligible else 0,
        "peak_memory": {"bytes": int(memory_mib * MIB), "kind": kind, "source": "synthetic"},
        "uplink_per_client_round": 800.0 if zo else 250_000.0,
        "downlink_per_client_round": 900.0 if zo else 250_000.0,
        "flops_per_client_round": 4e9 if zo else 1e9,
        "client_seconds_per_client_round": 2.0 if zo else 0.2,
        "wall_seconds": 600.0,
    }


def _admission(fractions: dict[str, float]) -> dict[str, Any]:
    return {
        "batch": 32,
        "methods": {
            k: {"analytic": f, "measured": f, "needs": {"analytic": [MIB], "measured": [MIB]}}
            for k, f in fractions.items()
        },
    }


def _data(rows: list[dict[str, Any]], separates: bool, seeds: list[int]) -> dict[str, Any]:
    lenet = _admission({"fedavg-fit": 1.0, "zo-pruned": 1.0 if not separates else 0.5})
    return {
        "settings": {
            "clients": 20,
            "model": "lenet5",
            "dataset": "cifar10",
            "partitioner": "dirichlet",
            "alpha": 0.5,
            "profiles": ["profl-uniform"],
            "memory-seed": 0,
            "rounds": 100,
            "k": 200,
            "engine": "stream",
            "micro-batch": 4,
            "downlink": "replay",
            "local-batches": 10,
            "batch-size": 32,
            "local-lr": 0.01,
            "seeds": seeds,
            "torch_threads": 1,
            "workers": 2,
        },
        "machine": {"cpu": "Test CPU", "cores": 2, "load_before": [1.0], "load_after": [2.0]},
        "versions": {"torch": "2.x", "flwr": "1.41.0"},
        "commands": ["python benchmarks/frontier.py --rounds 100"],
        "seconds": 3600.0,
        "runs": rows,
        "admission": {
            "device-tier/lenet5": lenet,
            "device-tier/resnet18": _admission({"fedavg-fit": 0.75, "zo-pruned": 1.0}),
        },
        "device_tier_separates_lenet5": separates,
        "failures": [],
    }


def test_opposite_frontiers_give_opposite_sentences():
    zo_wins = _data(
        [
            _row("fedavg-all", 0.50, 20, 5.6),
            _row("fedavg-fit", 0.20, 2, 5.6),
            _row("zo-pruned", 0.35, 18, 1.1),
            _row("smartfreeze", 0.30, 11, 4.8),
        ],
        separates=False,
        seeds=[3407],
    )
    fedavg_wins = _data(
        [
            _row("fedavg-all", 0.50, 20, 5.6),
            _row("fedavg-fit", 0.45, 10, 5.6),
            _row("zo-pruned", 0.25, 5, 1.1, kind="analytic"),
            _row("smartfreeze", 0.0, 0, 4.8),
        ],
        separates=True,
        seeds=[1, 2, 3],
    )
    a, b = render_frontier(zo_wins), render_frontier(fedavg_wins)
    assert (
        "FedAvg on the devices that fit admits 2/20 (10 %) of the devices and ends 30.00 points "
        "below FedAvg on every device" in a
    )
    assert "admits 10/20 (50 %) of the devices and ends 5.00 points below" in b
    assert (
        "ZO pruned (d = 0.1) admits 9.0x as many devices as FedAvg on the devices that fit "
        "and ends 15.00 points above it." in a
    )
    assert (
        "ZO pruned (d = 0.1) admits 0.5x as many devices as FedAvg on the devices that fit "
        "and ends 20.00 points below it." in b
    )
    assert (
        "The most accurate method that respects the budgets is ZO pruned (d = 0.1) (35.00 %)" in a
    )
    assert "is FedAvg, devices that fit (45.00 %), 5.00 points below the upper bound" in b
    assert "Most devices are eligible with ZO pruned (d = 0.1) (18/20), fewest with FedAvg" in a
    assert (
        "Most devices are eligible with FedAvg, devices that fit (10/20), fewest with "
        "SmartFreeze (0/20)" in b
    )
    assert "SmartFreeze admits no device, so it never trains" in b
    assert "never trains" not in a
    # The frontier: ZO pruned dominates SmartFreeze in (a); in (b) both trained rows are on it.
    assert (
        "from the lightest: ZO pruned (d = 0.1) (1.10 MiB, 35.00 %). Behind it: "
        "FedAvg, devices that fit, SmartFreeze." in a
    )
    assert (
        "ZO pruned (d = 0.1) (1.10 MiB, 25.00 %), FedAvg, devices that fit (5.60 MiB, "
        "45.00 %)." in b
    )
    assert "Peak client memory is measured for every method." in a
    assert "analytic for ZO pruned (d = 0.1)" in b
    assert "One seed (3407)" in a and "One seed" not in b
    assert "(312x as much)" in a  # 250 kB against 800 B uplink
    assert "`device-tier` does not separate the methods on LeNet-5: every method admits 100 %" in a
    assert "Fewest with FedAvg, devices that fit (75 %), most with ZO pruned (100 %)" in a
    assert "so its population ran too" in b and "does not separate" not in b
    assert "![accuracy against peak client memory](figures/frontier.png)" in a


def test_without_the_json_the_section_says_it_was_not_run():
    text = render_frontier(None)
    assert text.startswith("## The memory/accuracy frontier\n")
    assert "Not run: `docs/results/frontier.json` is absent." in text
    assert "python benchmarks/frontier.py --rounds 200 --k 200" in text
    results_md = (ROOT / "docs/results.md").read_text()
    if not (ROOT / "docs/results/frontier.json").is_file():
        assert results_md.endswith(text)


def test_pareto_keeps_only_undominated_points():
    light = _row("zo-pruned", 0.30, 18, 1.0)
    heavy_better = _row("fedavg-fit", 0.40, 2, 5.0)
    heavy_worse = _row("smartfreeze", 0.25, 10, 4.0)
    assert pareto([heavy_worse, heavy_better, light]) == [light, heavy_better]


def _results(memory_profile: str) -> dict[str, Any]:
    """A results.json of 3 rounds: round 2 skipped, node 1090 (never replied) keyed -1090."""
    per = {"0": 100, "3": 120}
    return {
        "config": {
            "method": "zo-pruned",
            "memory-profile": memory_profile,
            "model": "lenet5",
            "dataset": "cifar10",
            "batch-size": 32,
            "engine": "stream",
            "micro-batch": 4,
            "downlink": "replay",
            "density": 0.1,
            "k": 200,
            "stage-split": "stage",
        },
        "setup": {"density": 0.1},
        "rounds": [
            {"round": 0, "accuracy": 0.1},
            {
                "round": 1,
                "clients": 2,
                "zo_need_bytes": 1234,
                "ineligible": [1017, 1034],
                "probe": {"nodes": 5, "downlink_bytes": 50, "uplink_bytes": 500},
                "uplink_bytes": {"per_client": per, "total": 220},
                "downlink_bytes": {
                    "per_client": {"0": 9000, "3": 9000, "-1090": 9000},
                    "total": 27000,
                },
                "forward_flops": {"per_client": {"0": 10, "3": 10}, "total": 20},
                "client_seconds": {"per_client": {"0": 1.0, "3": 3.0}, "total": 4.0},
                "round_seconds": 5.0,
            },
            {"round": 2, "skipped": True, "ineligible": [1017, 1034], "clients": 0},
            {
                "round": 3,
                "clients": 1,
                "ineligible": [1017, 1034],
                "probe": {"nodes": 0, "downlink_bytes": 0, "uplink_bytes": 0},
                "uplink_bytes": {"per_client": {"0": 100}, "total": 100},
                "downlink_bytes": {"per_client": {"0": 600}, "total": 600},
                "forward_flops": {"per_client": {"0": 10}, "total": 10},
                "client_seconds": {"per_client": {"0": 2.0}, "total": 2.0},
                "round_seconds": 3.0,
                "accuracy": 0.2,
            },
        ],
        "final": {"accuracy": 0.2},
    }


def test_a_runs_row_is_computed_from_its_results():
    run = {"name": "x", "key": "zo-pruned", "profile": "profl-uniform", "clients": 5}
    row = summarize(run, _results("profl-uniform"), 42.0, None, None)
    assert row["eligible"] == 3 and row["eligible_fraction"] == 0.6
    assert row["took_part"] == 2  # partitions 0 and 3 uploaded (node 1090 never replied)
    assert row["uplink_per_client_round"] == 320 / 3
    assert row["downlink_per_client_round"] == 27600 / 4
    assert row["flops_per_client_round"] == 10
    assert row["client_seconds_per_client_round"] == 2.0
    assert row["rounds_trained"] == 2 and row["rounds_skipped"] == 1
    assert row["clients_per_round"] == 1.5 and row["round_seconds_mean"] == 4.0
    assert row["probe_bytes"] == {"downlink": 50, "uplink": 500}
    assert row["downlink"] == "replay"  # the run's own downlink, not the benchmark's default
    assert row["curve"] == [[0, 0.1], [3, 0.2]]
    # No measured row given: the analytic need the run's gate recorded, labelled as such.
    assert row["peak_memory"] == {
        "bytes": 1234,
        "kind": "analytic",
        "source": "zo_client_need (stream), the run's gate",
    }
    assert eligible_count({**_results("none"), "rounds": [], "final": {}}, 5) == 5
    assert eligible_count({**_results("device-tier"), "rounds": [], "final": {}}, 5) is None
    assert eligible_count({**_results("none"), "final": {"never_eligible": [7]}}, 5) == 4


@pytest.mark.slow
def test_frontier_quick_admits_exactly_the_devices_that_fit(tmp_path, data_dir):
    import torch

    from fedzo_flwr.measure.memory_model import stream_breakdown
    from fedzo_flwr.models import build_model
    from fedzo_flwr.progressive import device_budget
    from fedzo_flwr.progressive.memory import full_backprop_memory

    out = tmp_path / "frontier.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "frontier.py"),
        "--quick",
        "--only",
        "fedavg-all",
        "fedavg-fit",
        "zo-dense",
        "--json",
        str(out),
        "--figure",
        str(tmp_path / "frontier.png"),
        "--out-dir",
        str(tmp_path / "runs"),
        "--data-dir",
        str(data_dir),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["key"]: r for r in data["runs"]}
    assert set(rows) == {"fedavg-all", "fedavg-fit", "zo-dense"}
    model = build_model("lenet5")
    full = full_backprop_memory(model, 32).total_bytes
    zo = stream_breakdown(model, None, torch.zeros(32, 3, 32, 32), 4).total_bytes
    budget = [device_budget("profl-uniform", pid, full).budget_bytes for pid in range(20)]
    assert rows["fedavg-all"]["eligible"] == rows["fedavg-all"]["took_part"] == 20
    assert rows["fedavg-fit"]["eligible"] == sum(b >= full for b in budget)
    assert rows["zo-dense"]["eligible"] == sum(b >= zo for b in budget)
    assert rows["zo-dense"]["took_part"] == rows["zo-dense"]["eligible"]
    assert rows["zo-dense"]["gate_need_bytes"] == zo
    assert [p[0] for p in rows["zo-dense"]["curve"]] == [0, 1, 2]
    assert (
        rows["zo-dense"]["uplink_per_client_round"] < rows["fedavg-fit"]["uplink_per_client_round"]
    )
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert not data["settings"]["data_dir"].startswith("/")


def test_every_method_of_the_matrix_validates_with_its_own_downlink(tmp_path):
    """No silent fallback: each method's keys pass RunConfig as written (replay where it can)."""
    import argparse

    args = argparse.Namespace(
        rounds=20, k=4, eval_every=1, local_batches=2, engine="stream", micro_batch=4,
        data_dir=tmp_path, out_dir=tmp_path / "runs",
    )  # fmt: skip
    downlinks = {}
    for key in METHODS:
        keys = method_keys(key, "profl-uniform", args)
        assert keys is not None, key
        downlinks[key] = full_config(keys, args, key)["downlink"]  # raises on a refused config
    assert downlinks == {
        "fedavg-all": "weights",
        "fedavg-fit": "weights",
        "smartfreeze": "weights",
        "profl": "weights",
        "zo-dense": "replay",
        "zo-pruned": "replay",
        "zo-progressive": "weights",
    }
