"""The README's default run, measured end to end and recorded: ``bash scripts/run.sh``, timed.

Runs the main job exactly as a user does (``scripts/run.sh``: set-up check, ``flwr run .`` with
10 simulated clients, the defaults of ``pyproject.toml``), then reads the run's ``results.json``
and writes the figures the README quotes to ``docs/results/default_run.json``: wall time, load
before and after, machine record, the accuracy curve, pruning, bytes per client-round and client
FLOPs; the run's ``results.png`` becomes ``docs/default-run.png``. Every number of the README's
"Measured: the default run" table comes from that file.

Usage::

    FEDZO_DATA_DIR=../shared/data python benchmarks/default_run.py [--json PATH] [overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine import load_average, machine_info

ROOT = Path(__file__).resolve().parents[1]


def per_client_mean(rounds: list[dict[str, Any]], key: str, start: int) -> float:
    """Mean over rounds ``start..`` of the per-client mean of ``key`` (e.g. ``uplink_bytes``)."""
    values = [r[key]["mean"] for r in rounds if key in r and r["round"] >= start]
    return statistics.fmean(values) if values else float("nan")


def summarize(results: dict[str, Any], wall: float) -> dict[str, Any]:
    """The README's figures from one run's ``results.json`` and its end-to-end wall time."""
    rounds = [r for r in results["rounds"] if "uplink_bytes" in r]
    first = min(r["round"] for r in rounds)
    seconds = [r["round_seconds"] for r in rounds if "round_seconds" in r]
    return {
        "wall_seconds": wall,
        "strategy_seconds": results["final"]["seconds"],
        "median_round_seconds": statistics.median(seconds) if seconds else None,
        "client_seconds_mean": per_client_mean(rounds, "client_seconds", first),
        "final": {k: results["final"][k] for k in ("accuracy", "loss", "rounds")},
        "curve": [[r["round"], r["accuracy"]] for r in results["rounds"] if "accuracy" in r],
        "setup": {k: v for k, v in results["setup"].items() if not isinstance(v, dict)},
        "layer_densities": results["setup"].get("layer_densities"),
        "uplink_first_round": rounds[0]["uplink_bytes"]["mean"],
        "uplink_per_client_round": per_client_mean(rounds, "uplink_bytes", first + 1),
        "downlink_first_round": rounds[0]["downlink_bytes"]["mean"],
        "downlink_per_client_round": per_client_mean(rounds, "downlink_bytes", first + 1),
        "uplink_total_bytes": sum(r["uplink_bytes"]["total"] for r in rounds),
        "downlink_total_bytes": sum(r["downlink_bytes"]["total"] for r in rounds),
        "client_forward_flops_per_round": results["setup"]["client_round_forward_flops"],
        "client_peak_mem_bytes_max": max(r["client_peak_mem_bytes"]["max"] for r in rounds),
        "environment": results.get("environment"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "docs/results/default_run.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs/default-run.png")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "outputs" / "default_run",
        help="the run's outputs (emptied first; kept for recipe_sweep.py --e2e-from)",
    )
    parser.add_argument("overrides", nargs="*", help="run-config overrides for scripts/run.sh")
    args = parser.parse_args()
    machine = machine_info(None)
    out = args.out_dir.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "FEDZO_OUTPUT_DIR": str(out)}
    started = time.perf_counter()
    subprocess.run(["bash", "scripts/run.sh", *args.overrides], cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - started
    found = sorted(out.glob("**/results.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        print(f"no results.json under {out}", file=sys.stderr)
        return 1
    results = json.loads(found[-1].read_text())
    figure = found[-1].with_name("results.png")
    if figure.is_file():
        shutil.copyfile(figure, args.figure)
    machine["load_after"] = load_average()
    record = {
        "machine": machine,
        "command": " ".join(["bash scripts/run.sh", *args.overrides]),
        "results_json": os.path.relpath(found[-1], ROOT),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **summarize(results, wall),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    acc = record["final"]["accuracy"]
    print(f"# default run: {wall:.0f} s end to end, {acc:.2%} at round {record['final']['rounds']}")
    print(f"# wrote {os.path.relpath(args.json, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
