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

**The whole ClientApp process** (``--clientapp``; ``--clientapp-only`` skips the step jobs): per
model and engine (``lean``, ``fused``, ``stream`` with each ``--clientapp-micro-batch``) at
``--density`` and the first ``--batch``, and the backprop baseline (``method = fedavg``, dense,
one local SGD step), a fresh process imports the real ClientApp (``client_app.client_app``) and
handles one first-contact train message as a SuperNode's ClientApp process does (the kept
weights, the round seed, the mask bitmap and its id, the fingerprint seed: what the ServerApp
sends; partition 0 of 10 from the partition cache, filled by an unmeasured warm-up process).
The ``stream`` engine's node builds a ``StreamModel`` straight from the message (no dense model,
no bool mask); the others the dense masked model and its KeptSpace. Reported: the process's
peak RSS over its whole life (``process_peak``: kernel ``VmHWM``, read before every reset the
client's own step measurement makes and at the end), RSS after the imports, the step's peak
(the reply's ``peak-mem-bytes``) and what the node holds between rounds (``held``: weights,
mask, index tables), next to the ratios against the backprop ClientApp and the dense engines.

Usage::

    python benchmarks/client_memory.py [--quick] [--json PATH] [--models lenet5 resnet20 resnet18]
        [--engines lean fused stream] [--micro-batch 0 4] [--batch 32 128] [--k 16]
        [--optimizer sgd adam] [--threads 1] [--data-dir DIR]
        [--sweep] [--sweep-k 4 16 64] [--sweep-density 0.02 0.1 0.5 1]
        [--clientapp | --clientapp-only] [--clientapp-micro-batch 0 4 1] [--merge]

``--merge``: keep the sections of an existing ``--json`` file this run does not measure (e.g.
``--clientapp-only --merge`` adds the ClientApp rows to the step rows measured before); the
command is appended to the file's ``commands``. Data folders are recorded relative to the
repository.

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
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from isolated import (
    cifar_batch,
    first_contact_message,
    measure_step,
    run_worker,
    status_bytes,
)
from machine import data_dir, load_average, machine_info

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 2**20
PAPER_RATIO = 9.0
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=131072"
CLIENTAPP_PARTITIONS = 10
"""The ClientApp jobs' node: partition 0 of this many (Dirichlet 0.5, the default run config)."""


# ------------------------------------------------------------------------------ workers


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    if job.get("kind") == "clientapp":
        return clientapp_worker(job)
    import torch

    torch.set_num_threads(job["threads"])
    from torch.nn import functional as F

    from fedzo_flwr.config import RunConfig
    from fedzo_flwr.fedavg.client import mask_gradients_
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
    from fedzo_flwr.zo.engines import StreamModel
    from fedzo_flwr.zo.estimator import loss_differences
    from fedzo_flwr.zo.settings import ZOSettings

    rss_imports = status_bytes("VmRSS")
    x, y = cifar_batch(str(ROOT / job["data_dir"]), job["batch"])
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

    measured = measure_step(step, reset, forward=lambda: model(x))
    return {
        "rss_after_imports": rss_imports,
        **measured,
        "analytic": analytic.as_dict(),
        "param_count": job_param_count,
    }


def held_bytes(model: Any, space: Any) -> dict[str, int]:
    """What a ClientApp node holds between rounds: weights, mask and index tables (bytes)."""
    from fedzo_flwr.zo.engines import StreamModel

    if isinstance(model, StreamModel):
        rest = model.at_rest_bytes()
        return {"weights": rest["values"] + rest["other"], "mask": rest["bitmaps"], "index": 0}
    return {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "mask": sum(m.numel() * m.element_size() for m in space.mask.values()),
        "index": sum(i.numel() * i.element_size() for i in space.indices if i is not None),
    }


def clientapp_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Import the ClientApp and handle one first-contact train message; the process's memory."""
    started = time.perf_counter()
    import torch

    torch.set_num_threads(job["threads"])
    from fedzo_flwr.measure import memory as measured

    # The client's own step measurement resets VmHWM: read the peak so far before each reset.
    peaks: list[int] = []
    reset_hwm = measured._reset_hwm

    def remember_then_reset() -> bool:
        peaks.append(status_bytes("VmHWM"))
        return reset_hwm()

    measured._reset_hwm = remember_then_reset
    from client_app import client_app as client

    rss_imports = status_bytes("VmRSS")
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity  # private: no runtime here

    from fedzo_flwr import protocol
    from fedzo_flwr.protocol.wire import decode_scalars

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    with np.load(job["message"]) as saved:
        content = RecordDict(
            {
                protocol.ARRAYS_KEY: ArrayRecord({protocol.KEPT_KEY: Array(saved["kept"])}),
                protocol.CONFIG_KEY: ConfigRecord(
                    {
                        protocol.ROUND_KEY: 1,
                        protocol.ROUND_SEED_KEY: int(job["round_seed"]),
                        protocol.MASK_ID_KEY: protocol.mask_id(saved["mask"].tobytes()),
                        protocol.MASK_KEY: saved["mask"].tobytes(),
                        protocol.FINGERPRINT_SEED_KEY: int(job["fingerprint_seed"]),
                    }
                ),
            }
        )
    message = Message(content, dst_node_id=1000, message_type=MessageType.TRAIN)
    context = Context(
        run_id=1,
        node_id=1000,
        node_config={"partition-id": 0, "num-partitions": CLIENTAPP_PARTITIONS},
        state=RecordDict(),
        run_config=job["run_config"],
    )
    rss_before = status_bytes("VmRSS")
    round_start = time.perf_counter()
    reply = client.app(message, context)
    round_seconds = time.perf_counter() - round_start
    process_peak = max([*peaks, status_bytes("VmHWM")])
    if reply.has_error():
        raise RuntimeError(f"the ClientApp replied with an error: {reply.error.reason}")
    metrics = {
        k: float(v)  # type: ignore[arg-type]  # scalars only in a train reply's metrics
        for k, v in reply.content.metric_records[protocol.METRICS_KEY].items()
    }
    if job["method"] == "fedavg":
        if protocol.ARRAYS_KEY not in reply.content.array_records:
            raise RuntimeError("the fedavg reply carries no weights")
    else:
        zo = reply.content.config_records[protocol.ZO_KEY]
        deltas = decode_scalars(zo[protocol.DELTAS_KEY])  # type: ignore[arg-type]
        if deltas.shape != (job["k"],) or not np.all(np.isfinite(deltas)):
            raise RuntimeError(f"expected {job['k']} finite loss differences, got {deltas}")
    ((model, space),) = client._MODELS.values()
    return {
        "rss_after_imports": rss_imports,
        "rss_before_round": rss_before,
        "hwm_before_step": peaks[0] if peaks else 0,
        "step_peak_rss": int(metrics["peak-mem-bytes"]),
        "step_extra": int(metrics["extra-mem-bytes"]),
        "process_peak": process_peak,
        "rss_after_round": status_bytes("VmRSS"),
        "held": held_bytes(model, space),
        "held_class": type(model).__name__,
        "partition_examples": int(metrics["num-examples"]),
        "round_seconds": round_seconds,
        "process_seconds": time.perf_counter() - started,
    }


# -------------------------------------------------------------------------------- plans


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
                "data_dir": args.data_rel,
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
            "data_dir": args.data_rel,
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


def clientapp_config(job: dict[str, Any]) -> dict[str, Any]:
    """The run config a ClientApp job's node sees: the defaults with the job's settings."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as handle:
        config: dict[str, Any] = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    config.update(
        {
            "data-dir": job["data_dir"],
            "model": job["model"],
            "k": job["k"],
            "batch-size": job["batch"],
            "client-threads": job["threads"],
            "density": job["density"],
        }
    )
    if job["method"] == "fedavg":  # one local backprop step, plain SGD
        config.update(
            {"method": "fedavg", "local-batches": 1, "client-optimizer": job["optimizer"]}
        )
    else:
        config.update({"engine": job["engine"], "micro-batch": job["micro_batch"]})
    return config


def clientapp_plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ClientApp jobs: per model, backprop (fedavg, dense) then each ZO engine at density."""
    models = ["lenet5"] if args.quick else args.models
    engines = ["lean", "stream"] if args.quick else [e for e in args.engines if e != "batched"]
    jobs = []
    for model in models:
        base = {
            "kind": "clientapp",
            "model": model,
            "batch": args.batch[0],
            "k": args.k,
            "threads": args.threads,
            "data_dir": args.data_rel,
        }
        jobs.append({**base, "method": "fedavg", "optimizer": "sgd", "density": 1.0})
        for engine in engines:
            micros = args.clientapp_micro_batch if engine == "stream" else [0]
            for micro in micros:
                jobs.append(
                    {
                        **base,
                        "method": "zo",
                        "engine": engine,
                        "density": args.density,
                        "micro_batch": micro,
                    }
                )
    for job in jobs:
        job["run_config"] = clientapp_config(job)
    return jobs


def label(job: dict[str, Any]) -> str:
    """A row's name in the tables."""
    if job["method"] in ("backprop", "fedavg"):
        kind = "backprop" + (f" masked d={job['density']:g}" if job["density"] < 1 else " dense")
        return f"{kind} ({job['optimizer']})"
    kind = f"ZO pruned d={job['density']:g}" if job["density"] < 1 else "ZO dense"
    engine = job["engine"]
    if engine == "stream" and job.get("micro_batch"):
        engine += f", micro-batch {job['micro_batch']}"
    if job.get("sweep"):
        engine += f", K={job['k']}"
    return f"{kind} ({engine})"


# ----------------------------------------------------------------------------- summaries


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


def clientapp_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and ZO row: the backprop ClientApp's and the dense engines' peaks over its own.

    ``process``: whole-process peaks; ``above_imports``: the peaks above the RSS after the
    imports (what the round itself adds: message, partition, model, step).
    """
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        bp = next((r for r in mine if r["method"] == "fedavg"), None)
        dense = {r["engine"]: r for r in mine if r.get("engine") in ("lean", "fused")}

        def above(r: dict[str, Any]) -> int:
            return int(r["process_peak"] - r["rss_after_imports"])

        for r in (r for r in mine if r["method"] == "zo"):
            entry: dict[str, Any] = {"model": model, "batch": r["batch"], "zo": label(r)}
            for name, ref in (("backprop", bp), *dense.items()):
                if ref is None:
                    continue
                entry[f"process_vs_{name}"] = ref["process_peak"] / r["process_peak"]
                entry[f"above_imports_vs_{name}"] = above(ref) / max(above(r), 1)
            out.append(entry)
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


def print_clientapp(rows: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]) -> None:
    """The ClientApp process table: peaks, what is held, ratios."""
    by_label = {(q["model"], q["zo"]): q for q in ratio_rows}
    print(
        "\n| model | client | process peak (MB) | above imports (MB) | step peak (MB) "
        "| held: weights + mask + index (MB) | backprop / this | fused / this | round (s) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        q = by_label.get((r["model"], label(r)), {})
        held = r["held"]
        vs_bp = f"{q['process_vs_backprop']:.2f}x" if "process_vs_backprop" in q else "-"
        vs_fused = f"{q['process_vs_fused']:.2f}x" if "process_vs_fused" in q else "-"
        print(
            f"| {r['model']} | {label(r)} | {r['process_peak'] / MB:.1f} "
            f"| {(r['process_peak'] - r['rss_after_imports']) / MB:.1f} "
            f"| {r['step_peak_rss'] / MB:.1f} "
            f"| {held['weights'] / MB:.2f} + {held['mask'] / MB:.2f} + {held['index'] / MB:.2f} "
            f"| {vs_bp} | {vs_fused} | {r['round_seconds']:.1f} |"
        )


# ---------------------------------------------------------------------------------- main


def measure_clientapp(args: argparse.Namespace, env: dict[str, str]) -> list[dict[str, Any]]:
    """Every ClientApp job in its own process, after a warm-up that fills the partition cache."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedzo-clientapp-memory-") as tmp:
        work = Path(tmp)
        job_env = {
            **env,
            "FEDZO_CACHE_DIR": str(work / "cache"),
            "MPLCONFIGDIR": str(work / "mpl"),
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        jobs = clientapp_plan(args)
        messages: dict[str, dict[str, Any]] = {}
        for job in jobs:
            key = f"{job['model']}-{job['density']:g}"
            if key not in messages:
                path = work / f"message-{key}.npz"
                messages[key] = {
                    "message": str(path),
                    **first_contact_message(path, job["model"], job["density"], 3407),
                }
            job.update(messages[key])
        # Cut the partition once (flwr-datasets, the whole dataset): the cache every job reads.
        run_worker(__file__, next((j for j in jobs if j["model"] == "lenet5"), jobs[0]), job_env)
        for job in jobs:
            result = run_worker(__file__, job, job_env)
            saved = {k: v for k, v in job.items() if k not in ("message", "run_config")}
            rows.append({**saved, **result})
            print(
                f"# ClientApp {job['model']} {label(job)}: process peak "
                f"{result['process_peak'] / MB:.1f} MB, step peak "
                f"{result['step_peak_rss'] / MB:.1f} MB",
                flush=True,
            )
    return rows


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
    parser.add_argument("--clientapp", action="store_true", help="also the ClientApp processes")
    parser.add_argument(
        "--clientapp-only", action="store_true", help="the ClientApp processes, no step jobs"
    )
    parser.add_argument(
        "--clientapp-micro-batch",
        type=int,
        nargs="+",
        default=[0, 4, 1],
        help="ClientApp jobs of the stream engine: micro-batch values (one job each)",
    )
    parser.add_argument(
        "--merge", action="store_true", help="keep the unmeasured sections of an existing --json"
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.models = args.models or (["lenet5"] if args.quick else ["lenet5", "resnet20", "resnet18"])
    args.data_rel = os.path.relpath(data_dir(args.data_dir).resolve(), ROOT)
    clientapp = args.clientapp or args.clientapp_only or args.quick
    from fedzo_flwr.zo.engines.fused import DEFAULT_MEMORY_BUDGET_MB

    started = time.perf_counter()
    machine = machine_info(args.threads)
    env = {} if args.no_malloc_tunables else {"GLIBC_TUNABLES": MALLOC_TUNABLES}
    command = "python benchmarks/client_memory.py " + " ".join(sys.argv[1:])
    result: dict[str, Any] = {}
    if args.merge and args.json and args.json.is_file():
        result = json.loads(args.json.read_text())
    if not args.clientapp_only:
        rows = []
        jobs = plan(args)
        for job in jobs:
            measured = run_worker(__file__, job, env)
            rows.append({**job, **measured})
            print(
                f"# {job['model']} {label(job)}: extra {measured['extra'] / MB:.2f} MB "
                f"(analytic {measured['analytic']['step_bytes'] / MB:.2f} MB)",
                flush=True,
            )
        ratio_rows = ratios(rows)
        speed_rows = speeds(rows)
        print_tables(rows, ratio_rows, speed_rows)
        result.update(
            machine=machine,
            settings={
                "batch": sorted({job["batch"] for job in jobs}),
                "k": args.k,
                "density": args.density,
                "mask": "random global mask (prune('random', seed=0)); "
                "memory does not depend on which",
                "optimizer": args.optimizer,
                "threads": args.threads,
                "quick": args.quick,
                "malloc_tunables": "" if args.no_malloc_tunables else MALLOC_TUNABLES,
                "engine_memory_mb": DEFAULT_MEMORY_BUDGET_MB,  # fused: chunk budget
                "micro_batch": args.micro_batch,
                "sweep_k": args.sweep_k if args.sweep else [],
                "sweep_density": args.sweep_density if args.sweep else [],
            },
            rows=rows,
            ratios=ratio_rows,
            speed=speed_rows,
            paper_ratio=PAPER_RATIO,
        )
    if clientapp:
        app_machine = machine_info(args.threads)
        app_rows = measure_clientapp(args, env)
        app_machine["load_after"] = load_average()
        app_ratios = clientapp_ratios(app_rows)
        print_clientapp(app_rows, app_ratios)
        result.update(
            clientapp=app_rows,
            clientapp_ratios=app_ratios,
            clientapp_settings={
                "batch": args.batch[0],
                "k": args.k,
                "density": args.density,
                "threads": args.threads,
                "message": "first contact: kept weights, round seed, mask bitmap and id, "
                "fingerprint seed (as the ServerApp sends them)",
                "partition": f"0 of {CLIENTAPP_PARTITIONS}, the default run config's "
                "partitioner, from the partition cache",
                "backprop": "method fedavg, dense, one local SGD step (local-batches 1)",
                "mask": "random global mask at the density (prune('random') of the run's θ0)",
                "malloc_tunables": "" if args.no_malloc_tunables else MALLOC_TUNABLES,
                "process_peak": "kernel VmHWM over the process's life (read before each reset "
                "the client's own step measurement makes, and at the end)",
            },
            machine_clientapp=app_machine,
        )
    machine["load_after"] = load_average()
    if not args.clientapp_only:
        result["machine"] = machine
        result["seconds"] = time.perf_counter() - started
    else:
        result["clientapp_seconds"] = time.perf_counter() - started
    result["commands"] = [*(result.get("commands", []) if args.merge else []), command]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
