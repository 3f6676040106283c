"""The paper comparison in one command: FedAvg vs dense ZO (BAFFLE) vs pruned ZO (ours) + pruners.

Every run is the **real** ServerApp and ClientApps (same strategies, messages, results.json as
``flwr run``) driven in process by ``tests/inprocess_grid.py``: no Ray, no SuperLink. Runs share
everything but the method keys (data, partitions, seeds, evaluation, schema); each run is a
fresh subprocess, two at a time (``--workers``). The matrix:

* for each α in {0.1, 0.5, iid}: ``fedavg`` (dense), ``zo-dense`` (BAFFLE), ``zo-pruned`` (NTK,
  density 0.1);
* at α = 0.1 (strong non-IID): ``zo-pruned`` NTK at densities 0.05 and 0.3, ``fedavg`` with the
  NTK mask at 0.1, and ``zo-pruned`` at 0.1 with every other pruner (``ntk-local``, ``snip``,
  ``synflow``, ``magnitude``, ``random``).

Several seeds (``--seeds N``, default 1): every row runs with the run-config ``seed`` set to
``s0, s0+1, ..., s0+N-1`` (``--seed s0``, default the pyproject value). That one key drives θ0,
the pruner's draws, the partitions, node sampling and every round seed
(``fedzo_flwr/seeding.py``). Per-seed runs are named ``<row>-s<seed>`` (one seed keeps the
plain row name, as before); the summary JSON holds one aggregated row per configuration
(mean ± sample standard deviation and ``n``, ``paper_summary.aggregate``) and every per-seed
summary under ``seed_runs``.

Outputs: every run's ``results.json`` under ``--out-dir``; a summary JSON (``--json``);
``docs/results.md`` (tables, verdicts per paper claim, commands, machine) and PNG plots under
``docs/figures/``. The client-memory section is read from ``benchmarks/client_memory.py``'s
JSON (``--memory-json``) when it exists. This module runs the matrix; the numbers per run are
``paper_summary.py``, the verdicts ``paper_verdicts.py``, the report ``paper_report.py`` (its
sentences, every one computed from the summary JSON, ``paper_notes.py``) and the figures
``paper_plots.py``.

Usage::

    python benchmarks/paper_comparison.py [--quick] [--rounds 200] [--k 50] [--clients 5]
        [--eval-every 10] [--workers 2] [--engine fused] [--data-dir DIR] [--only NAME ...]
        [--seeds 1] [--seed S0] [--report-only]

``--quick`` (CI): α = 0.5 only, 4 clients, 3 rounds, K = 10, short pruning; writes its report
under ``outputs/`` instead of ``docs/``. ``--report-only`` rebuilds the report and plots from
the summary JSON (e.g. after a new client-memory measurement) without running anything.
``--engine fused``: the clients' zeroth-order engine, for speed (same loss differences as
``lean`` up to float32 rounding; checked against a naive reference by
``benchmarks/zo_client.py``), passed as the run-config key ``engine``.
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

from machine import load_average, machine_info
from paper_plots import plots
from paper_report import write_report
from paper_summary import ALPHAS, aggregate, summarize

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

RUN_THREADS = 1
"""torch threads of every run process (:func:`run_one`)."""


# --------------------------------------------------------------------------------- matrix


def matrix(quick: bool) -> list[dict[str, Any]]:
    """The runs: ``{"name", "alpha", "group", "overrides"}``."""
    runs: list[dict[str, Any]] = []

    def add(group: str, alpha: str, name: str, **overrides: Any) -> None:
        runs.append({"name": f"{name}-a{alpha}", "alpha": alpha, "group": group, **overrides})

    alphas = ("0.5",) if quick else ALPHAS
    for alpha in alphas:
        add("core", alpha, "fedavg-dense", method="fedavg", density=1.0)
        add("core", alpha, "zo-dense", method="zo-dense")
        add("core", alpha, "zo-ntk-d0.1", method="zo-pruned", **{"prune-method": "ntk"})
    ablation = "0.5" if quick else "0.1"
    add("ablation", ablation, "fedavg-ntk-d0.1", method="fedavg", **{"prune-method": "ntk"})
    if not quick:
        for density in (0.05, 0.3):
            add("density", ablation, f"zo-ntk-d{density:g}", method="zo-pruned", density=density)
    pruners = ("ntk-local", "snip") if quick else ("ntk-local", "snip", "synflow", "magnitude")
    if not quick:
        pruners = (*pruners, "random")
    for pruner in pruners:
        add(
            "pruners", ablation, f"zo-{pruner}-d0.1", method="zo-pruned", **{"prune-method": pruner}
        )
    return runs


def run_name(name: str, seed: int, seeds: int) -> str:
    """A per-seed run's name: the row's name, or ``<row>-s<seed>`` with several seeds."""
    return name if seeds == 1 else f"{name}-s{seed}"


def run_config(
    run: dict[str, Any], args: argparse.Namespace, seed: int | None = None
) -> dict[str, Any]:
    """The full run config of one run (pyproject defaults + the shared scale + the run's keys).

    ``seed``: the run-config ``seed`` (``None``: the pyproject default) for one of ``args.seeds``.
    """
    from inprocess_grid import app_config

    keys = {k: v for k, v in run.items() if k not in {"name", "alpha", "group"}}
    seeding = {} if seed is None else {"seed": seed}
    name = run["name"] if seed is None else run_name(run["name"], seed, args.seeds)
    partition = (
        {"partitioner": "iid"}
        if run["alpha"] == "iid"
        else {"partitioner": "dirichlet", "alpha": float(run["alpha"])}
    )
    config: dict[str, Any] = app_config(
        **{
            "data-dir": str(args.data_dir),
            "output-dir": str(args.out_dir),
            "run-name": name,
            "num-server-rounds": args.rounds,
            "eval-every": args.eval_every,
            "checkpoint-every": 0,
            "k": args.k,
            "local-batches": args.local_batches,
            "local-lr": args.fedavg_lr,
            "prune-iterations": args.prune_iterations,
            "prune-repeats": args.prune_repeats,
            **partition,
            **keys,
            **seeding,
        }
    )
    return config


# ---------------------------------------------------------------------------- one run


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration through the real Flower apps (in this process)."""
    import torch

    torch.set_num_threads(RUN_THREADS)
    from inprocess_grid import InProcessGrid, server_context

    import client_app.client_app as client_module
    from server_app.server_app import app as server_app

    config = dict(job["config"])
    if job.get("engine"):
        config["engine"] = job["engine"]
    started = time.perf_counter()
    grid = InProcessGrid(client_module.app, job["clients"], config)
    server_app(grid, server_context(config))
    seconds = time.perf_counter() - started
    path = Path(config["output-dir"]) / config["run-name"] / "results.json"
    return {"results": str(path), "seconds": seconds}


def launch(job: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`run_one` in a fresh interpreter (isolated caches and memory)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-4000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------------- summary

# -------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--local-batches", type=int, default=5)
    parser.add_argument("--fedavg-lr", type=float, default=0.05)
    parser.add_argument("--prune-iterations", type=int, default=None)
    parser.add_argument("--prune-repeats", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engine", default="fused", help="ZO client engine ('' = the config's)")
    parser.add_argument("--only", nargs="+", default=None, help="run names to (re)run")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--figures", type=Path, default=None)
    parser.add_argument(
        "--memory-json", type=Path, default=ROOT / "docs/results/client_memory.json"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per row: s0, s0+1, ...")
    parser.add_argument("--seed", type=int, default=None, help="s0 (default: the config's)")
    parser.add_argument("--report-only", action="store_true", help="rebuild report from JSON")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return 0

    quick = args.quick
    args.rounds = args.rounds or (3 if quick else 200)
    args.k = args.k or (10 if quick else 50)
    args.clients = args.clients or (4 if quick else 5)
    args.eval_every = args.eval_every or (3 if quick else 10)
    args.prune_iterations = args.prune_iterations or (2 if quick else 20)
    args.prune_repeats = args.prune_repeats or (1 if quick else 5)
    env_data = os.environ.get("FEDZO_DATA_DIR")
    args.data_dir = (args.data_dir or Path(env_data or ROOT.parent / "shared" / "data")).resolve()
    base = ROOT / "outputs" / ("paper_comparison_quick" if quick else "paper_comparison")
    args.out_dir = (args.out_dir or base).resolve()
    args.json = args.json or (
        base / "summary.json" if quick else ROOT / "docs/results/paper_comparison.json"
    )
    args.report = args.report or (base / "results.md" if quick else ROOT / "docs/results.md")
    args.figures = args.figures or (base / "figures" if quick else ROOT / "docs/figures")

    if args.report_only:
        summary = json.loads(args.json.read_text())
        memory = json.loads(args.memory_json.read_text()) if args.memory_json.is_file() else None
        figures = plots(summary["runs"], memory, args.figures)
        write_report(args.report, summary["runs"], memory, figures, summary["info"])
        print(f"# rebuilt {args.report} from {args.json}")
        return 0
    runs = matrix(quick)
    if args.only:
        runs = [r for r in runs if r["name"] in args.only]
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    machine = machine_info(RUN_THREADS)
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": quick,
        **{key: machine[key] for key in ("cpu", "cores", "torch", "python", "load_before")},
        "workers": args.workers,
        "environment": machine["environment"],
    }
    sample = RunConfigDefaults.get()
    s0 = int(sample["seed"] if args.seed is None else args.seed)
    seeds = [s0 + i for i in range(args.seeds)]
    started = time.perf_counter()
    pairs = [(run, seed) for run in runs for seed in seeds]
    jobs = [
        {
            "config": run_config(run, args, seed),
            "clients": args.clients,
            "engine": args.engine if run.get("method", "") != "fedavg" else "",
        }
        for run, seed in pairs
    ]
    print(
        f"# {len(jobs)} runs ({len(runs)} rows x {len(seeds)} seed(s)), {args.workers} at a time, "
        f"results under {args.out_dir}",
        flush=True,
    )

    def go(
        item: tuple[tuple[dict[str, Any], int], dict[str, Any]],
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        (run, _), job = item
        out = launch(job)
        status = "FAILED" if "error" in out else f"{out['seconds']:.0f}s"
        print(f"# {job['config']['run-name']}: {status}", flush=True)
        return run, out

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        done = list(pool.map(go, zip(pairs, jobs)))
    failures = [
        (job["config"]["run-name"], out["error"])
        for (_, out), job in zip(done, jobs)
        if "error" in out
    ]
    per_seed: dict[tuple[str, int], dict[str, Any]] = {}
    if args.only and args.json.is_file():  # merge re-runs into the existing summary
        old = json.loads(args.json.read_text())
        for s in old.get("seed_runs", old["runs"]):
            per_seed[(s["name"], int(s.get("seed", old["info"]["seed"])))] = s
    for run, out in done:
        if "error" in out:
            continue
        results = json.loads(Path(out["results"]).read_text())
        summary = summarize(run, results, out["seconds"])
        per_seed[(summary["name"], summary["seed"])] = summary
    order = [r["name"] for r in matrix(quick)]
    seed_runs = [per_seed[key] for name in order for key in sorted(per_seed) if key[0] == name]
    ordered = [
        aggregate([s for s in seed_runs if s["name"] == name])
        for name in order
        if any(s["name"] == name for s in seed_runs)
    ]
    memory = json.loads(args.memory_json.read_text()) if args.memory_json.is_file() else None
    info.update(
        {
            "seconds": time.perf_counter() - started,
            "load_after": load_average(),
            "model": sample["model"],
            "clients": args.clients,
            "rounds": args.rounds,
            "k": args.k,
            "sigma": sample["sigma"],
            "batch": sample["batch-size"],
            "optimizer": sample["optimizer"],
            "lr": sample["lr"],
            "local_batches": args.local_batches,
            "fedavg_lr": args.fedavg_lr,
            "prune_iterations": args.prune_iterations,
            "prune_repeats": args.prune_repeats,
            "eval_every": args.eval_every,
            "seed": s0,
            "seeds": seeds,
            "engine_note": (
                f"ZO clients used the `{args.engine}` engine"
                if args.engine
                else "ZO clients used the config's engine"
            ),
            "dataset": sample["dataset"],
            "local_steps": sample["local-steps"],
            "clients_per_round": sample["clients-per-round"],
            "client_optimizer": sample["client-optimizer"],
            "torch_threads": RUN_THREADS,
            "gpus": gpus,
            "out_dir_rel": os.path.relpath(args.out_dir, ROOT),
            "json_rel": os.path.relpath(args.json, ROOT),
            "engine": args.engine,
        }
    )
    figures = plots(ordered, memory, args.figures)
    write_report(args.report, ordered, memory, figures, info)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"info": info, "runs": ordered, "seed_runs": seed_runs, "failures": failures},
            indent=2,
        )
    )
    print(f"# wrote {args.report}, {args.json} and {len(figures)} figures", flush=True)
    for name, error in failures:
        print(f"# FAILED {name}:\n{error}", file=sys.stderr)
    return 1 if failures else 0


class RunConfigDefaults:
    """The pyproject defaults (for the report's scale table)."""

    @staticmethod
    def get() -> dict[str, Any]:
        from inprocess_grid import app_config

        defaults: dict[str, Any] = app_config()
        return defaults


if __name__ == "__main__":
    sys.exit(main())
