"""Rounds per second of the server side alone: aggregation, reconstruction and the step.

Times :meth:`fedzo_flwr.zo.server.ZOServer.apply_round` on synthetic client replies (the seeds
the
server expects, random float32 loss differences, random example counts) for 10, 100 and 1000
clients, ``lenet5`` dense and at density 0.1 (random mask, ``prune("random", seed=0)``), K = 200,
forward differences, Adam, in both seed modes:

* ``shared``: every client uses the round's seeds, the server averages the C scalar vectors
  (O(C·K)) and rebuilds **one** estimate (O(K·kept)): the time should be flat in C.
* ``per-client``: every client has its own seeds, so the server rebuilds C estimates
  (O(C·K·kept)): the time grows linearly in C.

Each point is the median over ``--repeats`` rounds (fewer for the slow per-client points: the
total time per point is capped by ``--max-seconds``).

A second table times the Flower strategy itself (``FedZO``, shared seeds, density 0.1) around
the same arithmetic: ``configure_train`` (one message per node, each message's serialized size
measured) and ``aggregate_train`` (every reply validated, measured and parsed, the round
applied, ``results.json`` rewritten). The clients are stand-ins that answer each message the
way the real ClientApp does (K random float32 loss differences, the expected seeds, the metric
record) at no compute cost; their time is not counted. No network, no Ray: an in-process grid.

Usage::

    python benchmarks/server_rounds.py [--json PATH] [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from machine import ROOT, data_dir, machine_info

from fedzo_flwr import protocol
from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import DatasetArrays, load_dataset
from fedzo_flwr.models import build_model
from fedzo_flwr.protocol.wire import encode_scalars
from fedzo_flwr.pruning import prune
from fedzo_flwr.run.results import RunRecorder
from fedzo_flwr.seeding import client_step_seeds
from fedzo_flwr.sparse.mask import apply_mask_, dense_mask
from fedzo_flwr.zo.directions import fingerprint
from fedzo_flwr.zo.reconstruct import ScalarStep
from fedzo_flwr.zo.server import ClientUpdate, ZOServer

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from inprocess_grid import InProcessGrid

from server_app.strategy import FedZO, kept_arrays


class RoundTiming(TypedDict):
    """:meth:`ZOServer.apply_round` timed over synthetic rounds with a fixed client count."""

    round_s: float
    rounds_per_s: float
    rounds_timed: int
    times_s: list[float]
    reconstructions_per_round: int
    synthetic_updates_s: float


class StrategyTiming(TypedDict):
    """``configure_train`` and ``aggregate_train`` of :class:`FedZO` timed with ``clients``."""

    clients: int
    k: int
    kept_coordinates: int
    configure_train_s: float
    aggregate_train_s: float
    round_s: float
    rounds_per_s: float
    rounds_timed: int
    results_json_bytes: int


def make_server(model_name: str, density: float, seed_mode: str, k: int) -> ZOServer:
    cfg = RunConfig(model=model_name, k=k, seed_mode=seed_mode, density=density, seed=3407)
    model = build_model(model_name, seed=3407)
    mask = dense_mask(model) if density >= 1 else prune("random", model, model_name, density)
    apply_mask_(model, mask)
    return ZOServer(cfg, model, mask)


def updates_for(
    server: ZOServer, server_round: int, clients: int, rng: np.random.Generator
) -> list[ClientUpdate]:
    k = server.cfg.k
    updates = []
    for pid in range(clients):
        seeds = server.expected_seeds(server_round, pid)
        steps = [ScalarStep(s, (1e-3 * rng.standard_normal(k)).astype(np.float32)) for s in seeds]
        updates.append(ClientUpdate(pid, int(rng.integers(16, 512)), steps, 2.3))
    return updates


def time_rounds(server: ZOServer, clients: int, repeats: int, max_seconds: float) -> RoundTiming:
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


def _config_int(config: ConfigRecord, key: str) -> int:
    """The integer ``config[key]`` of a train message."""
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"train message: {key!r} is {type(value).__name__}, not int")
    return value


def stand_in_client(k: int, seed_mode: str, directions: str, sizes: Sequence[int]) -> ClientApp:
    """A ClientApp stand-in: answers a train message as the real one does, without computing.

    ``sizes`` is the KeptSpace layout the real client derives from the mask (the fingerprint
    covers it).
    """
    app = ClientApp()

    @app.train()
    def answer(message: Message, context: Context) -> Message:
        config = message.content.config_records[protocol.CONFIG_KEY]
        pid = int(context.node_config["partition-id"])
        rng = np.random.default_rng(pid)
        round_seed = _config_int(config, protocol.ROUND_SEED_KEY)
        seeds = client_step_seeds(round_seed, seed_mode, pid, 1)
        zo = ConfigRecord(
            {
                protocol.DELTAS_KEY: encode_scalars(1e-3 * rng.standard_normal(k)),
                protocol.STEP_SEEDS_KEY: seeds,
                protocol.ROUND_KEY: _config_int(config, protocol.ROUND_KEY),
            }
        )
        if protocol.FINGERPRINT_SEED_KEY in config:
            zo[protocol.FINGERPRINT_KEY] = fingerprint(
                sizes, _config_int(config, protocol.FINGERPRINT_SEED_KEY), directions
            )
        metrics = MetricRecord(
            {
                "num-examples": int(rng.integers(16, 512)),
                "base-loss": 2.3,
                "client-seconds": 0.1,
                "peak-mem-bytes": 1e8,
                "extra-mem-bytes": 1e6,
                "partition-id": pid,
            }
        )
        if protocol.MASK_KEY in config:  # first contact: the federation's split, as the real one
            metrics[protocol.NUM_PARTITIONS_KEY] = int(context.node_config["num-partitions"])
        return Message(
            RecordDict({protocol.ZO_KEY: zo, protocol.METRICS_KEY: metrics}), reply_to=message
        )

    return app


def time_strategy(
    clients: int, k: int, rounds: int, out_dir: Path, test_data: DatasetArrays
) -> StrategyTiming:
    """Median ``configure_train`` and ``aggregate_train`` seconds of FedZO with ``clients``."""
    server = make_server("lenet5", 0.1, "shared", k)
    cfg = server.cfg
    recorder = RunRecorder(out_dir / f"strategy-{clients}", cfg.to_run_config())
    strategy = FedZO(server, recorder, test_data, forward_flops=0)
    client = stand_in_client(k, cfg.seed_mode, cfg.directions, server.space.sizes)
    grid = InProcessGrid(client, clients, {})
    configure: list[float] = []
    aggregate: list[float] = []
    arrays = kept_arrays(server)
    for server_round in range(1, rounds + 1):
        t0 = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        t1 = time.perf_counter()
        replies = list(grid.send_and_receive(messages))
        t2 = time.perf_counter()
        arrays_out, _ = strategy.aggregate_train(server_round, replies)
        t3 = time.perf_counter()
        assert isinstance(arrays_out, ArrayRecord)
        assert recorder.round_entry(server_round)["clients"] == clients
        arrays = arrays_out
        if server_round > 1:  # round 1 carries the mask and the fingerprint check
            configure.append(t1 - t0)
            aggregate.append(t3 - t2)
    round_s = float(np.median(configure) + np.median(aggregate))
    return {
        "clients": clients,
        "k": k,
        "kept_coordinates": server.space.dim,
        "configure_train_s": float(np.median(configure)),
        "aggregate_train_s": float(np.median(aggregate)),
        "round_s": round_s,
        "rounds_per_s": 1.0 / round_s,
        "rounds_timed": len(configure),
        "results_json_bytes": recorder.results_path.stat().st_size,
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
    parser.add_argument("--strategy-rounds", type=int, default=6, help="FedZO rounds per point")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = args.k or (50 if args.quick else 200)
    counts = args.clients or ([10, 100] if args.quick else [10, 100, 1000])
    repeats = 2 if args.quick else args.repeats
    info = machine_info(args.threads)
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
    print()
    print(
        "| strategy (FedZO, shared, d=0.1) | clients | configure_train (s) | aggregate_train (s) "
        "| rounds/s |"
    )
    print("|---|---|---|---|---|")
    test_data = load_dataset("cifar10", data_dir(args.data_dir))
    strategy_rows: list[StrategyTiming] = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in counts:
            timing = time_strategy(clients, k, args.strategy_rounds, Path(tmp), test_data)
            strategy_rows.append(timing)
            print(
                f"| FedZO | {clients} | {timing['configure_train_s']:.4f} "
                f"| {timing['aggregate_train_s']:.4f} | {timing['rounds_per_s']:.2f} |",
                flush=True,
            )
    info["load_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"machine": info, "rows": rows, "strategy_rows": strategy_rows}
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
