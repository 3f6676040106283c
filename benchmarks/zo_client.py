"""One forward-only client step: time, peak memory and achieved GFLOP/s of every engine.

For each model (``lenet5``, ``resnet20``) and density (dense, and 0.1 with a **random** global
mask from ``prune("random", ..., seed=0)``) it runs one zeroth-order client step (K = 200
directions, forward differences, σ = 1e-3, one real CIFAR-10 training batch of 32) with

* ``naive``: the reference written plainly below, the way BAFFLE's code does it: for each
  direction, add ``σ u_k`` to the model's state-dict tensors in place, run one forward pass,
  restore every tensor from a saved copy. No deep copy of the model, no batching.
* ``lean``, ``batched``, ``fused``: the engines of :func:`fedzo_flwr.zo.estimator.loss_differences`.

Every engine must return the naive reference's K scalars (``np.allclose`` with rtol 1e-3,
atol 1e-6; the maximum absolute difference is reported) or the script exits with status 1.

* **Time**: median wall-clock time of ``--repeats`` timed steps after one warm-up step; engines
  are run round robin so a change of machine load hits all of them alike. The median CPU time
  of the process (all threads) is recorded too: on a shared machine it is the steadier measure
  of the work done.
* **Memory**: peak extra resident memory of one step (:class:`fedzo_flwr.measure.memory.PeakMemory`,
  kernel high-water mark), each (engine, model, density) in its own fresh subprocess, after a
  warm-up step and ``malloc_trim``. The subprocess runs with
  ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072``: every
  allocation of 64 KiB or more (every tensor that matters) is its own mapping, returned to the
  system when freed, so resident memory follows the live tensors instead of glibc's heap
  history (without it the same step reads anywhere from 0.6x to 1.3x its live bytes). Next to
  it, the same measurement over five plain forward passes of the batch ("one batch of
  activations") and the size of the kept weights.
* **GFLOP/s**: dense forward FLOPs of the step (``zo_step_flops`` with no mask: every engine
  computes with masked dense tensors, so a pruned model does the dense work) over the median
  time, next to the machine's own dense fp32 matmul GFLOP/s measured at the same thread count
  (1024x1024, best of 15, measured before and after the table; "% of matmul" uses the one
  before).

Usage::

    python benchmarks/zo_client.py [--json PATH] [--quick] [--threads 2] [--repeats 5]
        [--data-dir DIR]

``--quick`` (CI): lenet5 only, K = 20, 2 repeats, no memory subprocesses for ``batched``.
The data folder is ``--data-dir``, else ``$FEDZO_DATA_DIR``, else ``../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from machine import data_dir, trim_memory
from machine import machine_info as base_machine_info

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # this checkout, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedzo_flwr.data import load_dataset, to_tensor
from fedzo_flwr.measure.flops import zo_step_flops
from fedzo_flwr.measure.memory import PeakMemory
from fedzo_flwr.models import build_model
from fedzo_flwr.pruning import prune
from fedzo_flwr.sparse.mask import Mask, apply_mask_
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.engines.fused import DEFAULT_MEMORY_BUDGET_MB, planned_chunk
from fedzo_flwr.zo.estimator import batch_loss, loss_differences
from fedzo_flwr.zo.settings import ZOSettings

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("naive", "lean", "batched", "fused")
SIGMA = 1e-3
SEED = 3407
BATCH = 32
RTOL, ATOL = 1e-3, 1e-6
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072"


class TimingJob(TypedDict):
    """What a timing worker measures (sent to it as JSON on its command line)."""

    model: str
    density: float
    k: int
    threads: int
    repeats: int
    engines: list[str]
    data_dir: str


class MemoryJob(TimingJob):
    """A timing job narrowed to the one engine whose step memory a memory worker measures."""

    engine: str


# ------------------------------------------------------------------------ naive reference


@torch.no_grad()
def naive_loss_differences(
    model: torch.nn.Module,
    space: KeptSpace,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    settings: ZOSettings,
) -> np.ndarray:
    """BAFFLE-style loop: perturb the state dict, forward, restore; one direction at a time."""
    state = model.state_dict(keep_vars=False)
    saved = {name: tensor.clone() for name, tensor in state.items()}
    generator = DirectionGenerator(space.sizes, seed, settings.directions)
    base = float(batch_loss(model(x), y))
    deltas = np.empty(settings.k, dtype=np.float64)
    for k in range(settings.k):
        noise = space.expand(generator.direction(k))  # dense tensors, 0 at pruned entries
        for name, u in noise.items():
            state[name].add_(u, alpha=settings.sigma)
        plus = float(batch_loss(model(x), y))
        for name, tensor in saved.items():
            state[name].copy_(tensor)
        if settings.scheme == "central":
            for name, u in noise.items():
                state[name].add_(u, alpha=-settings.sigma)
            minus = float(batch_loss(model(x), y))
            for name, tensor in saved.items():
                state[name].copy_(tensor)
        else:
            minus = base
        deltas[k] = plus - minus
    return deltas.astype(np.float32)


# ----------------------------------------------------------------------------- set-up


def setup(
    model_name: str, density: float, data: str | None
) -> tuple[torch.nn.Module, KeptSpace, Mask | None, torch.Tensor, torch.Tensor]:
    """Model (masked), its KeptSpace, mask and the first CIFAR-10 training batch of 32."""
    dataset = load_dataset("cifar10", data_dir(data))
    x = to_tensor(dataset.x_train[:BATCH], "cifar10")
    y = torch.tensor(dataset.y_train[:BATCH], dtype=torch.long)
    model = build_model(model_name, seed=SEED)
    mask = None
    if density < 1:
        mask = prune("random", model, model_name, density, seed=0)
        apply_mask_(model, mask)
    return model, KeptSpace(model, mask), mask, x, y


def step_fn(
    engine: str,
    model: torch.nn.Module,
    space: KeptSpace,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: ZOSettings,
) -> Callable[[], np.ndarray]:
    """One client step of ``engine`` on the batch, returning its K loss differences."""
    if engine == "naive":
        return lambda: naive_loss_differences(model, space, x, y, SEED, settings)
    return lambda: loss_differences(model, space, x, y, SEED, settings, engine=engine).deltas


# ---------------------------------------------------------------------------- workers


def timing_worker(job: TimingJob) -> dict[str, Any]:
    torch.set_num_threads(job["threads"])
    settings = ZOSettings(k=job["k"], sigma=SIGMA)
    model, space, mask, x, y = setup(job["model"], job["density"], job["data_dir"])
    fns = {e: step_fn(e, model, space, x, y, settings) for e in job["engines"]}
    deltas = {e: fn() for e, fn in fns.items()}  # warm-up, and the values to compare
    times: dict[str, list[float]] = {e: [] for e in fns}
    cpu: dict[str, list[float]] = {e: [] for e in fns}
    for _ in range(job["repeats"]):
        for engine, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[engine].append(time.perf_counter() - start)
            cpu[engine].append(time.process_time() - start_cpu)
    reference = deltas["naive"]
    out: dict[str, dict[str, Any]] = {}
    for engine in fns:
        diff = float(np.max(np.abs(deltas[engine] - reference)))
        out[engine] = {
            "time_s": float(np.median(times[engine])),
            "times_s": times[engine],
            "cpu_s": float(np.median(cpu[engine])),
            "max_abs_diff_vs_naive": diff,
            "agrees": bool(np.allclose(deltas[engine], reference, rtol=RTOL, atol=ATOL)),
        }
    dense_flops = zo_step_flops(model, None, BATCH, settings.k, settings.scheme)
    sparse_flops = zo_step_flops(model, mask, BATCH, settings.k, settings.scheme)
    return {
        "engines": out,
        "max_abs_delta": float(np.max(np.abs(reference))),
        "dense_flops": dense_flops,
        "sparse_flops": sparse_flops,
        "kept_coordinates": space.dim,
        "fused_chunk": planned_chunk(model, space, x, settings),
        "load_after": os.getloadavg(),
    }


def memory_worker(job: MemoryJob) -> dict[str, Any]:
    torch.set_num_threads(job["threads"])
    settings = ZOSettings(k=job["k"], sigma=SIGMA)
    model, space, _, x, y = setup(job["model"], job["density"], job["data_dir"])
    fn = step_fn(job["engine"], model, space, x, y, settings)
    with torch.no_grad():
        model(x)
    trim_memory()
    with torch.no_grad(), PeakMemory() as forward:
        for _ in range(5):
            model(x)
    fn()  # warm-up: lazy initialisation (kernels, thread pools, the fused plan)
    trim_memory()
    with PeakMemory() as step:
        fn()
    return {
        "step_extra_bytes": step.extra_bytes,
        "forward_extra_bytes": forward.extra_bytes,
        "kept_bytes": 4 * space.dim,
        "method": step.method,
    }


def run_worker(kind: str, job: TimingJob | MemoryJob) -> dict[str, Any]:
    """Run a worker in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(job)]
    env = dict(os.environ)
    if kind == "memory":
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed for {job}:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------- machine


def matmul_gflops(threads: int, n: int = 1024, repeats: int = 15) -> dict[str, float]:
    """Dense fp32 ``n x n`` matmul GFLOP/s at ``threads`` threads: median and best of repeats.

    On a shared machine the best run is the steadier estimate of what the cores can do.
    """
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    flops = 2 * n**3 / 1e9
    return {"median": flops / float(np.median(times)), "best": flops / min(times)}


def machine_info(threads: int) -> dict[str, Any]:
    """:func:`machine.machine_info` plus the OpenMP wait policy (it changes timings)."""
    return {
        **base_machine_info(threads),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }


# -------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="CI: lenet5, K=20, 2 repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per engine")
    parser.add_argument("--k", type=int, default=None, help="directions (default 200)")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--no-memory", action="store_true", help="skip memory subprocesses")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, payload = args.worker[0], json.loads(args.worker[1])
        result = timing_worker(payload) if kind == "timing" else memory_worker(payload)
        print(json.dumps(result))
        return 0

    models = args.models or (["lenet5"] if args.quick else ["lenet5", "resnet20"])
    k = args.k or (20 if args.quick else 200)
    repeats = args.repeats or (2 if args.quick else 5)
    engines = list(dict.fromkeys(["naive", *args.engines]))
    info = machine_info(args.threads)
    info["matmul_gflops_before"] = matmul_gflops(args.threads)
    matmul = info["matmul_gflops_before"]["best"]
    print(
        f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads;"
        f" dense fp32 matmul {matmul:.1f} GFLOP/s (best of 15; median"
        f" {info['matmul_gflops_before']['median']:.1f}); load {info['load_before']}"
    )
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for model_name in models:
        for density in (1.0, 0.1):
            job: TimingJob = {
                "model": model_name,
                "density": density,
                "k": k,
                "threads": args.threads,
                "repeats": repeats,
                "engines": engines,
                "data_dir": str(data_dir(args.data_dir)),
            }
            timing = run_worker("timing", job)
            for engine in engines:
                entry = timing["engines"][engine]
                row = {
                    "model": model_name,
                    "density": density,
                    "engine": engine,
                    "k": k,
                    "batch": BATCH,
                    **entry,
                    "speedup_vs_naive": timing["engines"]["naive"]["time_s"] / entry["time_s"],
                    "dense_gflops": timing["dense_flops"] / entry["time_s"] / 1e9,
                    "sparse_flops": timing["sparse_flops"],
                    "dense_flops": timing["dense_flops"],
                    "kept_coordinates": timing["kept_coordinates"],
                    "fused_chunk": timing["fused_chunk"] if engine == "fused" else None,
                }
                skip_memory = args.no_memory or (args.quick and engine == "batched")
                if not skip_memory:
                    memory_job: MemoryJob = {**job, "engine": engine}
                    row.update(run_worker("memory", memory_job))
                    row["extra_over_forward_in_kept"] = (
                        row["step_extra_bytes"] - row["forward_extra_bytes"]
                    ) / row["kept_bytes"]
                if not entry["agrees"]:
                    failures.append(f"{model_name} d={density} {engine}")
                rows.append(row)
                print_row(row, matmul, header=len(rows) == 1)
    info["load_after"] = os.getloadavg()
    info["matmul_gflops_after"] = matmul_gflops(args.threads)
    print(
        f"# after: dense fp32 matmul {info['matmul_gflops_after']['best']:.1f} GFLOP/s (best),"
        f" load {info['load_after']}"
    )
    result = {
        "machine": info,
        "settings": {
            "k": k,
            "batch": BATCH,
            "sigma": SIGMA,
            "scheme": "forward",
            "directions": "gaussian",
            "mask": "random (prune('random', seed=0))",
            "repeats": repeats,
            "fused_memory_budget_mb": DEFAULT_MEMORY_BUDGET_MB,
            "memory_worker_env": {"GLIBC_TUNABLES": MALLOC_TUNABLES},
            "tolerance": {"rtol": RTOL, "atol": ATOL},
        },
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if failures:
        print(f"ERROR: deltas disagree with the naive reference: {failures}", file=sys.stderr)
        return 1
    return 0


def print_row(row: dict[str, Any], matmul: float, header: bool) -> None:
    if header:
        print(
            "| model | density | engine | time (s) | CPU (s) | vs naive | dense GFLOP/s "
            "| % of matmul | peak extra (MB) | 1 fwd (MB) | kept (MB) | (peak-fwd)/kept "
            "| max abs diff |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    mb = 2**20

    def fmt(key: str) -> str:
        return f"{row[key] / mb:.2f}" if key in row else "-"

    print(
        f"| {row['model']} | {row['density']:g} | {row['engine']} | {row['time_s']:.3f} "
        f"| {row['cpu_s']:.3f} "
        f"| {row['speedup_vs_naive']:.1f}x | {row['dense_gflops']:.1f} "
        f"| {100 * row['dense_gflops'] / matmul:.0f}% | {fmt('step_extra_bytes')} "
        f"| {fmt('forward_extra_bytes')} | {fmt('kept_bytes')} "
        f"| {row.get('extra_over_forward_in_kept', float('nan')):.1f} "
        f"| {row['max_abs_diff_vs_naive']:.1e} |",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
