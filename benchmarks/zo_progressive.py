"""Zeroth-order progressive training against ``zo-pruned``: client time, FLOPs and cosine per stage.

For each model (``lenet5``, ``resnet20``) the staged model gets the data-free NTK-SAP mask of the
ordinary model at density 0.1 and its output modules their own NTK-SAP masks
(:func:`fedzo_flwr.progressive.zo.staged_mask`). On one real CIFAR-10 training batch of 32, one
client step (K directions, forward differences, σ = 1e-3) is run for

* ``zo-pruned``: the whole masked model, every kept coordinate perturbed (K + 1 full passes);
* ``stage-t``: ``zo-progressive`` at stage ``t``: the frozen prefix once, then K + 1 passes
  through block ``t`` and its output module (the head at the last stage)
  (:func:`fedzo_flwr.progressive.zo.stage_loss_differences`, the prefix included in the time).

Reported per variant and engine: the median wall and CPU time of ``--repeats`` steps after one
warm-up step, **interleaved** (every repeat runs every variant once, in turn, so a change of load
on the shared machine hits all alike) and the median over repeats of the per-repeat ratio to
``zo-pruned``; the sparse FLOPs of the step (:func:`~fedzo_flwr.measure.flops.zo_step_flops`,
:func:`~fedzo_flwr.progressive.zo.stage_step_flops`); the perturbed dimension ``n`` and the cosine
of each repeat's estimate (seed = repeat) with the autograd gradient of the variant's own loss
(stage loss over the stage's kept coordinates), mean over repeats, next to √(K / (K + n + 1)).
The ``fused`` and ``lean`` scalars must agree (rtol 1e-4, atol 2e-6) or the script exits 1.

Usage::

    python benchmarks/zo_progressive.py [--json PATH] [--quick] [--threads 1] [--repeats 5]
        [--k 200] [--ntk-iterations 5] [--data-dir DIR]

``--quick`` (CI): lenet5 only, K = 20, 2 repeats, NTK-SAP with 2 iterations.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import data_dir, load_average, machine_info
from torch import nn
from torch.nn.functional import cosine_similarity

from fedzo_flwr.data import load_dataset, to_tensor
from fedzo_flwr.measure.flops import forward_flops, zo_step_flops
from fedzo_flwr.progressive import build_staged
from fedzo_flwr.progressive.zo import (
    ActiveStage,
    apply_staged_mask_,
    stage_loss_differences,
    stage_step_flops,
    staged_mask,
)
from fedzo_flwr.pruning import NTKSAPConfig, ntk_sap_mask
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.engines import LossDifferences, batch_loss
from fedzo_flwr.zo.estimator import loss_differences
from fedzo_flwr.zo.reconstruct import ScalarStep, estimate_gradient
from fedzo_flwr.zo.settings import ZOSettings

DENSITY = 0.1
BATCH = 32
ENGINES = ("fused", "lean")
Step = Callable[[int, str], LossDifferences]


def space_gradient(
    module: nn.Module, space: KeptSpace, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Autograd gradient of the batch loss of ``module`` restricted to ``space``."""
    params = dict(module.named_parameters())
    wrt = [params[n].detach().requires_grad_(True) for n in space.names]
    state = {n: p.detach() for n, p in params.items()} | dict(zip(space.names, wrt, strict=True))
    with torch.enable_grad():
        loss = batch_loss(torch.func.functional_call(module, state, (x,)), y)
        grads = torch.autograd.grad(loss, wrt)
    parts = [
        g.reshape(-1) if idx is None else g.reshape(-1)[idx]
        for g, idx in zip(grads, space.indices, strict=True)
    ]
    return torch.cat(parts)


def measure_model(
    name: str, k: int, repeats: int, ntk: NTKSAPConfig, x: torch.Tensor, y: torch.Tensor
) -> list[dict[str, Any]]:
    """Every variant of ``name``, interleaved."""
    staged = build_staged(name, seed=0)
    model_mask = ntk_sap_mask(staged.model, name, DENSITY, ntk, seed=0)
    mask = staged_mask(staged, model_mask, name, DENSITY, ntk, seed=0)
    apply_staged_mask_(staged, mask)
    settings = ZOSettings(k=k, sigma=1e-3)
    for p in staged.model.parameters():
        p.requires_grad_(True)
    full = KeptSpace(staged.model, model_mask)
    variants: dict[str, dict[str, Any]] = {}

    def pruned_step(seed: int, engine: str) -> LossDifferences:
        return loss_differences(staged.model, full, x, y, seed, settings, engine)

    variants["zo-pruned"] = {
        "step": pruned_step,
        "stage": None,
        "dim": full.dim,
        "sizes": full.sizes,
        "flops": zo_step_flops(staged.model, model_mask, BATCH, k, "forward"),
        "flops_prefix": 0,
        "flops_pass": forward_flops(staged.model, model_mask, batch_size=BATCH).sparse,
        "grad": space_gradient(staged.model, full, x, y),
    }
    actives = [ActiveStage(staged, t, mask) for t in range(staged.num_stages)]
    for active in actives:

        def stage_step(seed: int, engine: str, active: ActiveStage = active) -> LossDifferences:
            return stage_loss_differences(active, x, y, seed, settings, engine)

        flops = stage_step_flops(active, BATCH, k, "forward")
        variants[f"stage-{active.stage}"] = {
            "step": stage_step,
            "stage": active.stage,
            "dim": active.space.dim,
            "sizes": active.space.sizes,
            "flops": flops.total,
            "flops_prefix": flops.prefix,
            "flops_pass": flops.active_pass,
            "grad": space_gradient(active.module, active.space, active.features(x), y),
        }
    wall: dict[tuple[str, str], list[float]] = {(v, e): [] for v in variants for e in ENGINES}
    cpu: dict[tuple[str, str], list[float]] = {(v, e): [] for v in variants for e in ENGINES}
    cosines: dict[str, list[float]] = {v: [] for v in variants}
    disagreement = 0.0
    for r in range(repeats + 1):  # repeat 0 is the warm-up
        for label, variant in variants.items():
            deltas = {}
            for engine in ENGINES:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                result = variant["step"](r, engine)
                seconds, cpu_seconds = (
                    time.perf_counter() - start_wall,
                    time.process_time() - start_cpu,
                )
                deltas[engine] = result.deltas
                if r > 0:
                    wall[label, engine].append(seconds)
                    cpu[label, engine].append(cpu_seconds)
            if not np.allclose(deltas["fused"], deltas["lean"], rtol=1e-4, atol=2e-6):
                gap = float(np.abs(deltas["fused"] - deltas["lean"]).max())
                raise SystemExit(f"{name} {label}: fused and lean scalars differ by {gap:.3g}")
            disagreement = max(disagreement, float(np.abs(deltas["fused"] - deltas["lean"]).max()))
            if r > 0:
                g_hat = estimate_gradient(variant["sizes"], ScalarStep(r, deltas["lean"]), settings)
                cosines[label].append(float(cosine_similarity(g_hat, variant["grad"], dim=0)))
    rows = []
    base = variants["zo-pruned"]
    for label, variant in variants.items():
        row: dict[str, Any] = {
            "model": name,
            "variant": label,
            "stage": variant["stage"],
            "k": k,
            "batch_size": BATCH,
            "dim": variant["dim"],
            "flops": variant["flops"],
            "flops_prefix": variant["flops_prefix"],
            "flops_pass": variant["flops_pass"],
            "passes": k + 1,
            "flops_ratio": variant["flops"] / base["flops"],
            "cosine_mean": statistics.fmean(cosines[label]),
            "cosines": cosines[label],
            "cosine_predicted": math.sqrt(k / (k + variant["dim"] + 1)),
            "max_abs_fused_vs_lean": disagreement,
        }
        for engine in ENGINES:
            times = wall[label, engine]
            ratios = [t / b for t, b in zip(times, wall["zo-pruned", engine], strict=True)]
            row[f"{engine}_time_s"] = statistics.median(times)
            row[f"{engine}_cpu_s"] = statistics.median(cpu[label, engine])
            row[f"{engine}_time_ratio"] = statistics.median(ratios)
            row[f"{engine}_times_s"] = times
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        "| model | variant | n | cosine (pred.) | GFLOP/step | FLOPs ratio | fused s | "
        "fused ratio | lean s | lean ratio |"
    )
    print(header)
    print("|" + "---|" * 10)
    for r in rows:
        print(
            f"| {r['model']} | {r['variant']} | {r['dim']:,} | {r['cosine_mean']:.3f} "
            f"({r['cosine_predicted']:.3f}) | {r['flops'] / 1e9:.2f} | {r['flops_ratio']:.2f} | "
            f"{r['fused_time_s']:.3f} | {r['fused_time_ratio']:.2f} | {r['lean_time_s']:.3f} | "
            f"{r['lean_time_ratio']:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--ntk-iterations", type=int, default=5)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = ("lenet5",) if args.quick else ("lenet5", "resnet20")
    k = 20 if args.quick else args.k
    repeats = 2 if args.quick else args.repeats
    ntk = NTKSAPConfig(iterations=2 if args.quick else args.ntk_iterations, repeats=1)
    machine = machine_info(args.threads)
    data = load_dataset("cifar10", data_dir(args.data_dir))
    x = to_tensor(data.x_train[:BATCH], "cifar10")
    y = torch.tensor(data.y_train[:BATCH], dtype=torch.long)
    rows = [row for name in models for row in measure_model(name, k, repeats, ntk, x, y)]
    machine["load_after"] = load_average()
    print_table(rows)
    print(f"machine: {machine}")
    result = {
        "benchmark": "zo_progressive",
        "settings": {
            "density": DENSITY,
            "k": k,
            "sigma": 1e-3,
            "scheme": "forward",
            "batch_size": BATCH,
            "repeats": repeats,
            "ntk_sap": {"iterations": ntk.iterations, "repeats": ntk.repeats, "seed": 0},
            "quick": args.quick,
        },
        "machine": machine,
        "rows": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
