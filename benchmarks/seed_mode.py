"""Shared vs per-client seeds on CIFAR-10: estimate quality and accuracy after N rounds.

For each mode it measures, over several rounds' worth of seeds, the cosine between the round's
aggregated zeroth-order estimate and the true (autograd) gradient of the same clients' batches,
and optionally trains ``--rounds`` rounds in process and records test accuracy.

    python benchmarks/seed_mode.py --json outputs/seed_mode.json [--rounds 120]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import NotRequired, TypedDict

import torch
from machine import machine_info

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import sample_batch, to_tensor
from fedzo_flwr.data.client_data import load_client_data
from fedzo_flwr.run.inprocess import run_inprocess
from fedzo_flwr.run.setup import initial_model
from fedzo_flwr.seeding import batch_seed
from fedzo_flwr.zo.client import train_round
from fedzo_flwr.zo.estimator import batch_loss
from fedzo_flwr.zo.reconstruct import ScalarStep, accumulate_steps, aggregate_deltas
from fedzo_flwr.zo.server import ClientUpdate, ZOServer


class ModeResult(TypedDict):
    """One seed mode's estimate quality (and, with ``--rounds``, its accuracy curve)."""

    cosine_mean: float
    cosines: list[float]
    client_gradient_norm_mean: float
    mean_gradient_norm_mean: float
    kept_coordinates: int
    accuracy: NotRequired[list[dict[str, float]]]
    seconds: NotRequired[float]


def true_gradient(server: ZOServer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Autograd gradient of the batch loss over the kept coordinates, in KeptSpace order."""
    params = dict(server.model.named_parameters())
    wrt = [params[n] for n in server.space.names]
    grads = torch.autograd.grad(batch_loss(server.model(x), y), wrt)
    parts = [
        g.reshape(-1) if i is None else g.reshape(-1)[i]
        for g, i in zip(grads, server.space.indices)
    ]
    return torch.cat(parts).detach()


def round_estimate(server: ZOServer, updates: list[ClientUpdate]) -> torch.Tensor:
    """The gradient estimate ``ZOServer.apply_round`` would step with (without stepping)."""
    total = sum(u.num_examples for u in updates)
    groups: dict[tuple[int, ...], list[ClientUpdate]] = defaultdict(list)
    for update in updates:
        groups[tuple(s.seed for s in update.steps)].append(update)
    grad = torch.zeros(server.space.dim)
    for seeds, members in groups.items():
        weights = [m.num_examples for m in members]
        merged = [
            ScalarStep(
                seed, aggregate_deltas([m.steps[j].deltas for m in members], weights, server.cfg.k)
            )
            for j, seed in enumerate(seeds)
        ]
        grad += sum(weights) / total * accumulate_steps(server.space.sizes, merged, server.settings)
    return grad


def estimate_quality(cfg: RunConfig, num_clients: int, trials: int) -> ModeResult:
    init = initial_model(cfg)
    server = ZOServer(cfg, init.model, init.mask)
    clients = [load_client_data(cfg, pid, num_clients) for pid in range(num_clients)]
    cosines, client_norms, mean_norms = [], [], []
    for trial in range(1, trials + 1):
        seed = server.round_seed(trial)
        updates, truth, total = [], torch.zeros(server.space.dim), 0
        for pid, (x, y) in enumerate(clients):
            result = train_round(cfg, server.model, server.space, x, y, seed, pid)
            updates.append(ClientUpdate(pid, result.num_examples, result.steps, result.base_loss))
            idx = sample_batch(len(y), cfg.batch_size, batch_seed(result.steps[0].seed, pid))
            g = true_gradient(server, to_tensor(x[idx], cfg.dataset), torch.tensor(y[idx]))
            client_norms.append(float(g.norm()))
            truth += len(y) * g
            total += len(y)
        truth /= total
        mean_norms.append(float(truth.norm()))
        estimate = round_estimate(server, updates)
        cosines.append(float(torch.nn.functional.cosine_similarity(estimate, truth, dim=0)))
    return {
        "cosine_mean": sum(cosines) / len(cosines),
        "cosines": cosines,
        "client_gradient_norm_mean": sum(client_norms) / len(client_norms),
        "mean_gradient_norm_mean": sum(mean_norms) / len(mean_norms),
        "kept_coordinates": server.space.dim,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=0, help="also train this many rounds")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, ModeResult] = {}
    for mode in ("shared", "per-client"):
        overrides = {
            "seed-mode": mode,
            "num-server-rounds": max(1, args.rounds),
            "eval-every": max(1, args.rounds // 6),
        }
        if args.data_dir:
            overrides["data-dir"] = args.data_dir
        cfg = RunConfig.from_run_config(overrides)
        start = time.perf_counter()
        rows[mode] = estimate_quality(cfg, args.clients, args.trials)
        if args.rounds:
            rows[mode]["accuracy"] = [
                {"round": e["round"], "accuracy": e["accuracy"]}
                for e in run_inprocess(cfg, args.clients)
            ]
        rows[mode]["seconds"] = time.perf_counter() - start
    print("| seed-mode | cos(estimate, true gradient) | mean client ‖g_c‖ | ‖mean g‖ | accuracy |")
    print("|---|---|---|---|---|")
    for mode, row in rows.items():
        acc = row.get("accuracy", [])
        last = f"{100 * acc[-1]['accuracy']:.1f}% @ {acc[-1]['round']}" if acc else "-"
        print(
            f"| {mode} | {row['cosine_mean']:.3f} | {row['client_gradient_norm_mean']:.3f} | "
            f"{row['mean_gradient_norm_mean']:.3f} | {last} |"
        )
    if args.json:
        payload = {
            "machine": machine_info(1),
            "clients": args.clients,
            "trials": args.trials,
            "results": rows,
        }
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)


if __name__ == "__main__":
    main()
