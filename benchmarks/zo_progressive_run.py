"""zo-progressive against zo-pruned at equal rounds on CIFAR-10 (SmartFreeze for reference).

Every method runs through the real ServerApp and ClientApps in one process
(``tests/inprocess_grid.py``) on the same federation: the same clients, Dirichlet partitions,
seed, batch size and rounds, every client every round (``memory-profile = none``). The two
zeroth-order methods share K, σ, forward differences, one local step per round and the server
optimizer (Adam, lr 0.01: the defaults), and the same data-free NTK-SAP mask of the model;
``zo-progressive`` trains the stages with ``pace = fixed``, ``rounds / 3`` rounds each (the last
stage to the end). SmartFreeze (backprop, one local mini-batch per round, the same stages)
shows what the same stages reach with gradients.

Recorded per method: test accuracy every ``--eval-every`` rounds, per round the clients'
seconds, sparse forward FLOPs, measured peak and extra memory (in-process RSS) and bytes, the
analytic memory need per stage, the wall time; and the machine and its load. Feeds the section
``docs/results.md`` draws from ``docs/results/zo_progressive_run.json``
(:mod:`zo_progressive_report`).

    nice -n 10 python benchmarks/zo_progressive_run.py --json docs/results/zo_progressive_run.json

``--quick`` (CI): 3 rounds, 3 nodes, K = 8, zo-progressive and zo-pruned only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import ROOT, data_dir, load_average, machine_info

sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's apps, whatever is installed
from inprocess_grid import InProcessGrid, app_config, server_context  # noqa: E402

from client_app.client_app import app as client_app  # noqa: E402
from fedzo_flwr.config import RunConfig  # noqa: E402
from fedzo_flwr.data import load_dataset  # noqa: E402
from fedzo_flwr.measure.memory_model import zo_breakdown  # noqa: E402
from fedzo_flwr.run.setup import initial_model  # noqa: E402
from server_app.server_app import app as server_app  # noqa: E402

COMMON: dict[str, object] = {
    "model": "lenet5",
    "partitioner": "dirichlet",
    "alpha": 0.5,
    "batch-size": 32,
    "seed": 3407,
    "checkpoint-every": 0,
    "client-threads": 1,
}
DEFAULT_K = 200
ZO: dict[str, object] = {"sigma": 1e-3, "fd": "forward", "local-steps": 1}
"""The zeroth-order keys both ZO rows share (``k`` comes from ``--k``)."""
METHOD_NAMES: tuple[str, ...] = ("zo-progressive", "zo-pruned", "smartfreeze")


def method_keys(name: str, k: int, stage_rounds: int) -> dict[str, object]:
    """The run-config keys that make method ``name``, with ``k`` directions per ZO step."""
    zo = {**ZO, "k": k}
    staged = {"pace": "fixed", "stage-rounds": str(stage_rounds)}
    return {
        "zo-progressive": {"method": "zo-progressive", **zo, **staged},
        "zo-pruned": {"method": "zo-pruned", **zo},
        "smartfreeze": {"method": "smartfreeze", **staged, "local-batches": 1},
    }[name]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def per_stage(trained: list[dict[str, Any]], key: str, stat: str = "mean") -> dict[str, float]:
    """Mean over the rounds of each stage of a per-round summary field (``key``/``stat``)."""
    out: dict[str, list[float]] = {}
    for r in trained:
        if key in r and r.get("stage") is not None:
            out.setdefault(str(r["stage"]), []).append(float(r[key][stat]))
    return {stage: statistics.fmean(v) for stage, v in sorted(out.items())}


def run_method(
    name: str, keys: dict[str, object], settings: dict[str, object], nodes: int, out: Path
) -> dict[str, Any]:
    """One method's run (``keys``: :func:`method_keys`), reduced to what the comparison needs."""
    config = app_config(**{**COMMON, **keys, **settings, "run-name": name})
    config["output-dir"] = str(out)
    started = time.perf_counter()
    server_app(InProcessGrid(client_app, nodes, config), server_context(config))
    seconds = time.perf_counter() - started
    results = json.loads((out / name / "results.json").read_text())
    trained = [r for r in results["rounds"] if r["round"] and not r.get("skipped")]
    setup = results["setup"]
    row: dict[str, Any] = {
        "config": {k: config[k] for k in sorted(config) if k not in ("data-dir", "output-dir")},
        "seconds": seconds,
        "accuracy": {str(r["round"]): r["accuracy"] for r in results["rounds"] if "accuracy" in r},
        "final_accuracy": results["final"]["accuracy"],
        "clients_per_round": _mean([r["clients"] for r in trained]),
        "rejected_replies": results["final"]["rejected_replies"],
        "client_seconds_per_round": _mean([r["client_seconds"]["mean"] for r in trained]),
        "round_seconds": _mean([r["round_seconds"] for r in trained]),
        "client_flops_per_round": _mean([r["forward_flops"]["mean"] for r in trained]),
        "uplink_bytes_per_client_round": _mean([r["uplink_bytes"]["mean"] for r in trained]),
        "downlink_bytes_per_client_round": _mean([r["downlink_bytes"]["mean"] for r in trained]),
        "client_peak_mem_bytes": _mean([r["client_peak_mem_bytes"]["max"] for r in trained]),
        "client_extra_mem_bytes": _mean([r["client_extra_mem_bytes"]["max"] for r in trained]),
        "stage_changes": results["final"].get("stage_changes", []),
        "kept_coordinates": setup.get("kept_coordinates"),
    }
    if name != "zo-pruned":  # staged: the same figures per stage
        row["per_stage"] = {
            "client_seconds": per_stage(trained, "client_seconds"),
            "client_flops": per_stage(trained, "forward_flops"),
            "client_extra_mem_bytes": per_stage(trained, "client_extra_mem_bytes", "max"),
            "client_peak_mem_bytes": per_stage(trained, "client_peak_mem_bytes", "max"),
            "rounds": {
                str(t): sum(1 for r in trained if r.get("stage") == t)
                for t in sorted({r["stage"] for r in trained})
            },
        }
    if name == "zo-progressive":
        zp = setup["zo_progressive"]
        row["stage_dims"] = zp["stage_dims"]
        row["stage_need_bytes"] = zp["stage_need_bytes"]
        row["stage_memory"] = zp["stage_memory"]
        row["full_backprop_need_bytes"] = zp["full_backprop_need_bytes"]
    if name == "smartfreeze":
        row["stage_need_bytes"] = setup["progressive"]["stage_need_bytes"]
    return row


def zo_pruned_memory() -> dict[str, int | str]:
    """Analytic memory of one zo-pruned client step (lean engine floor, as for the stages)."""
    keys = method_keys("zo-pruned", DEFAULT_K, 1)
    cfg = RunConfig.from_run_config({**COMMON, **keys, "data-dir": "unused"})
    init = initial_model(cfg)
    x = torch.zeros(cfg.batch_size, 3, 32, 32)
    return zo_breakdown(init.model, init.mask, x).as_dict()


def main(argv: list[str] | None = None) -> int:
    """Run the methods and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="CI: 3 rounds, 3 nodes, K = 8")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.nodes, args.k, args.eval_every = 3, 3, 8, 1
        args.methods = "zo-progressive,zo-pruned"
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    folder = data_dir(args.data_dir).resolve()
    stage_rounds = max(1, args.rounds // 3)
    unknown = sorted(set(args.methods.split(",")) - set(METHOD_NAMES))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHOD_NAMES)}")
    settings: dict[str, object] = {
        "num-server-rounds": args.rounds,
        "eval-every": args.eval_every,
        "data-dir": str(folder),
    }
    machine = machine_info(1)
    machine["nice"] = os.nice(0)
    report: dict[str, Any] = {
        "benchmark": "zo_progressive_run",
        "settings": {
            **COMMON,
            **ZO,
            "k": args.k,
            "rounds": args.rounds,
            "nodes": args.nodes,
            "eval-every": args.eval_every,
            "stage-rounds": str(stage_rounds),
            "data-dir": os.path.relpath(folder, ROOT),
            "test-examples": len(load_dataset("cifar10", folder).y_test),
        },
        "quick": args.quick,
        "command": (
            "nice -n 10 python benchmarks/zo_progressive_run.py "
            f"--rounds {args.rounds} --nodes {args.nodes} --k {args.k} "
            f"--eval-every {args.eval_every} --methods {args.methods} --json "
            f"{os.path.relpath(args.json.resolve(), ROOT)}"
        ),
        "machine": machine,
        "zo_pruned_memory": zo_pruned_memory(),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            keys = method_keys(name, args.k, stage_rounds)
            report["runs"][name] = run_method(name, keys, settings, args.nodes, Path(tmp))
            run = report["runs"][name]
            print(f"{name}: final accuracy {run['final_accuracy']:.4f}, {run['seconds']:.0f} s")
    machine["load_after"] = load_average()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
