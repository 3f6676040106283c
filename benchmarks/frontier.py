"""The memory/accuracy frontier: which method lets which devices train, at what accuracy.

One memory-heterogeneous population (``--clients`` nodes, LeNet-5 on CIFAR-10, Dirichlet
α = 0.5, budgets from ``memory-profile = "profl-uniform"``) and every method on it, with the
same data, partitions, seeds and number of rounds (``--rounds``):

* ``fedavg-all``: FedAvg with ``memory-profile = "none"``: every device trains, whatever its
  budget (the unreachable upper bound);
* ``fedavg-fit``: FedAvg on the devices that fit full-model backprop;
* ``smartfreeze``, ``profl``: progressive block training, each stage on the devices that fit it;
* ``zo-dense``, ``zo-pruned`` (NTK, the config's density): zeroth-order clients on the devices
  that fit a client step of ``--engine`` (``--micro-batch``), ``downlink = "replay"``;
* ``zo-progressive``: zeroth-order block training (docs/progressive.md), ``downlink = "weights"``.

FedAvg and the progressive clients take ``--local-batches`` SGD-momentum batches per round
(the progressive client's optimizer); every eligible node trains every round
(``clients-per-round = 0``). The progressive stage bounds follow from ``--rounds`` so that the
last stage is reached: at most ``rounds // stages`` rounds per stage (after ProFL's shrink
steps of ``max(1, min(5, rounds // 20))`` rounds each).

The ``device-tier`` profile runs too if it separates the methods on LeNet-5 (analytic
admission); it does not when every tier fits LeNet-5 backprop, and then the JSON holds, for
``device-tier``, the fraction of the same number of devices each method admits on ResNet-18
(analytic and measured needs, ``benchmarks/frontier_memory.py``), without accuracy.

Every run is the real ServerApp and ClientApps in process (``tests/inprocess_grid.py``), each
in its own subprocess with one torch thread, ``--workers`` at a time. Per method the JSON holds
the accuracy over rounds, the devices eligible and those that took part, the peak client memory
(measured where ``docs/results/client_memory.json`` / ``progressive_memory.json`` have the row,
else analytic, labelled), bytes up and down per client-round, client FLOPs and seconds per
client-round, and wall times. Outputs: ``--json`` (default ``docs/results/frontier.json``), the
plot ``--figure`` (``docs/figures/frontier.png``: final accuracy against peak client memory), a
table on stdout, and (when writing the docs JSON) the frontier section of ``docs/results.md``.

Usage::

    FEDZO_DATA_DIR=../shared/data PYTHONPATH=.:tests nice -n 10 python benchmarks/frontier.py \
        [--rounds 200] [--clients 20] [--k 200] [--eval-every 10] [--engine stream]
        [--micro-batch 4] [--local-batches 10] [--workers 2] [--only KEY ...]
        [--json PATH] [--figure PATH] [--out-dir DIR] [--data-dir DIR] [--quick]

``--quick`` (CI): 2 rounds, K = 4, 2 local batches, evaluation every round; JSON and plot under
``outputs/frontier_quick/`` instead of ``docs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from frontier_memory import (
    CLIENT_MEMORY,
    PROGRESSIVE_MEMORY,
    admission,
    load_json,
    peak_memory,
    separates,
)
from frontier_report import (
    FIGURE_REL,
    JSON_REL,
    LABELS,
    label,
    print_table,
    refresh_results_md,
)
from machine import data_dir, load_average, machine_info

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

RUN_THREADS = 1
"""torch threads of every run process."""

METHODS = tuple(LABELS)
"""The method keys, in the table's order."""

PROFILES = ("profl-uniform", "device-tier")


# --------------------------------------------------------------------------------- matrix


def common(args: argparse.Namespace) -> dict[str, Any]:
    """What every run shares (kebab-case run-config keys)."""
    return {
        "model": "lenet5",
        "dataset": "cifar10",
        "partitioner": "dirichlet",
        "alpha": 0.5,
        "batch-size": 32,
        "seed": 3407,
        "memory-seed": 0,
        "memory-margin": 0.0,
        "num-server-rounds": args.rounds,
        "eval-every": args.eval_every,
        "checkpoint-every": 0,
        "clients-per-round": 0,
        "k": args.k,
        "local-batches": args.local_batches,
        "local-lr": 0.01,
        "client-optimizer": "momentum",
    }


def stage_bounds(method: str, rounds: int, stages: int) -> dict[str, Any]:
    """Pace bounds that reach the last stage within ``rounds`` (module docstring)."""
    shrink = max(1, min(5, rounds // 20))
    grow = rounds - (stages - 1) * shrink if method == "profl" else rounds
    most = max(1, grow // stages)
    keys: dict[str, Any] = {"stage-max-rounds": most, "stage-min-rounds": min(10, most)}
    if method == "profl":
        keys["profl-shrink-rounds"] = shrink
    return keys


def method_keys(key: str, profile: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The run-config keys of method ``key`` on ``profile`` (``None``: not available here)."""
    zo = {"engine": args.engine, "micro-batch": args.micro_batch}
    if key == "fedavg-all":
        return {"method": "fedavg", "density": 1.0, "memory-profile": "none"}
    if key == "fedavg-fit":
        return {"method": "fedavg", "density": 1.0, "memory-profile": profile}
    if key in ("smartfreeze", "profl"):
        from fedzo_flwr.progressive import build_staged

        stages = build_staged("lenet5", 10).num_stages
        return {"method": key, "memory-profile": profile, **stage_bounds(key, args.rounds, stages)}
    if key in ("zo-dense", "zo-pruned"):
        return {"method": key, "memory-profile": profile, **zo, "downlink": "replay"}
    if key == "zo-progressive":
        # Replay would have to follow the stage's coordinate space: zo-progressive sends weights.
        return {"method": key, "memory-profile": profile, **zo, "downlink": "weights"}
    return None


def full_config(keys: dict[str, Any], args: argparse.Namespace, name: str) -> dict[str, Any]:
    """pyproject defaults + the shared keys + the method's, validated (a refusal is raised)."""
    from inprocess_grid import app_config

    from fedzo_flwr.config import RunConfig

    config: dict[str, Any] = app_config(
        **{
            **common(args),
            **keys,
            "data-dir": str(args.data_dir),
            "output-dir": str(args.out_dir),
            "run-name": name,
        }
    )
    RunConfig.from_run_config(config)  # ConfigError names the key: a matrix bug, not a retry
    return config


def matrix(args: argparse.Namespace, profiles: list[str]) -> list[dict[str, Any]]:
    """The runs: ``{"name", "key", "profile", "config"}`` (``fedavg-all`` once: no budgets)."""
    runs = []
    for profile in profiles:
        for key in METHODS:
            if key == "fedavg-all" and profile != profiles[0]:
                continue
            keys = method_keys(key, profile, args)
            if keys is None:
                continue
            name = f"{profile}-{key}"
            runs.append(
                {
                    "name": name,
                    "key": key,
                    "profile": profile,
                    "config": full_config(keys, args, name),
                }
            )
    return runs


# ---------------------------------------------------------------------------- one run


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration through the real Flower apps (in this process)."""
    import logging

    import torch

    torch.set_num_threads(RUN_THREADS)
    from inprocess_grid import InProcessGrid, server_context

    import client_app.client_app as client_module
    from server_app.server_app import app as server_app

    logging.getLogger("flwr").setLevel(logging.WARNING)
    config = job["config"]
    started = time.perf_counter()
    grid = InProcessGrid(client_module.app, job["clients"], config)
    server_app(grid, server_context(config))
    path = Path(config["output-dir"]) / config["run-name"] / "results.json"
    return {"results": str(path), "seconds": time.perf_counter() - started}


def launch(job: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`run_one` in a fresh interpreter (its own caches, memory and thread pool)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-4000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------------- summary


def _trained(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["rounds"] if r["round"] and not r.get("skipped")]


def eligible_count(results: dict[str, Any], nodes: int) -> int | None:
    """Devices that may train: not ``never_eligible`` / not ``ineligible`` (``None``: unknown)."""
    if "never_eligible" in results["final"]:
        return nodes - len(results["final"]["never_eligible"])
    recorded = [r for r in results["rounds"] if r["round"] and "ineligible" in r]
    if recorded:
        return nodes - len(recorded[-1]["ineligible"])
    if results["config"]["memory-profile"] == "none":
        return nodes
    return None


def _per_client_round(rounds: list[dict[str, Any]], key: str) -> float | None:
    """Σ of a per-client metric's totals over Σ of its client counts (``None``: not recorded)."""
    items = [r[key] for r in rounds if isinstance(r.get(key), dict)]
    count = sum(len(i["per_client"]) for i in items)
    return sum(i["total"] for i in items) / count if count else None


def summarize(
    run: dict[str, Any],
    results: dict[str, Any],
    seconds: float,
    client: dict[str, Any] | None,
    progressive: dict[str, Any] | None,
) -> dict[str, Any]:
    """One run's row of the frontier (everything the table, plot and report need)."""
    cfg, nodes = results["config"], run["clients"]
    trained = _trained(results)
    uploads = [r.get("uplink_bytes", {}).get("per_client", {}) for r in trained]
    took_part = {int(p) for per_client in uploads for p in per_client if int(p) >= 0}
    recorded = [r.get("zo_need_bytes") or r.get("full_need_bytes") for r in results["rounds"]]
    need = next((n for n in recorded if n), None)
    eligible = eligible_count(results, nodes)
    probes = [r["probe"] for r in results["rounds"] if isinstance(r.get("probe"), dict)]
    return {
        "name": run["name"],
        "key": run["key"],
        "label": LABELS[run["key"]],
        "profile": run["profile"],
        "method": cfg["method"],
        "density": results["setup"].get("density"),
        "engine": cfg["engine"] if cfg["method"].startswith("zo-") else None,
        "downlink": cfg["downlink"],
        "nodes": nodes,
        "curve": [[r["round"], r["accuracy"]] for r in results["rounds"] if "accuracy" in r],
        "final_accuracy": results["final"]["accuracy"],
        "eligible": eligible,
        "eligible_fraction": None if eligible is None else eligible / nodes,
        "took_part": len(took_part),
        "took_part_fraction": len(took_part) / nodes,
        "clients_per_round": (
            sum(r.get("clients", 0) for r in trained) / len(trained) if trained else 0.0
        ),
        "rounds_trained": len(trained),
        "rounds_skipped": sum(1 for r in results["rounds"] if r.get("skipped")),
        "stage_fractions": results["setup"].get("eligibility", {}).get("fractions"),
        "peak_memory": peak_memory(cfg, client, progressive, need).as_dict(),
        "gate_need_bytes": need,
        "uplink_per_client_round": _per_client_round(trained, "uplink_bytes"),
        "downlink_per_client_round": _per_client_round(trained, "downlink_bytes"),
        "probe_bytes": {
            "downlink": sum(p.get("downlink_bytes", 0) for p in probes),
            "uplink": sum(p.get("uplink_bytes", 0) for p in probes),
        },
        "flops_per_client_round": _per_client_round(trained, "forward_flops"),
        "client_seconds_per_client_round": _per_client_round(trained, "client_seconds"),
        "round_seconds_mean": (
            sum(r.get("round_seconds", 0.0) for r in trained) / len(trained) if trained else None
        ),
        "wall_seconds": seconds,
    }


# --------------------------------------------------------------------------------- plot


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """Final accuracy against peak client memory (log x), one labelled point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    colors = [plt.get_cmap("tab10")(i) for i in range(10)]
    profiles = list(dict.fromkeys(r["profile"] for r in runs))
    xs = [r["peak_memory"]["bytes"] / 2**20 for r in runs]
    for i, (r, x) in enumerate(zip(runs, xs, strict=True)):
        y = 100 * (r["final_accuracy"] or 0.0)
        measured = r["peak_memory"]["kind"] == "measured"
        color = colors[METHODS.index(r["key"]) % 10]
        ax.scatter(
            [x],
            [y],
            s=46,
            marker="o" if r["profile"] == profiles[0] else "s",
            facecolors=color if measured else "none",
            edgecolors=color,
            linewidths=1.4,
        )
        ax.annotate(
            label(r, len(profiles)),
            (x, y),
            xytext=(6, 4 - 10 * (i % 2)),
            textcoords="offset points",
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 1.5, max(xs) * 4)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel(
        "peak client memory, model's share (MiB, log; filled = measured, hollow = analytic)",
        fontsize=8,
    )
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Accuracy against client memory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    engines = ["stream", "lean", "fused", "batched"]
    parser.add_argument("--engine", default="stream", choices=engines)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--local-batches", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=None, help="method keys to run")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 200)
    args.k = args.k or (4 if quick else 200)
    args.eval_every = args.eval_every or (1 if quick else 10)
    args.local_batches = args.local_batches or (2 if quick else 10)
    base = ROOT / "outputs" / ("frontier_quick" if quick else "frontier")
    args.out_dir = args.out_dir or base
    args.json = args.json or (base / "frontier.json" if quick else ROOT / JSON_REL)
    args.figure = args.figure or (base / "frontier.png" if quick else ROOT / "docs" / FIGURE_REL)
    if args.micro_batch and args.engine != "stream":
        parser.error("--micro-batch applies to --engine stream only (set --micro-batch 0)")
    return args


def _relative(arg: str) -> str:
    """A command-line argument with an absolute path written relative to the checkout."""
    return os.path.relpath(arg, ROOT) if arg.startswith("/") else arg


def admissions(args: argparse.Namespace, client: Any, progressive: Any) -> dict[str, Any]:
    """Who each method admits: both profiles on LeNet-5, and device-tier on ResNet-18."""
    out: dict[str, Any] = {}
    for model in ("lenet5", "resnet18"):
        configs = {
            key: full_config(keys, args, key)
            for key in METHODS
            if key not in ("fedavg-all", "zo-progressive")
            and (keys := method_keys(key, "device-tier", args)) is not None
        }
        for cfg in configs.values():
            cfg["model"] = model
        profiles = PROFILES if model == "lenet5" else ("device-tier",)
        for profile in profiles:
            out[f"{profile}/{model}"] = admission(
                profile, args.clients, configs, client, progressive
            )
        if model == "lenet5" and separates(out["device-tier/lenet5"]):
            break  # device-tier runs: no ResNet-18 stand-in needed
    return out


def main() -> int:
    args = parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return 0
    import torch

    from fedzo_flwr.environment import library_versions

    torch.set_num_threads(RUN_THREADS)
    args.data_dir = data_dir(args.data_dir).resolve()
    args.out_dir = args.out_dir.resolve()
    client, progressive = load_json(CLIENT_MEMORY), load_json(PROGRESSIVE_MEMORY)
    machine = machine_info(RUN_THREADS)
    started = time.perf_counter()
    admitted = admissions(args, client, progressive)
    device_tier_runs = separates(admitted["device-tier/lenet5"])
    profiles = ["profl-uniform", *(["device-tier"] if device_tier_runs else [])]
    runs = matrix(args, profiles)
    if args.only:
        runs = [r for r in runs if r["key"] in args.only]
    print(f"# {len(runs)} runs, {args.workers} at a time, under {args.out_dir}", flush=True)

    def go(run: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        out = launch({"config": run["config"], "clients": args.clients})
        status = "FAILED" if "error" in out else f"{out['seconds']:.0f} s"
        print(f"# {run['name']}: {status}", flush=True)
        return run, out

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        done = list(pool.map(go, runs))
    rows, failures = [], []
    for run, out in done:
        if "error" in out:
            failures.append({"name": run["name"], "error": out["error"]})
            continue
        results = json.loads(Path(out["results"]).read_text())
        rows.append(
            summarize(
                {**run, "clients": args.clients}, results, out["seconds"], client, progressive
            )
        )
    machine["load_after"] = load_average()
    data: dict[str, Any] = {
        "benchmark": "frontier",
        "settings": {
            **{k: v for k, v in common(args).items()},
            "clients": args.clients,
            "rounds": args.rounds,
            "engine": args.engine,
            "micro-batch": args.micro_batch,
            "downlink": "replay for zo-dense and zo-pruned, weights for the others",
            "profiles": profiles,
            "seeds": [common(args)["seed"]],
            "workers": args.workers,
            "torch_threads": RUN_THREADS,
            "data_dir": os.path.relpath(args.data_dir, ROOT),
            "out_dir": os.path.relpath(args.out_dir, ROOT),
        },
        "machine": machine,
        "versions": {"python": machine["python"], **library_versions()},
        "commands": [
            "FEDZO_DATA_DIR=../shared/data PYTHONPATH=.:tests nice -n 10 python "
            "benchmarks/frontier.py " + " ".join(map(_relative, sys.argv[1:]))
        ],
        "seconds": time.perf_counter() - started,
        "runs": rows,
        "admission": admitted,
        "device_tier_separates_lenet5": device_tier_runs,
        "failures": failures,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    if rows:
        plot(rows, args.figure)
    print_table(data)
    if args.json.resolve() == (ROOT / JSON_REL).resolve():
        refresh_results_md(ROOT / "docs")
        print("# rewrote the frontier section of docs/results.md", flush=True)
    print(f"# wrote {args.json} and {args.figure}", flush=True)
    for failure in failures:
        print(f"# FAILED {failure['name']}:\n{failure['error']}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
