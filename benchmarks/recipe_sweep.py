"""A better default recipe: candidate server recipes on the default setting, screened then run long.

Every run is the **real** ServerApp and ClientApps driven in process by
``tests/inprocess_grid.py`` (as ``benchmarks/paper_comparison.py`` does): the default
``pyproject.toml`` run config (zo-pruned, LeNet-5, NTK-SAP d = 0.1, 10 clients, Dirichlet 0.5,
K = 200, batch 32, seed 3407) with only the candidate's keys changed. Each run is a fresh
subprocess with one torch thread, two at a time (``--workers``). Three stages:

1. ``screen``: the baseline and one change at a time (:func:`screen_candidates`) for
   ``--screen-rounds`` rounds (a candidate with K directions runs ``200 / K`` times as many
   rounds: the same forward passes).
2. ``combos``: the screen's winners combined (:func:`combo_candidates`), and the best recipe
   and the baseline on ``zo-dense`` (the same recipe must serve dense and pruned ZO).
3. ``full``: the baseline and the best recipes (:func:`full_candidates`) for ``--full-rounds``.

``--e2e NAME`` then measures one full-length candidate end to end with ``flwr run .`` (what
``scripts/run.sh`` runs, without its set-up step), 10 simulated clients, and records its wall
time. Candidates are ranked by their *score*: the mean test accuracy of the last three
evaluations (one seed, so a single evaluation's noise does not decide).

Outputs: every run's ``results.json`` under ``outputs/recipe_sweep/``; the summary
``docs/results/recipe_sweep.json`` (machine, load before and after, versions, per candidate its
keys, rounds, accuracy curve, final / best accuracy, score, wall seconds); the report
``docs/recipe.md`` (``benchmarks/recipe_report.py``, every sentence computed from the JSON).
Runs already in the JSON with the same keys and rounds are not run again.

Usage::

    nice -n 10 python benchmarks/recipe_sweep.py [--stage screen|combos|full|all]
        [--screen-rounds 100] [--full-rounds 450] [--workers 2] [--e2e NAME] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from machine import cpu_model, data_dir, load_average, machine_info
from recipe_report import write_report

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

RUN_THREADS = 1
"""torch threads of every run process."""
SCORE_EVALS = 3
"""Evaluations averaged into a candidate's score (the last ones of its run)."""
WIN_MARGIN = 0.005
"""A screen candidate wins when its score beats the baseline's by more than this."""
BASE_K = 200
"""The default K: a candidate with K directions runs ``BASE_K / K`` times the rounds."""
E2E_CLIENTS = 10
TIME_BUDGET_S = 600.0
"""The target's wall-time budget, end to end."""
TIME_SPARE = 0.1
"""Fraction of the budget a recipe leaves spare for the machine's drift: the same default run
(bit-identical curve) took 535 s and 588 s end to end 25 minutes apart here (2026-12-02, AMD
EPYC; the second is docs/results/default_run.json), a 10 % drift."""

Candidate = dict[str, Any]

BASELINE_RECIPE: dict[str, Any] = {
    "model": "lenet5",
    "k": 200,
    "sigma": 0.001,
    "optimizer": "adam",
    "lr": 0.01,
    "adam-beta1": 0.9,
    "adam-beta2": 0.99,
    "weight-decay": 0.0,
    "clip": 0.0,
    "clip-scope": "round",
    "ema": 0.0,
    "warmup-rounds": 0,
    "lr-schedule": "constant",
}
"""The recipe every candidate changes: the default before this sweep (issue #18), pinned so
the sweep means the same after the defaults move."""


# ------------------------------------------------------------------------------ candidates


def screen_candidates(gn_rounds: int) -> list[Candidate]:
    """The baseline and one change at a time (``fixed_rounds``: not at the stage's scale)."""
    return [  # most promising first: a sweep cut short by a busy machine keeps those
        {"name": "baseline", "keys": {}},
        {"name": "ema-0.95", "keys": {"ema": 0.95}},
        {"name": "cosine", "keys": {"lr-schedule": "cosine"}},
        {"name": "lr-0.02", "keys": {"lr": 0.02}},
        {"name": "clip-client-0.3", "keys": {"clip": 0.3, "clip-scope": "client"}},
        {"name": "k-100", "keys": {"k": 100}},
        {"name": "sigma-1e-4", "keys": {"sigma": 1e-4}},
        {"name": "warmup-20", "keys": {"warmup-rounds": 20}},
        {"name": "lr-0.005", "keys": {"lr": 0.005}},
        {"name": "wd-5e-4", "keys": {"weight-decay": 5e-4}},
        {"name": "lenet-gn", "keys": {"model": "lenet-gn"}, "fixed_rounds": gn_rounds},
    ]


def score(curve: list[list[float]]) -> float:
    """Mean accuracy of the last :data:`SCORE_EVALS` evaluations of ``[[round, acc], ...]``."""
    tail = [acc for _, acc in curve[-SCORE_EVALS:]]
    return sum(tail) / len(tail)


def winners(screen: list[Candidate]) -> list[Candidate]:
    """Single changes that beat the baseline by :data:`WIN_MARGIN`, best first.

    Of winners that set the same key (two learning rates, two EMA decays) only the better one
    stays; changes at another scale (``fixed_rounds``: lenet-gn) are not combined.
    """
    base = next(c for c in screen if c["name"] == "baseline")
    better = sorted(
        (
            c
            for c in screen
            if c["name"] != "baseline"
            and "fixed_rounds" not in c
            and c["score"] > base["score"] + WIN_MARGIN
        ),
        key=lambda c: -c["score"],
    )
    kept: list[Candidate] = []
    for cand in better:
        if not any(set(cand["keys"]) & set(k["keys"]) for k in kept):
            kept.append(cand)
    return kept


def combo_candidates(screen: list[Candidate]) -> list[Candidate]:
    """The winners combined: all of them, and the best two when there are three or more."""
    won = winners(screen)
    combos: list[Candidate] = []
    sets = [won] if len(won) >= 2 else []
    if len(won) >= 3:
        sets.append(won[:2])
    for members in sets:
        keys: dict[str, Any] = {}
        for member in members:
            keys.update(member["keys"])
        combos.append(
            {
                "name": "+".join(m["name"] for m in members),
                "keys": keys,
                "members": [m["name"] for m in members],
            }
        )
    return combos


def best_recipe(candidates: list[Candidate]) -> Candidate:
    """The best-scoring pruned recipe at the screen scale (the baseline if nothing beats it)."""
    pool = [
        c for c in candidates if "fixed_rounds" not in c and c["keys"].get("method") != "zo-dense"
    ]
    return max(pool, key=lambda c: c["score"])


def dense_candidates(best: Candidate) -> list[Candidate]:
    """The baseline and ``best`` on ``zo-dense``."""
    out = [{"name": "dense-baseline", "keys": {"method": "zo-dense"}, "dense_of": "baseline"}]
    if best["name"] != "baseline":
        out.append(
            {
                "name": f"dense-{best['name']}",
                "keys": {**best["keys"], "method": "zo-dense"},
                "dense_of": best["name"],
            }
        )
    return out


HORIZON_KEYS = frozenset({"lr-schedule"})
"""Keys whose effect depends on the run's length: a cosine decay over 100 rounds anneals long
before one over 450 does, so the screen cannot rank it; such a candidate always runs at full
length."""


def full_candidates(ranked: list[Candidate], top: int) -> list[Candidate]:
    """The baseline, the ``top`` best-scoring pruned recipes and every horizon candidate.

    A single change of a :data:`HORIZON_KEYS` key (the cosine schedule) runs at full length
    whatever its screen score, after the ``top`` best: on the baseline, and on top of the best
    recipe when that one changes other keys.
    """
    pool = sorted(
        (
            c
            for c in ranked
            if "fixed_rounds" not in c
            and c["keys"].get("method") != "zo-dense"
            and c["name"] != "baseline"
        ),
        key=lambda c: -c["score"],
    )
    chosen: list[Candidate] = [{"name": "baseline", "keys": {}}]
    chosen += [{"name": c["name"], "keys": dict(c["keys"])} for c in pool[:top]]
    best = pool[0] if pool and top else None
    for cand in pool[top:]:
        if not HORIZON_KEYS & set(cand["keys"]) or "members" in cand:
            continue
        chosen.append({"name": cand["name"], "keys": dict(cand["keys"]), "horizon": True})
        if best is not None and not set(best["keys"]) & set(cand["keys"]):
            chosen.append(
                {
                    "name": f"{best['name']}+{cand['name']}",
                    "keys": {**best["keys"], **cand["keys"]},
                    "horizon": True,
                }
            )
    return chosen


def timing_pairs(screen: list[Candidate]) -> list[list[Candidate]]:
    """Pairs run side by side to time a candidate that changes the work of a round.

    ``[baseline, candidate]`` for every screen candidate that changes the model or K, so the
    ratio of their seconds per round is taken under the same load.
    """
    pairs = []
    for cand in screen:
        if {"k", "model"} & set(cand["keys"]):
            pairs.append(
                [
                    {"name": f"baseline-vs-{cand['name']}", "keys": {}, "timing_of": "baseline"},
                    {"name": cand["name"], "keys": dict(cand["keys"]), "timing_of": cand["name"]},
                ]
            )
    return pairs


def rounds_of(cand: Candidate, scale: int) -> int:
    """Rounds of a candidate at ``scale``: its ``fixed_rounds``, else ``scale * BASE_K / K``."""
    if "fixed_rounds" in cand:
        return int(cand["fixed_rounds"])
    k = int(cand["keys"].get("k", BASE_K))
    return max(1, round(scale * BASE_K / k))


# ------------------------------------------------------------------------------------ runs


def run_config(
    cand: Candidate, rounds: int, run_name: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The full run config: pyproject defaults, the sweep's bookkeeping, the candidate's keys."""
    from inprocess_grid import app_config

    config: dict[str, Any] = app_config(
        **{
            "data-dir": str(args.data_dir),
            "output-dir": str(args.out_dir),
            "run-name": run_name,
            "num-server-rounds": rounds,
            "eval-every": args.eval_every,
            "checkpoint-every": 0,
            **BASELINE_RECIPE,
            **args.scale_keys,
            **cand["keys"],
        }
    )
    return config


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One run through the real Flower apps, in this process."""
    import torch

    torch.set_num_threads(RUN_THREADS)
    from inprocess_grid import InProcessGrid, server_context

    import client_app.client_app as client_module
    from server_app.server_app import app as server_app

    config = job["config"]
    started = time.perf_counter()
    server_app(InProcessGrid(client_module.app, job["clients"], config), server_context(config))
    path = Path(config["output-dir"]) / config["run-name"] / "results.json"
    return {"results": str(path), "seconds": time.perf_counter() - started}


def launch(job: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_one` in a fresh interpreter."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    # Its own session: with the kernel's autogroup scheduling a run then gets a session's share
    # of the CPU, as the other benchmarks' runs do (nice applies within a session only).
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env=env, start_new_session=True
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-4000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def finished(job: dict[str, Any]) -> dict[str, Any] | None:
    """A run of ``job`` already complete on disk (a sweep that was stopped), else ``None``.

    Its wall time is then the ServerApp's own (``final.seconds``: without the interpreter's
    start), and the row says so.
    """
    config = job["config"]
    path = Path(config["output-dir"]) / config["run-name"] / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    final = results.get("final", {})
    same = all(results["config"].get(k) == v for k, v in config.items())
    if not same or final.get("rounds") != config["num-server-rounds"] or "seconds" not in final:
        return None
    return {"results": str(path), "seconds": final["seconds"], "wall_from": "results"}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """What the sweep keeps of a run's ``results.json``."""
    curve = [[r["round"], r["accuracy"]] for r in results["rounds"] if "accuracy" in r]
    round_s = [r["round_seconds"] for r in results["rounds"] if "round_seconds" in r]
    ordered = sorted(round_s)
    return {
        "round_seconds_median": ordered[len(ordered) // 2],
        "curve": curve,
        "final_acc": curve[-1][1],
        "best_acc": max(acc for _, acc in curve),
        "score": score(curve),
        "rounds_done": results["final"]["rounds"],
        "round_seconds_mean": sum(round_s) / len(round_s),
        "kept_coordinates": results["setup"].get("kept_coordinates"),
    }


def run_stage(
    stage: str,
    cands: list[Candidate],
    scale: int,
    args: argparse.Namespace,
    summary: dict[str, Any],
    save: Callable[[], None],
) -> list[Candidate]:
    """Run the candidates not yet in ``summary[stage]`` (same keys and rounds); return all."""
    done = {(c["name"], c["rounds"]): c for c in summary["stages"].get(stage, [])}
    todo, out = [], []
    for cand in cands:
        rounds = rounds_of(cand, scale)
        prev = done.get((cand["name"], rounds))
        if prev is not None and prev["keys"] == cand["keys"]:
            out.append(prev)
            continue
        todo.append({**cand, "rounds": rounds})
    if args.only:
        todo = [c for c in todo if c["name"] in args.only]
    print(f"# stage {stage}: {len(todo)} to run, {len(out)} cached", flush=True)

    def go(cand: Candidate) -> Candidate:
        run_name = f"{stage}-{cand['name']}-r{cand['rounds']}"
        job = {"config": run_config(cand, cand["rounds"], run_name, args), "clients": args.clients}
        load_start = load_average()
        res = finished(job) or launch(job)
        if "error" in res:
            print(f"# {run_name}: FAILED\n{res['error']}", file=sys.stderr, flush=True)
            return {**cand, "error": res["error"][-600:]}
        results = json.loads(Path(res["results"]).read_text())
        row = {
            **cand,
            **summarize(results),
            "wall_seconds": res["seconds"],
            "wall_from": res.get("wall_from", "subprocess"),
            "load_start": load_start,
            "load_end": load_average(),
        }
        print(
            f"# {run_name}: final {row['final_acc']:.4f}, score {row['score']:.4f}, "
            f"{row['wall_seconds']:.0f} s",
            flush=True,
        )
        return row

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for row in pool.map(go, todo):
            if "error" not in row:
                out.append(row)
                summary["stages"][stage] = [
                    r for r in summary["stages"].get(stage, []) if r["name"] != row["name"]
                ] + [row]
                save()
    order = [c["name"] for c in cands]
    return sorted(out, key=lambda c: order.index(c["name"]) if c["name"] in order else 99)


# ------------------------------------------------------------------------------ end to end


def run_e2e(name: str, args: argparse.Namespace, summary: dict[str, Any]) -> dict[str, Any]:
    """``flwr run .`` of a full-stage candidate with 10 simulated clients; its wall time."""
    cand = next(c for c in summary["stages"]["full"] if c["name"] == name)
    out_dir = args.out_dir / "e2e"
    overrides = {
        "data-dir": str(args.data_dir),
        "output-dir": str(out_dir),
        "run-name": f"e2e-{name}",
        "num-server-rounds": cand["rounds"],
        **cand["keys"],
    }
    run_config_arg = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(args.flwr_home),
        "PYTHONUNBUFFERED": "1",
    }
    args.flwr_home.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).with_name("flwr")),
        "run",
        ".",
        "--stream",
        "--federation-config",
        f"num-supernodes={E2E_CLIENTS} client-resources-num-cpus=1",
        "--run-config",
        run_config_arg,
    ]
    load_before = load_average()
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"flwr run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads((out_dir / f"e2e-{name}" / "results.json").read_text())
    command = (
        "flwr run . --stream --federation-config "
        f"'num-supernodes={E2E_CLIENTS} client-resources-num-cpus=1' --run-config "
        f"'{' '.join(f'{k}={json.dumps(v)}' for k, v in cand['keys'].items())}'"
    )
    return e2e_row(cand, results, wall, command, load_before, load_average())


def e2e_from_default_run(name: str, record_path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The e2e row of ``name`` from ``benchmarks/default_run.py``'s record of ``scripts/run.sh``.

    Once a candidate is the default, the README's timed default run *is* its end-to-end run;
    the run's config must hold the candidate's keys (else ``SystemExit`` naming the keys that
    differ). A default run of another length than the full stage's is a candidate of its own,
    ``<name>-<rounds>`` (``e2e_of``: ``name``; its keys add ``num-server-rounds``): the same
    recipe at the length the budget allows, measured end to end only.
    """
    cand = next(c for c in summary["stages"]["full"] if c["name"] == name)
    record = json.loads(record_path.read_text())
    results = json.loads((ROOT / record["results_json"]).read_text())
    differ = sorted(k for k, v in cand["keys"].items() if results["config"].get(k) != v)
    if differ:
        raise SystemExit(f"{record_path}: the default run differs from {name} in {differ}")
    rounds = int(results["config"]["num-server-rounds"])
    if rounds != cand["rounds"]:
        keys = {**cand["keys"], "num-server-rounds": rounds}
        cand = {**cand, "name": f"{name}-{rounds}", "keys": keys, "rounds": rounds}
    machine = record["machine"]
    row = e2e_row(
        cand,
        results,
        record["wall_seconds"],
        record["command"],
        machine.get("load_before"),
        machine.get("load_after"),
    )
    row["source"] = os.path.relpath(record_path.resolve(), ROOT)
    if row["name"] != name:
        row["e2e_of"] = name
    return row


def reference_from(record_path: Path) -> dict[str, Any]:
    """The reference end-to-end run of the default from a ``default_run.py`` record."""
    record = json.loads(record_path.read_text())
    machine = record.get("machine", {})
    return {
        "source": (
            f"`{os.path.relpath(record_path.resolve(), ROOT)}`, `{record['command']}` timed by "
            f"benchmarks/default_run.py on {record.get('date', '?')} ({machine.get('cpu', '?')})"
        ),
        "wall_seconds": record["wall_seconds"],
        "strategy_seconds": record["strategy_seconds"],
        "rounds": record["final"]["rounds"],
    }


def e2e_row(
    cand: Candidate,
    results: dict[str, Any],
    wall: float,
    command: str,
    load_before: object,
    load_after: object,
) -> dict[str, Any]:
    """An end-to-end run's row: wall time, its start-up (wall minus the rounds), the curve."""
    in_rounds = sum(r["round_seconds"] for r in results["rounds"] if "round_seconds" in r)
    return {
        "name": cand["name"],
        "keys": cand["keys"],
        "rounds": cand["rounds"],
        "command": command,
        "wall_seconds": wall,
        "startup_seconds": wall - in_rounds,
        "load_before": load_before,
        "load_after": load_after,
        **summarize(results),
    }


# ------------------------------------------------------------------------------------ main


def versions() -> dict[str, str | None]:
    """Library versions and the lock file's hash (:mod:`fedzo_flwr.environment`'s record)."""
    from fedzo_flwr.environment import library_versions, lock_file_sha256

    return {
        "python": platform.python_version(),
        **library_versions(),
        "lock_sha256": lock_file_sha256(ROOT),
    }


def baseline_text() -> str:
    """The baseline's training keys, in words (for the report)."""
    from inprocess_grid import app_config

    c = app_config(**BASELINE_RECIPE)
    return (
        f"{c['method']}, {c['model']}, {c['prune-method']} pruning at density {c['density']}, "
        f"{c['partitioner']} alpha {c['alpha']}, K = {c['k']}, sigma = {c['sigma']}, batch "
        f"{c['batch-size']}, server {c['optimizer']} lr {c['lr']} betas "
        f"({c['adam-beta1']}, {c['adam-beta2']}), weight decay {c['weight-decay']}, clip "
        f"{c['clip']}, EMA {c['ema']}, warm-up {c['warmup-rounds']}, {c['lr-schedule']} lr, "
        f"seed {c['seed']}"
    )


def merge_summaries(disk: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """``mine`` merged into ``disk`` (two sweeps, e.g. two stages, may share one JSON file).

    A run's row never changes once written, so rows are united by name per stage (``mine``
    wins on a tie); ``info`` is merged key by key, its ``load`` record stage by stage.
    """
    stages: dict[str, list[Candidate]] = {}
    for stage in {*disk.get("stages", {}), *mine.get("stages", {})}:
        rows = {r["name"]: r for r in disk.get("stages", {}).get(stage, [])}
        rows.update({r["name"]: r for r in mine.get("stages", {}).get(stage, [])})
        stages[stage] = list(rows.values())
    info = {**disk.get("info", {}), **mine.get("info", {})}
    info["load"] = {**disk.get("info", {}).get("load", {}), **mine.get("info", {}).get("load", {})}
    commands = [*disk.get("info", {}).get("commands", [])]
    commands += [c for c in mine.get("info", {}).get("commands", []) if c not in commands]
    info["commands"] = commands
    e2e = {e["name"]: e for e in disk.get("e2e", [])}
    e2e.update({e["name"]: e for e in mine.get("e2e", [])})
    return {"info": info, "stages": stages, "e2e": list(e2e.values())}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stage", choices=("screen", "combos", "full", "timing", "all"), default="all"
    )
    parser.add_argument("--timing-rounds", type=int, default=8)
    parser.add_argument(
        "--full", nargs="+", default=None, help="screen or combo candidates for the full stage"
    )
    parser.add_argument("--screen-rounds", type=int, default=100)
    parser.add_argument("--full-rounds", type=int, default=450)
    parser.add_argument("--gn-rounds", type=int, default=3, help="lenet-gn: timing only")
    parser.add_argument("--top", type=int, default=2, help="recipes run at full length")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="CI: 4 clients, K = 10, 4 rounds")
    parser.add_argument("--only", nargs="+", default=None, help="candidate names to run")
    parser.add_argument("--e2e", default=None, help="full-stage candidate to run with flwr run")
    parser.add_argument(
        "--e2e-from",
        type=Path,
        default=None,
        help="with --e2e: take the run from this default_run.py record instead of running it",
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--ref-source",
        default="README.md, the default run measured end to end",
        help="where the reference end-to-end run of the default was measured",
    )
    parser.add_argument(
        "--reference-from",
        type=Path,
        default=None,
        help="take the reference run from this default_run.py record (this machine's timed "
        "default run) instead of --ref-*; works with --e2e and --report-only",
    )
    parser.add_argument("--ref-wall", type=float, default=361.0, help="its wall seconds")
    parser.add_argument("--ref-strategy", type=float, default=335.0, help="its rounds' seconds")
    parser.add_argument("--ref-rounds", type=int, default=300, help="its rounds")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data_dir = data_dir(str(args.data_dir) if args.data_dir else None).resolve()
    base = ROOT / "outputs" / ("recipe_sweep_quick" if args.quick else "recipe_sweep")
    args.out_dir = (args.out_dir or base).resolve()
    args.flwr_home = args.out_dir / "flwr-home"
    args.json = args.json or (
        base / "recipe_sweep.json" if args.quick else ROOT / "docs/results/recipe_sweep.json"
    )
    args.report = args.report or (base / "recipe.md" if args.quick else ROOT / "docs/recipe.md")
    args.scale_keys = {}
    if args.quick:
        args.clients, args.screen_rounds, args.full_rounds = 4, 4, 6
        args.gn_rounds, args.eval_every = 2, 2
        args.scale_keys = {"k": 10, "prune-iterations": 2, "prune-repeats": 1}
    return args


def record_command(info: dict[str, Any]) -> None:
    """Add this invocation to ``info["commands"]`` (once; paths relative to the checkout)."""
    argv = [os.path.relpath(a, ROOT) if a.startswith("/") else a for a in sys.argv[1:]]
    command = " ".join(["python benchmarks/recipe_sweep.py", *argv])
    if command not in info.setdefault("commands", []):
        info["commands"].append(command)


def main() -> int:
    args = parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return 0
    summary: dict[str, Any] = (
        json.loads(args.json.read_text()) if args.json.is_file() else {"info": {}, "stages": {}}
    )

    def save() -> None:
        merged = merge_summaries(
            json.loads(args.json.read_text()) if args.json.is_file() else {}, summary
        )
        summary.update(merged)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_suffix(".json.partial")
        partial.write_text(json.dumps(summary, indent=2))
        os.replace(partial, args.json)

    # What the report names: the candidate list and the baseline it changes (code, not runs).
    summary.setdefault("info", {}).update(
        {
            "screen_candidates": [c["name"] for c in screen_candidates(args.gn_rounds)],
            "baseline_recipe": BASELINE_RECIPE,
        }
    )
    summary["info"]["time_spare"] = TIME_SPARE
    if args.reference_from:
        summary["info"]["reference"] = reference_from(args.reference_from)
        save()
    if args.report_only:
        write_report(args.report, summary, args.json)
        print(f"# rebuilt {args.report} from {args.json}")
        return 0
    if args.e2e:
        record_command(summary["info"])
        row = (
            e2e_from_default_run(args.e2e, args.e2e_from, summary)
            if args.e2e_from
            else run_e2e(args.e2e, args, summary)
        )
        summary["e2e"] = [e for e in summary.get("e2e", []) if e["name"] != row["name"]] + [row]
        save()
        write_report(args.report, summary, args.json)
        print(f"# e2e {args.e2e}: {row['final_acc']:.4f} in {row['wall_seconds']:.0f} s")
        return 0
    info = summary["info"]
    info.update(
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "machine": machine_info(RUN_THREADS),
            "torch_threads": RUN_THREADS,
            "workers": args.workers,
            "clients": args.clients,
            "screen_rounds": args.screen_rounds,
            "full_rounds": args.full_rounds,
            "eval_every": args.eval_every,
            "score_evals": SCORE_EVALS,
            "win_margin": WIN_MARGIN,
            "time_budget_s": TIME_BUDGET_S,
            "quick": args.quick,
            "scale_keys": args.scale_keys,
            "data_dir_rel": os.path.relpath(args.data_dir, ROOT),
            "out_dir_rel": os.path.relpath(args.out_dir, ROOT),
            "versions": versions(),
            "baseline_text": baseline_text(),
            "e2e_clients": E2E_CLIENTS,
            "reference": (
                reference_from(args.reference_from)
                if args.reference_from
                else {
                    "source": args.ref_source,
                    "wall_seconds": args.ref_wall,
                    "strategy_seconds": args.ref_strategy,
                    "rounds": args.ref_rounds,
                }
            ),
        }
    )
    record_command(info)
    load_key = f"{args.stage}: {', '.join(args.only)}" if args.only else args.stage
    info.setdefault("load", {})[load_key] = {"before": load_average()}
    started = time.perf_counter()
    # The full stage's report needs the timing pairs (a candidate with another K or model).
    stages = {
        "all": ("screen", "combos", "full", "timing"),
        "full": ("full", "timing"),
    }.get(args.stage, (args.stage,))
    if "screen" in stages:
        run_stage(
            "screen", screen_candidates(args.gn_rounds), args.screen_rounds, args, summary, save
        )
    if "combos" in stages:
        screen = summary["stages"]["screen"]
        combos = run_stage(
            "combos", combo_candidates(screen), args.screen_rounds, args, summary, save
        )
        best = best_recipe(screen + combos)
        run_stage("dense", dense_candidates(best), args.screen_rounds, args, summary, save)
    if "full" in stages:
        ranked = summary["stages"]["screen"] + summary["stages"].get("combos", [])
        if args.full:
            ranked = [c for c in ranked if c["name"] in args.full]
            info["full_choice"] = f"named: {', '.join(args.full)}"
        else:
            info["full_choice"] = (
                f"the {args.top} best scores and every change of "
                f"{', '.join(sorted(HORIZON_KEYS))}, alone and on top of the best (its effect "
                "depends on the run's length, which the screen does not have)"
            )
        top = len(ranked) if args.full else args.top
        run_stage("full", full_candidates(ranked, top), args.full_rounds, args, summary, save)
    if "timing" in stages:
        info["timing_rounds"] = args.timing_rounds
        for pair in timing_pairs(screen_candidates(args.gn_rounds)):
            for cand in pair:
                cand["fixed_rounds"] = args.timing_rounds
            run_stage("timing", pair, args.timing_rounds, args, summary, save)
    info["load"][load_key].update(
        {"after": load_average(), "seconds": time.perf_counter() - started}
    )
    save()
    write_report(args.report, summary, args.json)
    print(f"# wrote {args.json} and {args.report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
