"""Client memory of one zo-progressive step per stage, measured in fresh processes, vs zo-pruned.

Each (variant, engine) runs in its own fresh Python process (``--worker``) with the protocol of
:mod:`isolated` (the one ``client_memory.py`` and ``progressive_memory.py`` use): one real
CIFAR-10 batch (``--batch``), the staged model with its staged mask (model: data-free NTK-SAP at
density 0.1, ``--ntk-iterations`` iterations, 1 repeat, seed 0; output modules: their own
NTK-SAP), one warm-up step, the idle baseline after :func:`machine.trim_memory` (a client
holding the model, its output modules, the mask and the batch), then exactly one client step
inside :class:`fedzo_flwr.measure.memory.PeakMemory` (kernel ``VmHWM``):

* ``stage-t``: :func:`fedzo_flwr.progressive.zo.stage_loss_differences` (the frozen prefix once,
  then K + 1 passes through block ``t`` and its output module);
* ``zo-pruned``: :func:`fedzo_flwr.zo.estimator.loss_differences` on the whole masked model.

Reported: ``extra`` (the step's peak RSS above the idle client) next to the analytic step
(:func:`fedzo_flwr.progressive.memory.forward_stage_memory` ``step_bytes``, and
:func:`fedzo_flwr.measure.memory_model.zo_breakdown` for zo-pruned: both the ``lean`` engine's
floor; ``fused`` batches directions within ``engine-memory-mb``).

Usage::

    python benchmarks/zo_progressive_memory.py --json docs/results/zo_progressive_memory.json
        [--k 200] [--batch 32] [--engines fused lean] [--quick]

``--quick`` (CI): K = 10, the lean engine, NTK-SAP with 1 iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from isolated import cifar_batch, measure_step, run_worker
from machine import ROOT, data_dir, load_average, machine_info

DENSITY = 0.1
MIB = 2**20


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(job["threads"])
    from fedzo_flwr.measure.memory_model import zo_breakdown
    from fedzo_flwr.progressive import build_staged
    from fedzo_flwr.progressive.memory import forward_stage_memory
    from fedzo_flwr.progressive.zo import (
        ActiveStage,
        apply_staged_mask_,
        stage_loss_differences,
        staged_mask,
    )
    from fedzo_flwr.pruning import NTKSAPConfig, ntk_sap_mask
    from fedzo_flwr.sparse.space import KeptSpace
    from fedzo_flwr.zo.estimator import loss_differences
    from fedzo_flwr.zo.settings import ZOSettings

    x, y = cifar_batch(job["data_dir"], job["batch"])
    staged = build_staged(job["model"], seed=0)
    ntk = NTKSAPConfig(iterations=job["ntk_iterations"], repeats=1)
    model_mask = ntk_sap_mask(staged.model, job["model"], DENSITY, ntk, seed=0)
    mask = staged_mask(staged, model_mask, job["model"], DENSITY, ntk, seed=0)
    apply_staged_mask_(staged, mask)
    settings = ZOSettings(k=job["k"], sigma=1e-3)
    stage: int | None = job["stage"]
    if stage is None:
        for param in staged.model.parameters():
            param.requires_grad_(True)
        space = KeptSpace(staged.model, model_mask)
        analytic = zo_breakdown(staged.model, model_mask, x).as_dict()

        def step() -> None:
            loss_differences(staged.model, space, x, y, 1, settings, job["engine"])

        dim = space.dim
    else:
        analytic = forward_stage_memory(staged, stage, job["batch"], mask).as_dict()
        active = ActiveStage(staged, stage, mask)

        def step() -> None:
            stage_loss_differences(active, x, y, 1, settings, job["engine"])

        dim = active.space.dim
    measured = measure_step(step, lambda: None)
    return {"dim": dim, **measured, "analytic": analytic}


def main(argv: list[str] | None = None) -> int:
    """Measure every job, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ntk-iterations", type=int, default=5)
    parser.add_argument("--engines", nargs="+", default=["fused", "lean"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="CI: K = 10, lean, NTK 1 iteration")
    args = parser.parse_args(argv)
    if args.quick:
        args.k, args.engines, args.ntk_iterations = 10, ["lean"], 1
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.json is None:
        parser.error("--json is required")
    sys.path.insert(0, str(ROOT))  # this checkout's library, whatever is installed
    from fedzo_flwr.progressive import build_staged

    folder = data_dir(args.data_dir).resolve()
    machine = machine_info(args.threads)
    stages = build_staged(args.model).num_stages
    rows = []
    for engine in args.engines:
        for stage in [None, *range(stages)]:
            job = {
                "model": args.model,
                "stage": stage,
                "engine": engine,
                "k": args.k,
                "batch": args.batch,
                "ntk_iterations": args.ntk_iterations,
                "threads": args.threads,
                "data_dir": str(folder),
            }
            result = run_worker(__file__, job)
            row = {
                "variant": "zo-pruned" if stage is None else f"stage-{stage}",
                **{k: v for k, v in job.items() if k != "data_dir"},
                **result,
            }
            rows.append(row)
            print(
                f"| {row['variant']} | {engine} | {row['dim']:,} | {row['extra'] / MIB:.2f} | "
                f"{row['analytic']['step_bytes'] / MIB:.2f} |"
            )
    machine["load_after"] = load_average()
    machine["nice"] = os.nice(0)
    report = {
        "benchmark": "zo_progressive_memory",
        "settings": {
            "model": args.model,
            "k": args.k,
            "batch": args.batch,
            "density": DENSITY,
            "ntk_iterations": args.ntk_iterations,
            "data-dir": os.path.relpath(folder, ROOT),
        },
        "command": (
            "nice -n 10 python benchmarks/zo_progressive_memory.py "
            f"--k {args.k} --batch {args.batch} --engines {' '.join(args.engines)} --json "
            f"{os.path.relpath(args.json.resolve(), ROOT)}"
        ),
        "machine": machine,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
