"""The README's default run, measured end to end and recorded: ``bash scripts/run.sh``, timed.

Runs the main job exactly as a user does (``scripts/run.sh``: set-up check, ``flwr run .`` with
10 simulated clients, the defaults of ``pyproject.toml``), then reads the run's ``results.json``
and writes the figures the README quotes to ``docs/results/default_run.json``: wall time, load
before and after, machine record, the accuracy curve, pruning, bytes per client-round and client
FLOPs; the run's ``results.png`` becomes ``docs/default-run.png``. The README's "Measured: the
default run" block (between its ``default-run`` markers) is rewritten from that file.

Usage::

    FEDZO_DATA_DIR=../shared/data python benchmarks/default_run.py [--json PATH] [overrides]
    python benchmarks/default_run.py --from-record   # JSON and README again, from the run kept
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
        "clients": len(rounds[0]["uplink_bytes"]["per_client"]),
        "config": {k: results["config"][k] for k in README_CONFIG if k in results["config"]},
        "environment": results.get("environment"),
    }


README_CONFIG = ("method", "k", "num-server-rounds", "lr-schedule", "density", "prune-method")
"""The run-config keys the README's table names (kept in the record)."""
START, END = "<!-- default-run:start -->", "<!-- default-run:end -->"
"""The markers of the README's generated "Measured: the default run" block."""


def _minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60:02d} s"


def readme_block(record: dict[str, Any]) -> str:
    """The README's "Measured: the default run" block, every number from ``record``."""
    machine, setup, cfg = record["machine"], record["setup"], record["config"]
    env = record.get("environment") or {}
    versions = env.get("versions", {})
    rounds = record["final"]["rounds"]
    curve = dict((int(r), a) for r, a in record["curve"])
    step = 50 if rounds >= 100 else 10
    marks = [r for r in range(step, rounds, step) if r in curve]
    accs = " · ".join(f"{r}: {100 * curve[r]:.1f} %" for r in marks)
    final = record["final"]
    layers = ", ".join(
        f"{name.removesuffix('.weight')} {d:.2f}"
        for name, d in (record.get("layer_densities") or {}).items()
    )
    k = int(cfg["k"])
    scalars = 4 * k
    up = record["uplink_per_client_round"]
    down = record["downlink_per_client_round"]
    load = machine.get("load_before")
    load_text = f"load average {load[0]:.1f} at the start" if load else "load not recorded"
    head = (
        f"`{record['command']}` on the {machine.get('cores', '?')}-core development VM "
        f"({machine.get('cpu', '?')}, torch {versions.get('torch', '?')}, flwr "
        f"{versions.get('flwr', '?')}, {record['clients']} simulated clients, defaults of "
        f"`pyproject.toml`: {cfg.get('method')} with the {cfg.get('prune-method')} mask at "
        f"density {cfg.get('density')}, K = {k}, `lr-schedule = {cfg.get('lr-schedule')}`), "
        f"{record['date'][:10]}, {load_text} (`benchmarks/default_run.py`, "
        "`docs/results/default_run.json`):"
    )
    rows = [
        (
            "wall time",
            f"**{_minutes(record['wall_seconds'])}** end to end (set-up check, Ray start, "
            f"pruning, {rounds} rounds; strategy {record['strategy_seconds']:.0f} s; median "
            f"round {record['median_round_seconds']:.2f} s; client step "
            f"{record['client_seconds_mean']:.2f} s mean). A fresh machine adds a few minutes "
            "for the first install of `.venv`",
        ),
        (
            "pruning (server, data-free NTK-SAP)",
            f"density {setup['density']:.4f} ({setup['kept_weights']:,} weights kept; {layers}); "
            f"{setup['kept_coordinates']:,} trainable coordinates; {setup['prune_seconds']:.1f} s",
        ),
        (
            "test accuracy (10,000 images; chance = 10 %)",
            f"round {accs} · **{rounds}: {100 * final['accuracy']:.1f} %** "
            f"(loss {final['loss']:.3f})",
        ),
        (
            "uplink per client-round",
            f"**{up:,.0f} B** = {scalars:,} B of scalars (K = {k} float32) + "
            f"{up - scalars:,.0f} B of envelope; {record['uplink_first_round']:,.0f} B in "
            "round 1 (+ fingerprint and partition count)",
        ),
        (
            "downlink per client-round",
            f"{down:,.0f} B (kept weights + envelope); {record['downlink_first_round']:,.0f} B "
            'in round 1, with the mask. With `downlink="replay"` the weights are replaced by '
            "the server's steps ([docs/protocol.md](docs/protocol.md))",
        ),
        (
            "whole run, all clients",
            f"{record['uplink_total_bytes'] / 1e6:.1f} MB up, "
            f"{record['downlink_total_bytes'] / 1e6:.0f} MB down",
        ),
        (
            "client forward FLOPs per round",
            f"{record['client_forward_flops_per_round'] / 1e9:.2f} GFLOP ({k + 1} sparse "
            "forwards of one batch)",
        ),
        (
            "client peak RSS (whole Ray actor process, CUDA torch build)",
            f"{record['client_peak_mem_bytes_max'] / 1e9:.1f} GB",
        ),
    ]
    table = ["| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join([START, head, "", *table, END]) + "\n"


def write_readme(readme: Path, record: dict[str, Any]) -> None:
    """Replace the README's block between :data:`START` and :data:`END` by :func:`readme_block`."""
    text = readme.read_text()
    begin, end = text.index(START), text.index(END) + len(END) + 1
    readme.write_text(text[:begin] + readme_block(record) + text[end:])


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
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument(
        "--from-record",
        action="store_true",
        help="run nothing: re-read the recorded run's results.json, rewrite the JSON and README",
    )
    parser.add_argument("overrides", nargs="*", help="run-config overrides for scripts/run.sh")
    args = parser.parse_args()
    if args.from_record:
        old = json.loads(args.json.read_text())
        results = json.loads((ROOT / old["results_json"]).read_text())
        keep = ("machine", "command", "results_json", "date")
        record = {**{k: old[k] for k in keep}, **summarize(results, old["wall_seconds"])}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        write_readme(args.readme, record)
        print(f"# rewrote {os.path.relpath(args.json, ROOT)} and the README's block")
        return 0
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
    write_readme(args.readme, record)
    acc = record["final"]["accuracy"]
    print(f"# default run: {wall:.0f} s end to end, {acc:.2%} at round {record['final']['rounds']}")
    print(f"# wrote {os.path.relpath(args.json, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
