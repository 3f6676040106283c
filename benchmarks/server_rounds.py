"""Rounds per second of the server side alone: aggregation, reconstruction and the step.

Times :meth:`fedzo_flwr.server.ZOServer.apply_round` on synthetic client replies (the seeds the
server expects, random float32 loss differences, random example counts) for 10, 100 and 1000
clients, ``lenet5`` dense and at density 0.1 (random mask, ``prune("random", seed=0)``), K = 200,
forward differences, Adam, in both seed modes:

* ``shared``: every client uses the round's seeds, the server averages the C scalar vectors
  (O(C·K)) and rebuilds **one** estimate (O(K·kept)): the time should be flat in C.
* ``per-client``: every client has its own seeds, so the server rebuilds C estimates
  (O(C·K·kept)): the time grows linearly in C.

Each point is the median over ``--repeats`` rounds (fewer for the slow per-client points: the
total time per point is capped by ``--max-seconds``). No Flower, no network: the strategy's
arithmetic only.

Usage::

    python benchmarks/server_rounds.py [--json PATH] [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedzo_flwr.config import RunConfig
from fedzo_flwr.mask import apply_mask_, dense_mask
from fedzo_flwr.models import build_model
from fedzo_flwr.pruning import prune
from fedzo_flwr.server import ClientUpdate, ZOServer
from fedzo_flwr.zo.reconstruct import ScalarStep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zo_client import cpu_model


def make_server(model_name: str, density: float, seed_mode: str, k: int) -> ZOServer:
    cfg = RunConfig(model=model_name, k=k, seed_mode=seed_mode, density=density, seed=3407)
    model = build_model(model_name, seed=3407)
    mask = dense_mask(model) if density >= 1 else prune("random", model, model_name, density)
    apply_mask_(model, mask)
    return ZOServer(cfg, model, mask)


def updates_for(server: ZOServer, server_round: int, clients: int, rng: np.random.Generator):
    k = server.cfg.k
    updates = []
    for pid in range(clients):
        seeds = server.expected_seeds(server_round, pid)
        steps = [ScalarStep(s, (1e-3 * rng.standard_normal(k)).astype(np.float32)) for s in seeds]
        updates.append(ClientUpdate(pid, int(rng.integers(16, 512)), steps, 2.3))
    return updates


def time_rounds(server: ZOServer, clients: int, repeats: int, max_seconds: float) -> dict:
    rng = np.random.default_rng(clients)
    times: list[float] = []
    build: list[float] = []
    server_round = 1
    started = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        updates = updates_for(server, server_round, clients, rng)
        build.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        summary = server.apply_round(updates)
        times.append(time.perf_counter() - t1)
        assert summary.clients == clients and np.isfinite(summary.grad_norm)
        server_round += 1
        if time.perf_counter() - started > max_seconds and len(times) >= 1:
            break
    median = float(np.median(times))
    return {
        "round_s": median,
        "rounds_per_s": 1.0 / median,
        "rounds_timed": len(times),
        "times_s": times,
        "reconstructions_per_round": summary.distinct_seeds,
        "synthetic_updates_s": float(np.median(build)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="CI: 10 and 100 clients, K=50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="cap per point")
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--clients", type=int, nargs="+", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = args.k or (50 if args.quick else 200)
    counts = args.clients or ([10, 100] if args.quick else [10, 100, 1000])
    repeats = 2 if args.quick else args.repeats
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_before": os.getloadavg(),
    }
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads")
    print("| model | density | kept | seed mode | clients | round (s) | rounds/s | rebuilds |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for density in (1.0, 0.1):
        for mode in ("shared", "per-client"):
            server = make_server("lenet5", density, mode, k)
            for clients in counts:
                point = time_rounds(server, clients, repeats, args.max_seconds)
                row = {
                    "model": "lenet5",
                    "density": density,
                    "kept_coordinates": server.space.dim,
                    "seed_mode": mode,
                    "clients": clients,
                    "k": k,
                    **point,
                }
                rows.append(row)
                print(
                    f"| lenet5 | {density:g} | {server.space.dim} | {mode} | {clients} "
                    f"| {point['round_s']:.4f} | {point['rounds_per_s']:.2f} "
                    f"| {point['reconstructions_per_round']} |",
                    flush=True,
                )
    info["load_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
