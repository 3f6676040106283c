"""Training memory per stage of progressive block training, measured next to the analytic model.

Each (model, stage) and each model's full-model backprop runs in its own fresh Python process
(``--worker``), with the protocol of :mod:`isolated` (the one ``client_memory.py`` uses): one
real CIFAR-10 batch (``--batch``), one warm-up step, the idle baseline after
:func:`machine.trim_memory` (a client holding the model, its output modules and the batch),
then exactly one training step inside :class:`fedzo_flwr.measure.memory.PeakMemory` (kernel
``VmHWM``). The step is the progressive client's (:func:`fedzo_flwr.progressive.train_stage`):
a fresh SGD optimizer (momentum 0.9, weight decay 5e-4, lr 0.01) over stage ``t``'s tensors,
``zero_grad(set_to_none=True)``, ``forward_stage`` (the frozen prefix under no_grad),
backward, optimizer step. Full-model backprop takes the same step over every parameter of the
ordinary model. A second local step that finds the first step's momentum buffers alive (what
every later step of a round sees) is measured against the same idle baseline.

Reported per stage, next to :func:`fedzo_flwr.progressive.stage_memory` (weights, batch,
gradients, optimizer state, saved tensors, transient; their sum ``total_bytes``):

* ``extra``: the step's peak RSS above the idle client (compare the analytic step: the total
  less the weights and batch the idle client already holds);
* the **model share** = weights + batch + ``extra`` (compare the analytic total); the stage
  needs of the population fractions are these;
* the whole process's peak RSS (Python and torch included);
* ratios to full backprop; the peak over stages and the time-weighted average with **equal
  rounds per stage** (the rounds a pace controller gives each stage are not known in advance).

The population: 100 nodes (``--nodes``) drawn with ``memory-seed`` 0 from the ``profl-uniform``
profile (budget ``U[0.12, 1.07]`` x the full model's need, measured or analytic as the column
says) and from the ``device-tier`` profile (half the RAM of a Pi Zero 2 W / Pi 4 1 GB / Pi 4
4 GB / Jetson Orin Nano 8 GB, equal shares); the fraction that fits each stage and the full
model (margin 0), from the measured needs and from the analytic ones.

Usage::

    python benchmarks/progressive_memory.py [--quick] [--json PATH]
        [--models lenet5 resnet20 resnet18] [--batch 32] [--repeats 1] [--nodes 100]
        [--threads 1] [--data-dir DIR]

``--repeats N`` measures each job in N fresh processes and keeps the run of median ``extra``
(every run's ``extra`` is in ``extra_runs``): with glibc's default allocator the peak RSS of the
same step varies from process to process (heap layout), by up to a third for some stages.

``--quick`` (CI): batch 8, lenet5 (every stage) and resnet20 (stage 0 and full backprop).

The workers inherit the environment: ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc) makes every
allocation of 64 KiB or more its own mapping, returned to the system when freed, so the peak RSS
follows the live tensors instead of glibc's heap (whose dynamic threshold rises after the
warm-up frees); the ``MALLOC_*`` variables in effect are recorded in ``machine.malloc_env``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isolated import cifar_batch, measure_step, run_worker, status_bytes
from machine import data_dir, load_average, machine_info

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from fedzo_flwr.progressive import StageMemory

MB = 2**20
SEED = 3407
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
PROFILES = ("profl-uniform", "device-tier")
Job = dict[str, Any]


# ------------------------------------------------------------------------------ worker


def worker(job: Job) -> dict[str, Any]:
    """One measurement in this (fresh) process: stage ``job["stage"]``, or full backprop."""
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(job["threads"])
    from fedzo_flwr.models import build_model
    from fedzo_flwr.progressive import build_staged, full_backprop_memory, stage_memory

    rss_imports = status_bytes("VmRSS")
    x, y = cifar_batch(job["data_dir"], job["batch"])
    stage: int | None = job["stage"]
    if stage is None:
        model = build_model(job["model"], seed=SEED)
        analytic = full_backprop_memory(model, job["batch"])
        trainable = list(model.parameters())
        for param in trainable:
            param.requires_grad_(True)

        def logits() -> torch.Tensor:
            out: torch.Tensor = model(x)
            return out

    else:
        active: int = stage
        staged = build_staged(job["model"], seed=SEED)
        if staged.num_stages != job["num_stages"]:
            raise RuntimeError(f"{job['model']}: {staged.num_stages} stages, planned for {job}")
        analytic = stage_memory(staged, active, job["batch"])
        trainable = list(staged.prepare_stage(active).values())

        def logits() -> torch.Tensor:
            return staged.forward_stage(x, active)

    optimizers: list[torch.optim.Optimizer] = []

    def local_step(optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = F.cross_entropy(logits(), y)
            torch.autograd.backward(loss)
        optimizer.step()
        del loss

    def step() -> None:
        optimizer = torch.optim.SGD(trainable, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        local_step(optimizer)
        optimizers[:] = [optimizer]

    def second_step() -> None:
        local_step(optimizers[0])

    def reset() -> None:
        optimizers.clear()
        for param in trainable:
            param.grad = None

    measured = measure_step(step, reset, forward=logits, then=second_step)
    return {
        "rss_after_imports": rss_imports,
        **measured,
        "analytic": analytic.as_dict(),
        "trainable_params": sum(p.numel() for p in trainable),
    }


# ------------------------------------------------------------------------ summaries


def model_share(row: dict[str, Any]) -> int:
    """Weights + batch (held by the idle client) + the measured extra of the step."""
    a = row["analytic"]
    share: int = a["weights"] + a["batch"] + row["extra"]
    return share


def analytic_step(row: dict[str, Any]) -> int:
    """The analytic total less the weights and batch: what the step adds to an idle client."""
    a = row["analytic"]
    step: int = a["total_bytes"] - a["weights"] - a["batch"]
    return step


def analytic_total(row: dict[str, Any]) -> int:
    """The analytic total of a row (weights, batch and the step)."""
    total: int = row["analytic"]["total_bytes"]
    return total


def _stage_memory(row: dict[str, Any]) -> StageMemory:
    """A row's analytic items back as the library's :class:`StageMemory`."""
    from fedzo_flwr.progressive import StageMemory

    return StageMemory(**{k: v for k, v in row["analytic"].items() if k != "total_bytes"})


def population(stage_needs: list[int], full_need: int, nodes: int) -> dict[str, Any]:
    """Fraction of ``nodes`` simulated devices per profile that fit each stage / the full model.

    ``profl-uniform`` budgets scale with ``full_need`` (ProFL's ratio of the full model's need);
    ``device-tier`` budgets are absolute (half a tier's RAM). Margin 0, ``memory-seed`` 0.
    """
    from fedzo_flwr.progressive import NodeInfo, device_budget, eligibility_report

    out: dict[str, Any] = {}
    for profile in PROFILES:
        infos = [
            NodeInfo(i, device_budget(profile, i, full_need, seed=0).budget_bytes)
            for i in range(nodes)
        ]
        report = eligibility_report(infos, stage_needs, full_need, margin=0.0)
        every = set.intersection(*(set(ids) for ids in report.per_stage))
        out[profile] = {
            "stages": [len(ids) / nodes for ids in report.per_stage],
            "full_model": len(report.full_model) / nodes,
            "every_stage": len(every) / nodes,
            "no_stage": len(report.never_eligible) / nodes,
        }
    return out


def summarise(rows: list[dict[str, Any]], nodes: int) -> list[dict[str, Any]]:
    """Per model and batch: stages against full backprop, peak, average, population."""
    from fedzo_flwr.progressive import MemoryPlan

    out = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        mine = [r for r in rows if r["model"] == model and r["batch"] == batch]
        full = next(r for r in mine if r["stage"] is None)
        stages = sorted((r for r in mine if r["stage"] is not None), key=lambda r: r["stage"])
        per_stage = [
            {
                "stage": r["stage"],
                "analytic_total": r["analytic"]["total_bytes"],
                "analytic_step": analytic_step(r),
                "measured_extra": r["extra"],
                "measured_share": model_share(r),
                "second_step_extra": r["then_extra"],
                "process_peak": r["step_peak_rss"],
                "analytic_vs_full": r["analytic"]["total_bytes"] / full["analytic"]["total_bytes"],
                "share_vs_full": model_share(r) / model_share(full),
                "extra_vs_full": r["extra"] / full["extra"],
                "share_vs_analytic": model_share(r) / r["analytic"]["total_bytes"],
                "extra_vs_analytic_step": r["extra"] / analytic_step(r),
            }
            for r in stages
        ]
        summary: dict[str, Any] = {
            "model": model,
            "batch": batch,
            "num_stages": full["num_stages"],
            "stages_measured": [r["stage"] for r in stages],
            "full": {
                "analytic_total": full["analytic"]["total_bytes"],
                "analytic_step": analytic_step(full),
                "measured_extra": full["extra"],
                "measured_share": model_share(full),
                "second_step_extra": full["then_extra"],
                "process_peak": full["step_peak_rss"],
                "share_vs_analytic": model_share(full) / full["analytic"]["total_bytes"],
            },
            "per_stage": per_stage,
            "rounds_per_stage": "equal",
        }
        if len(stages) == full["num_stages"]:
            plan = MemoryPlan(
                tuple(_stage_memory(r) for r in stages), _stage_memory(full), (1,) * len(stages)
            )
            shares = [model_share(r) for r in stages]
            summary["analytic_plan"] = plan.as_dict()
            summary["measured_peak"] = max(shares)
            summary["measured_average"] = sum(shares) / len(shares)
            summary["measured_peak_vs_full"] = max(shares) / model_share(full)
            summary["measured_average_vs_full"] = summary["measured_average"] / model_share(full)
        needs = {
            "measured": ([model_share(r) for r in stages], model_share(full)),
            "analytic": ([analytic_total(r) for r in stages], analytic_total(full)),
        }
        summary["population"] = {
            kind: population(stage_needs, full_need, nodes)
            for kind, (stage_needs, full_need) in needs.items()
        }
        out.append(summary)
    return out


# -------------------------------------------------------------------------------- output


def _mb(n: float) -> str:
    return f"{n / MB:.1f}"


def print_tables(summaries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Markdown tables: per stage, per model, and the population fractions."""
    print(
        "| model | batch | stage | analytic total (MiB) | weights | batch | gradients | optimizer "
        "| saved | transient | analytic step | measured extra | 2nd step extra | one forward "
        "| measured share | share / analytic | process peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["analytic"]
        label = "full backprop" if r["stage"] is None else str(r["stage"])
        print(
            f"| {r['model']} | {r['batch']} | {label} | {_mb(a['total_bytes'])} "
            f"| {_mb(a['weights'])} | {_mb(a['batch'])} | {_mb(a['gradients'])} "
            f"| {_mb(a['optimizer_state'])} | {_mb(a['saved'])} | {_mb(a['transient'])} "
            f"| {_mb(analytic_step(r))} | {_mb(r['extra'])} | {_mb(r['then_extra'])} "
            f"| {_mb(r['forward_extra'])} | {_mb(model_share(r))} "
            f"| {model_share(r) / a['total_bytes']:.2f} | {_mb(r['step_peak_rss'])} |"
        )
    print()
    print(
        "| model | batch | stage / full: analytic | measured share | measured extra "
        "| peak / full (analytic, measured) | average / full (analytic, measured) |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in summaries:
        stages = s["per_stage"]
        analytic = ", ".join(f"{p['analytic_vs_full']:.2f}" for p in stages)
        share = ", ".join(f"{p['share_vs_full']:.2f}" for p in stages)
        extra = ", ".join(f"{p['extra_vs_full']:.2f}" for p in stages)
        if "analytic_plan" in s:
            plan = s["analytic_plan"]
            peak = f"{plan['peak_vs_full']:.2f}, {s['measured_peak_vs_full']:.2f}"
            avg = f"{plan['average_vs_full']:.2f}, {s['measured_average_vs_full']:.2f}"
        else:
            peak = avg = "(not every stage measured)"
        print(f"| {s['model']} | {s['batch']} | {analytic} | {share} | {extra} | {peak} | {avg} |")
    print()
    print(
        "| model | batch | profile | needs from | fits stage 0, 1, ... | fits every stage "
        "| fits no stage | fits full model |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s in summaries:
        for kind, profiles in s["population"].items():
            for profile, f in profiles.items():
                stages = ", ".join(f"{x:.0%}" for x in f["stages"])
                print(
                    f"| {s['model']} | {s['batch']} | {profile} | {kind} | {stages} "
                    f"| {f['every_stage']:.0%} | {f['no_stage']:.0%} | {f['full_model']:.0%} |"
                )


# -------------------------------------------------------------------------------- main


def plan(args: argparse.Namespace) -> list[Job]:
    """The jobs: per model, every stage (``--quick``: resnet20 stage 0 only), then full."""
    from fedzo_flwr.progressive import build_staged

    jobs: list[Job] = []
    for model in args.models:
        num_stages = build_staged(model, seed=SEED).num_stages
        stages: list[int | None] = list(range(num_stages))
        if args.quick and model == "resnet20":
            stages = [0]
        for stage in [*stages, None]:
            jobs.append(
                {
                    "model": model,
                    "batch": args.batch,
                    "stage": stage,
                    "num_stages": num_stages,
                    "threads": args.threads,
                    "data_dir": str(data_dir(args.data_dir)),
                }
            )
    return jobs


def _by_extra(result: dict[str, Any]) -> int:
    extra: int = result["extra"]
    return extra


def main() -> int:
    """Measure every job, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--quick", action="store_true", help="CI: batch 8, lenet5 + resnet20 stage 0"
    )
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="fresh processes per job; the row is the run of median extra, every extra is kept",
    )
    parser.add_argument("--nodes", type=int, default=100, help="simulated population size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    quick_models = ["lenet5", "resnet20"]
    args.models = args.models or (quick_models if args.quick else [*quick_models, "resnet18"])
    args.batch = args.batch or (8 if args.quick else 32)
    started = time.perf_counter()
    machine = machine_info(args.threads)
    machine["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    rows = []
    for job in plan(args):
        runs = sorted((run_worker(__file__, job) for _ in range(args.repeats)), key=_by_extra)
        result = runs[len(runs) // 2]
        rows.append(
            {
                **job,
                **result,
                "repeats": args.repeats,
                "extra_runs": [r["extra"] for r in runs],
                "then_extra_runs": [r["then_extra"] for r in runs],
            }
        )
        label = "full backprop" if job["stage"] is None else f"stage {job['stage']}"
        print(
            f"# {job['model']} {label}: extra {result['extra'] / MB:.2f} MiB "
            f"(analytic step {analytic_step(result) / MB:.2f} MiB)",
            flush=True,
        )
    summaries = summarise(rows, args.nodes)
    print_tables(summaries, rows)
    machine["load_after"] = load_average()
    print(
        f"\nmachine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"{args.threads} thread(s); load average before {machine['load_before']}, "
        f"after {machine['load_after']}; malloc environment {machine['malloc_env'] or 'default'}"
    )
    result = {
        "machine": machine,
        "settings": {
            "batch": args.batch,
            "models": args.models,
            "split": "stage",
            "optimizer": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
            "seed": SEED,
            "nodes": args.nodes,
            "memory_seed": 0,
            "memory_margin": 0.0,
            "rounds_per_stage": "equal",
            "threads": args.threads,
            "repeats": args.repeats,
            "quick": args.quick,
        },
        "rows": rows,
        "summaries": summaries,
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
