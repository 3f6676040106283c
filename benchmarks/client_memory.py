"""Client memory of one local step, measured: backprop vs zeroth-order dense vs zeroth-order pruned.

Each (model, method, density, engine) runs in its own fresh Python process (``--worker``), with
``GLIBC_TUNABLES`` set to :data:`MALLOC_TUNABLES` (as ``benchmarks/zo_client.py`` does): every
allocation of 64 KiB or more is its own mapping, returned to the system when freed, so resident
memory follows the live tensors instead of glibc's heap history (without it one forward pass of
ResNet-18 reads 40 to 64 MB from run to run; ``--no-malloc-tunables`` measures that way):

1. import torch and the library, ``torch.set_num_threads(--threads)``; record RSS;
2. build the model (θ0), its mask (a random global mask at the density: which weights are kept
   does not change memory), the optimizer settings, and one real CIFAR-10 batch (``--batch``);
3. one warm-up step (kernels, thread pools, the fused plan are set up once per process), then
   free what the step left (gradients, optimizer), ``gc`` and ``malloc_trim``: the **idle
   baseline** is a client that holds the model, mask and batch and nothing else;
4. exactly one client step inside :class:`fedzo_flwr.measure.memory.PeakMemory` (kernel ``VmHWM``):

   * ``backprop``: a fresh optimizer (``--optimizer``: sgd, momentum or adam, as FedAvg creates
     one per round), zero grads, forward, backward, mask the gradients, optimizer step, re-mask;
   * ``zo``: :func:`fedzo_flwr.zo.estimator.loss_differences` with K directions (``--k``), for
     each engine (``lean``: in place, one direction at a time; ``batched`` and ``fused``:
     several directions per pass);
   * ``stream``: the client holds a :class:`fedzo_flwr.zo.engines.stream.StreamModel` (kept
     values and packed bitmaps; the dense model, its KeptSpace and the bool mask are dropped
     before the baseline) and takes the step with ``--micro-batch`` examples per forward pass
     (each value of the option is one job; 0 = the whole batch).

Reported: the step's **peak RSS above the idle baseline** (``extra``), the same for one plain
no-grad forward pass of the batch (``forward_extra``: activations plus the framework's
convolution workspace, which the analytic activations leave out), next to the analytic
breakdown of :mod:`fedzo_flwr.measure.memory_model` (weights, mask, batch, activations, gradients,
optimizer state, perturbation buffers). The backprop/zeroth-order ratio is given three ways:
extra memory of the step alone; the model's share (weights + mask + batch + extra); and the
whole process (RSS, Python and torch included), against the paper's "9x".

Usage::

    python benchmarks/client_memory.py [--quick] [--json PATH] [--models lenet5 resnet20 resnet18]
        [--engines lean fused stream] [--micro-batch 0 4] [--batch 32 128] [--k 16]
        [--optimizer sgd adam] [--threads 1] [--data-dir DIR]
        [--sweep] [--sweep-k 4 16 64] [--sweep-density 0.02 0.1 0.5 1]

By default every model is measured at batch 32 and 128 (``--large-batch-models`` limits the
later batches to some models; the ``batched`` engine is skipped there, its vmap copies need many
GB). ``--quick`` (CI): lenet5, batch 32, SGD, the lean and stream engines only. The lean and
stream engines' memory does not depend on K; the batched/fused engines' depends on their chunk
(<= K), hence K = 16 by default. ``--sweep`` adds stream jobs on the first model at the first
batch over ``--sweep-k`` (at ``--density``) and ``--sweep-density`` (at ``--k``): the step's
extra memory must stay flat (the largest layer's buffers and one micro-batch's activations).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine import data_dir, load_average, machine_info, trim_memory

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 2**20
PAPER_RATIO = 9.0
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072"


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------ worker


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(job["threads"])
    from torch.nn import functional as F

    from fedzo_flwr.config import RunConfig
    from fedzo_flwr.data import clear_cache, load_dataset, to_tensor
    from fedzo_flwr.fedavg.client import mask_gradients_
    from fedzo_flwr.measure.memory import PeakMemory
    from fedzo_flwr.measure.memory_model import (
        backprop_breakdown,
        stream_breakdown,
        zo_breakdown,
    )
    from fedzo_flwr.models import build_model
    from fedzo_flwr.pruning import prune
    from fedzo_flwr.sparse.mask import apply_mask_, dense_mask
    from fedzo_flwr.sparse.space import KeptSpace
    from fedzo_flwr.zo.directions import DirectionGenerator
    from fedzo_flwr.zo.engines.stream import StreamModel
    from fedzo_flwr.zo.estimator import loss_differences
    from fedzo_flwr.zo.settings import ZOSettings

    rss_imports = _status_bytes("VmRSS")
    data = load_dataset("cifar10", job["data_dir"])
    x = to_tensor(data.x_train[: job["batch"]], "cifar10")
    y = torch.tensor(data.y_train[: job["batch"]], dtype=torch.long)
    del data
    clear_cache()  # a client holds its batch, not the whole dataset
    model = build_model(job["model"], seed=3407)
    job_param_count = sum(p.numel() for p in model.parameters())
    density = job["density"]
    mask = prune("random", model, job["model"], density, seed=0) if density < 1 else None
    full_mask = mask if mask is not None else dense_mask(model)
    if mask is not None:
        apply_mask_(model, mask)
    cfg = RunConfig(client_optimizer=job.get("optimizer", "sgd"), local_lr=0.01)

    if job["method"] == "backprop":
        from fedzo_flwr.fedavg.client import client_optimizer

        analytic = backprop_breakdown(model, mask, x, cfg.client_optimizer)

        def step() -> None:
            optimizer = client_optimizer(cfg, model)
            optimizer.zero_grad(set_to_none=False)
            with torch.enable_grad():
                loss = F.cross_entropy(model(x), y)
                torch.autograd.backward(loss)
            mask_gradients_(model, full_mask)
            optimizer.step()
            apply_mask_(model, full_mask)
            del optimizer, loss

        def reset() -> None:
            for p in model.parameters():
                p.grad = None

    elif job["engine"] == "stream":
        settings = ZOSettings(k=job["k"], sigma=1e-3)
        micro = job["micro_batch"]
        analytic = stream_breakdown(model, mask, x, micro)
        sparse = StreamModel(model, KeptSpace(model, mask))
        model = sparse  # the dense model, its KeptSpace and the bool masks are gone
        del mask, full_mask

        def step() -> None:
            generator = DirectionGenerator(sparse.sizes, 3407, settings.directions)
            sparse.loss_differences(x, y, generator, settings, micro_batch=micro)

        def reset() -> None:
            pass

    else:
        space = KeptSpace(model, mask)
        settings = ZOSettings(k=job["k"], sigma=1e-3)
        analytic = zo_breakdown(model, mask, x)

        def step() -> None:
            loss_differences(model, space, x, y, 3407, settings, engine=job["engine"])

        def reset() -> None:
            pass

    step()  # warm-up: lazy initialisation (kernels, thread pools, the fused plan)
    reset()
    gc.collect()
    trim_memory()
    with torch.no_grad(), PeakMemory() as forward:  # one plain forward pass, for reference
        model(x)
    trim_memory()
    rss_idle = _status_bytes("VmRSS")
    started = time.perf_counter()
    with PeakMemory() as memory:
        step()
    seconds = time.perf_counter() - started
    reset()
    return {
        "rss_after_imports": rss_imports,
        "rss_idle": rss_idle,
        "step_peak_rss": memory.peak_bytes,
        "extra": memory.extra_bytes,
        "forward_extra": forward.extra_bytes,
        "method_of_measurement": memory.method,
        "step_seconds": seconds,
        "analytic": analytic.as_dict(),
        "param_count": job_param_count,
    }


def run_worker(job: dict[str, Any], tunables: bool = True) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if tunables:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {job}:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -------------------------------------------------------------------------------- main


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The jobs: per model, backprop dense and masked, then ZO dense and pruned per engine."""
    jobs: list[dict[str, Any]] = []
    batches = [args.batch[0]] if args.quick else args.batch
    for model in args.models:
        for i, batch in enumerate(batches):
            if i and args.large_batch_models and model not in args.large_batch_models:
                continue
            engines = ["lean", "stream"] if args.quick else args.engines
            if i:  # larger batches: vmap's memory grows to many GB, the others suffice
                engines = [e for e in engines if e != "batched"]
            base = {
                "model": model,
                "batch": batch,
                "k": args.k,
                "threads": args.threads,
                "data_dir": str(data_dir(args.data_dir)),
            }
            for optimizer in ["sgd"] if args.quick else args.optimizer:
                for density in (1.0, args.density):
                    jobs.append(
                        {**base, "method": "backprop", "optimizer": optimizer, "density": density}
                    )
            for engine in engines:
                micros = args.micro_batch if engine == "stream" else [0]
                for density in (1.0, args.density):
                    for micro in micros:
                        jobs.append(
                            {
                                **base,
                                "method": "zo",
                                "engine": engine,
                                "density": density,
                                "micro_batch": micro,
                            }
                        )
    if args.sweep:
        base = {
            "model": args.models[0],
            "batch": batches[0],
            "threads": args.threads,
            "data_dir": str(data_dir(args.data_dir)),
            "method": "zo",
            "engine": "stream",
            "micro_batch": args.micro_batch[-1],
            "sweep": True,
        }
        for k in args.sweep_k:
            jobs.append({**base, "k": k, "density": args.density})
        for density in args.sweep_density:
            jobs.append({**base, "k": args.k, "density": density})
    return jobs


def label(job: dict[str, Any]) -> str:
    """A row's name in the tables."""
    if job["method"] == "backprop":
        kind = "backprop" + (f" masked d={job['density']:g}" if job["density"] < 1 else " dense")
        return f"{kind} ({job['optimizer']})"
    kind = f"ZO pruned d={job['density']:g}" if job["density"] < 1 else "ZO dense"
    engine = job["engine"]
    if engine == "stream" and job.get("micro_batch"):
        engine += f", micro-batch {job['micro_batch']}"
    if job.get("sweep"):
        engine += f", K={job['k']}"
    return f"{kind} ({engine})"


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Backprop dense (each optimizer) / each ZO row, per model: extra, model share, process."""
    out = []
    rows = [r for r in rows if not r.get("sweep")]
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        mine = [r for r in rows if r["model"] == model and r["batch"] == batch]
        dense_bp = [r for r in mine if r["method"] == "backprop" and r["density"] == 1]
        for bp in dense_bp:
            for r in (r for r in mine if r["method"] == "zo"):
                share = r["analytic"]["weights"] + r["analytic"]["mask"] + r["analytic"]["batch"]
                bp_share = bp["analytic"]["weights"] + bp["analytic"]["batch"]
                out.append(
                    {
                        "model": model,
                        "batch": batch,
                        "backprop": label(bp),
                        "zo": label(r),
                        "extra_ratio": bp["extra"] / max(r["extra"], 1),
                        "model_share_ratio": (bp_share + bp["extra"]) / (share + r["extra"]),
                        "process_ratio": bp["step_peak_rss"] / r["step_peak_rss"],
                        "analytic_step_ratio": bp["analytic"]["step_bytes"]
                        / r["analytic"]["step_bytes"],
                        "analytic_total_ratio": bp["analytic"]["total_bytes"]
                        / r["analytic"]["total_bytes"],
                        "seconds_ratio": r["step_seconds"] / max(bp["step_seconds"], 1e-9),
                    }
                )
    return out


def speeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step time of each stream row against lean and fused at the same model, batch, density."""
    out = []
    for r in rows:
        if r.get("sweep") or r.get("engine") != "stream":
            continue
        same = {
            q["engine"]: q["step_seconds"]
            for q in rows
            if q.get("engine") in ("lean", "fused")
            and not q.get("sweep")
            and (q["model"], q["batch"], q["density"]) == (r["model"], r["batch"], r["density"])
        }
        out.append(
            {
                "model": r["model"],
                "batch": r["batch"],
                "zo": label(r),
                "stream_seconds": r["step_seconds"],
                **{f"{e}_seconds": s for e, s in same.items()},
                **{f"vs_{e}": r["step_seconds"] / s for e, s in same.items()},
            }
        )
    return out


def print_tables(
    rows: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], speed_rows: list[dict[str, Any]]
) -> None:
    """The three markdown tables: rows, ratios against backprop, stream speed."""
    print(
        "| model | batch | method | measured extra (MB) | one forward (MB) | analytic step (MB) "
        "| activations | gradients | optimizer | perturbation | weights | mask | idle RSS (MB) "
        "| step time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["analytic"]
        print(
            f"| {r['model']} | {r['batch']} | {label(r)} | {r['extra'] / MB:.2f} "
            f"| {r['forward_extra'] / MB:.2f} | {a['step_bytes'] / MB:.2f} "
            f"| {a['activations'] / MB:.2f} | {a['gradients'] / MB:.2f} "
            f"| {a['optimizer_state'] / MB:.2f} | {a['perturbation'] / MB:.2f} "
            f"| {a['weights'] / MB:.2f} | {a['mask'] / MB:.2f} | {r['rss_idle'] / MB:.0f} "
            f"| {r['step_seconds']:.2f} |"
        )
    print()
    print(
        "| model | batch | backprop | zeroth-order | extra (measured) | model share (measured) "
        "| whole process | analytic step | analytic total | paper |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for q in ratio_rows:
        print(
            f"| {q['model']} | {q['batch']} | {q['backprop']} | {q['zo']} "
            f"| {q['extra_ratio']:.1f}x "
            f"| {q['model_share_ratio']:.1f}x "
            f"| {q['process_ratio']:.2f}x | {q['analytic_step_ratio']:.1f}x "
            f"| {q['analytic_total_ratio']:.1f}x | {PAPER_RATIO:g}x |"
        )
    if speed_rows:
        print()
        print("| model | batch | stream | step (s) | vs lean | vs fused |")
        print("|---|---|---|---|---|---|")
        for v in speed_rows:
            lean = f"{v['vs_lean']:.2f}x" if "vs_lean" in v else "-"
            fused = f"{v['vs_fused']:.2f}x" if "vs_fused" in v else "-"
            print(
                f"| {v['model']} | {v['batch']} | {v['zo']} | {v['stream_seconds']:.2f} "
                f"| {lean} | {fused} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="CI: lenet5, lean and stream only")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["lean", "fused", "stream"],
        choices=["lean", "batched", "fused", "stream"],
    )
    parser.add_argument(
        "--micro-batch",
        type=int,
        nargs="+",
        default=[0, 4],
        help="stream engine: examples per forward pass (0 = whole batch); one job per value",
    )
    parser.add_argument("--sweep", action="store_true", help="stream jobs over K and density")
    parser.add_argument("--sweep-k", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--sweep-density", type=float, nargs="+", default=[0.02, 0.1, 0.5, 1.0])
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[32, 128], help="batch sizes (first: all models)"
    )
    parser.add_argument(
        "--large-batch-models",
        nargs="+",
        default=[],
        help="models also measured at the later --batch sizes (default: every model)",
    )
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument(
        "--optimizer", nargs="+", default=["sgd", "adam"], choices=["sgd", "momentum", "adam"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-malloc-tunables",
        action="store_true",
        help="run the workers with glibc's default allocator settings",
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.models = args.models or (["lenet5"] if args.quick else ["lenet5", "resnet20", "resnet18"])

    from fedzo_flwr.zo.engines.fused import DEFAULT_MEMORY_BUDGET_MB

    started = time.perf_counter()
    machine = machine_info(args.threads)
    rows = []
    jobs = plan(args)
    for job in jobs:
        result = run_worker(job, tunables=not args.no_malloc_tunables)
        rows.append({**job, **result})
        print(
            f"# {job['model']} {label(job)}: extra {result['extra'] / MB:.2f} MB "
            f"(analytic {result['analytic']['step_bytes'] / MB:.2f} MB)",
            flush=True,
        )
    ratio_rows = ratios(rows)
    speed_rows = speeds(rows)
    print_tables(rows, ratio_rows, speed_rows)
    machine["load_after"] = load_average()
    result = {
        "machine": machine,
        "settings": {
            "batch": sorted({job["batch"] for job in jobs}),
            "k": args.k,
            "density": args.density,
            "mask": "random global mask (prune('random', seed=0)); memory does not depend on which",
            "optimizer": args.optimizer,
            "threads": args.threads,
            "quick": args.quick,
            "malloc_tunables": "" if args.no_malloc_tunables else MALLOC_TUNABLES,
            "engine_memory_mb": DEFAULT_MEMORY_BUDGET_MB,  # fused: chunk budget
            "micro_batch": args.micro_batch,
            "sweep_k": args.sweep_k if args.sweep else [],
            "sweep_density": args.sweep_density if args.sweep else [],
        },
        "rows": rows,
        "ratios": ratio_rows,
        "speed": speed_rows,
        "paper_ratio": PAPER_RATIO,
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
