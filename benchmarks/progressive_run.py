"""SmartFreeze vs FedAvg-on-the-devices-that-fit, on one memory-heterogeneous population.

Both methods run through the real ServerApp and ClientApps in one process
(``tests/inprocess_grid.py``), with the same data, partitions, seeds and ``profl-uniform``
budgets (U[0.12, 1.07] x the full model's analytic training need, seeded by partition id).
FedAvg trains only the nodes whose budget fits full-model backprop; SmartFreeze trains, per
stage, the nodes that fit that stage. Writes the accuracy over rounds, the fraction of the
population that took part, and the stage changes as JSON.

    python benchmarks/progressive_run.py --json docs/results/progressive_run.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from inprocess_grid import InProcessGrid, app_config, server_context
from machine import load_average, machine_info

from client_app.client_app import app as client_app
from server_app.server_app import app as server_app

COMMON = {
    "model": "lenet5",
    "partitioner": "dirichlet",
    "alpha": 0.5,
    "batch-size": 32,
    "local-batches": 10,
    "local-lr": 0.01,
    "momentum": 0.9,
    "memory-profile": "profl-uniform",
    "memory-seed": 0,
    "eval-every": 5,
    "checkpoint-every": 0,
    "seed": 3407,
}
METHODS: dict[str, dict[str, object]] = {
    "smartfreeze": {
        "method": "smartfreeze",
        "pace": "effective-movement",
        "stage-min-rounds": 8,
        "stage-max-rounds": 15,
    },
    # FedAvg with the same client optimizer as the progressive client (SGD, momentum 0.9).
    "fedavg": {"method": "fedavg", "density": 1.0, "client-optimizer": "momentum"},
}


def run_method(name: str, rounds: int, nodes: int, data_dir: str, out: Path) -> dict[str, Any]:
    """One method's run; its per-round record reduced to what the comparison needs."""
    config = app_config(
        **{
            **COMMON,
            **METHODS[name],
            "num-server-rounds": rounds,
            "data-dir": data_dir,
            "output-dir": str(out),
            "run-name": name,
        }
    )
    started = time.perf_counter()
    server_app(InProcessGrid(client_app, nodes, config), server_context(config))
    results = json.loads((out / name / "results.json").read_text())
    trained = [r for r in results["rounds"] if r["round"]]
    took_part = {p for r in trained for p in r.get("uplink_bytes", {}).get("per_client", {})}
    return {
        "seconds": time.perf_counter() - started,
        "accuracy": {r["round"]: r["accuracy"] for r in results["rounds"] if "accuracy" in r},
        "clients_per_round": [r.get("clients", 0) for r in trained],
        "fraction_took_part": len(took_part) / nodes,
        "stage_changes": results["final"].get("stage_changes", []),
        "stage_of_round": [r.get("stage") for r in trained] if name != "fedavg" else [],
        "pace_metric": [r.get("pace_metric") for r in trained] if name != "fedavg" else [],
        "eligibility": results["setup"].get("eligibility"),
        "final_accuracy": results["final"]["accuracy"],
    }


def main() -> None:
    """Run both methods and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    report: dict[str, Any] = {
        "settings": {**COMMON, "rounds": args.rounds, "nodes": args.nodes, "methods": METHODS},
        "machine": machine_info(1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in METHODS:
            report[name] = run_method(name, args.rounds, args.nodes, args.data_dir, Path(tmp))
            print(name, json.dumps({k: report[name][k] for k in ("final_accuracy", "seconds")}))
    report["machine"]["load_after"] = load_average()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
