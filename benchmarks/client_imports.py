"""What a client process costs before it trains: import time, import RSS, first-round RSS.

Every measurement runs in its own fresh Python process (``--worker``), started from the
repository root with this interpreter:

* **imports**: ``import client_app.client_app`` (the ClientApp), ``import flwr.clientapp`` alone
  (the floor: Flower's own client runtime) and ``import torch`` alone. Reported: the import's
  wall time (measured inside the process, interpreter start-up excluded), the whole process's
  wall time, ``VmRSS`` and ``VmHWM`` after the import, and which heavy top-level modules
  (:data:`HEAVY`) ended up in ``sys.modules``. Each import is repeated ``--repeats`` times; the
  median is reported.
* **first round**: one ZO train message, built as the ServerApp builds a first-contact message
  (kept weights, round seed, mask bitmap, mask id, fingerprint seed), driven through the real
  ClientApp in process, once per engine (``lean``, ``fused``, ``batched``): LeNet-5 at density
  0.1 (a random global mask; which weights are kept does not change memory), K = 16, batch 32,
  one torch thread, partition 0 of 10 (Dirichlet, the default run's partitioner). ``cached``
  rows find the client's partition in the on-disk partition cache (a deployed node from its
  second message on, or with a partition file); ``cold`` rows have no cache and cut the
  partition from the full CIFAR-10 file, as a simulated node's first round does. Reported: RSS
  after the import, after the round, and the round's peak (sampled every 2 ms: the client's own
  step measurement resets ``VmHWM``), the round's wall time, and the heavy modules present after
  the round.

Usage::

    python benchmarks/client_imports.py [--json PATH] [--repeats 3] [--engines lean fused batched]
        [--cold-engines lean] [--data-dir DIR] [--quick]

``--quick``: one repeat, the lean engine only (cached and cold).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from isolated import first_contact_message
from machine import data_dir, load_average, machine_info

ROOT = Path(__file__).resolve().parents[1]
HEAVY: tuple[str, ...] = (
    "matplotlib",
    "pandas",
    "datasets",
    "flwr_datasets",
    "pyarrow",
    "scipy",
    "sklearn",
    "PIL",
    "torchvision",
    "sympy",
    "ray",
    "huggingface_hub",
    "fsspec",
    "aiohttp",
    "server_app",
)
"""Top-level modules a device has no use for (or only to cut its partition once)."""

IMPORTS: tuple[str, ...] = ("client_app.client_app", "flwr.clientapp", "torch")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _heavy_present() -> list[str]:
    return [name for name in HEAVY if name in sys.modules]


class _RssSampler:
    """Largest ``VmRSS`` seen by a thread polling every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _status_kib("VmRSS"))
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _status_kib("VmRSS"))


# ------------------------------------------------------------------------------ workers


def import_worker(module: str) -> dict[str, Any]:
    """Import ``module`` in this fresh process; time, memory and heavy modules after it."""
    import importlib

    start = time.perf_counter()
    importlib.import_module(module)
    seconds = time.perf_counter() - start
    return {
        "import_s": seconds,
        "rss_mb": _status_kib("VmRSS") / 1024,
        "hwm_mb": _status_kib("VmHWM") / 1024,
        "heavy": _heavy_present(),
        "modules": len(sys.modules),
    }


def round_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Import the ClientApp, then send it one first-contact ZO train message."""
    start = time.perf_counter()
    from client_app.client_app import app

    import_s = time.perf_counter() - start
    after_import = _status_kib("VmRSS")
    heavy_after_import = _heavy_present()

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity  # private: no runtime here

    from fedzo_flwr import protocol
    from fedzo_flwr.protocol.wire import decode_scalars

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    with np.load(job["message"]) as saved:
        kept = saved["kept"].copy()
        mask_bytes = saved["mask"].tobytes()
    config = ConfigRecord(
        {
            protocol.ROUND_KEY: 1,
            protocol.ROUND_SEED_KEY: int(job["round_seed"]),
            protocol.MASK_ID_KEY: protocol.mask_id(mask_bytes),
            protocol.MASK_KEY: mask_bytes,
            protocol.FINGERPRINT_SEED_KEY: int(job["fingerprint_seed"]),
        }
    )
    content = RecordDict(
        {
            protocol.ARRAYS_KEY: ArrayRecord({protocol.KEPT_KEY: Array(kept)}),
            protocol.CONFIG_KEY: config,
        }
    )
    message = Message(content, dst_node_id=1000, message_type=MessageType.TRAIN)
    context = Context(
        run_id=1,
        node_id=1000,
        node_config={"partition-id": 0, "num-partitions": job["num_partitions"]},
        state=RecordDict(),
        run_config=job["run_config"],
    )
    before_round = _status_kib("VmRSS")
    with _RssSampler() as sampler:
        round_start = time.perf_counter()
        reply = app(message, context)
        round_s = time.perf_counter() - round_start
    if reply.has_error():
        raise RuntimeError(f"the ClientApp replied with an error: {reply.error.reason}")
    zo = reply.content.config_records[protocol.ZO_KEY]
    deltas = decode_scalars(bytes(zo[protocol.DELTAS_KEY]))  # type: ignore[arg-type]
    k = int(job["run_config"]["k"])
    if deltas.shape != (k,) or not np.all(np.isfinite(deltas)):
        raise RuntimeError(f"expected {k} finite loss differences, got {deltas.shape}")
    return {
        "import_s": import_s,
        "round_s": round_s,
        "rss_after_import_mb": after_import / 1024,
        "rss_before_round_mb": before_round / 1024,
        "rss_after_round_mb": _status_kib("VmRSS") / 1024,
        "round_peak_mb": sampler.peak_kib / 1024,
        "heavy_after_import": heavy_after_import,
        "heavy_after_round": _heavy_present(),
        "deltas": len(deltas),
    }


def run_worker(job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one job in a fresh process from the repository root; its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    start = time.perf_counter()
    proc = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


# ------------------------------------------------------------------------------ driver


def worker_env(cache_dir: Path | None = None) -> dict[str, str]:
    """The worker's environment: this one, the repository importable, an own partition cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / "fedzo-mpl"))
    if cache_dir is not None:
        env["FEDZO_CACHE_DIR"] = str(cache_dir)
    return env


def run_config(engine: str, data: Path, k: int, batch: int, threads: int) -> dict[str, Any]:
    """The default run config (``pyproject.toml``) with this benchmark's settings."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as handle:
        config: dict[str, Any] = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    config.update(
        {
            "data-dir": str(data),
            "engine": engine,
            "k": k,
            "batch-size": batch,
            "client-threads": threads,
        }
    )
    return config


def measure_imports(repeats: int) -> list[dict[str, Any]]:
    """Median over ``repeats`` fresh processes of each import in :data:`IMPORTS`."""
    rows = []
    env = worker_env()
    for module in IMPORTS:
        runs = [run_worker({"kind": "import", "module": module}, env) for _ in range(repeats)]
        row: dict[str, Any] = {"module": module, "repeats": repeats}
        for key in ("import_s", "process_s", "rss_mb", "hwm_mb", "modules"):
            row[key] = statistics.median(r[key] for r in runs)
        row["heavy"] = sorted({name for r in runs for name in r["heavy"]})
        rows.append(row)
        print(
            f"# import {module}: {row['import_s']:.2f} s, RSS {row['rss_mb']:.0f} MiB",
            flush=True,
        )
    return rows


def measure_rounds(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """One first-contact train round per engine: cold (no partition cache) first, then cached."""
    seeds = first_contact_message(workdir / "message.npz", "lenet5", args.density, 3407)
    cached_dir = workdir / "cache-shared"
    rows = []
    plan = [(e, "cold") for e in args.cold_engines] + [(e, "cached") for e in args.engines]
    for engine, cache in plan:
        cache_dir = workdir / f"cache-cold-{engine}" if cache == "cold" else cached_dir
        if cache == "cached" and not any(cached_dir.glob("*.npz")):
            # Fill the shared cache with a throw-away cold round of the lean engine.
            run_worker(round_job(args, "lean", workdir, seeds), worker_env(cached_dir))
        result = run_worker(round_job(args, engine, workdir, seeds), worker_env(cache_dir))
        rows.append({"engine": engine, "partition": cache, **result})
        print(
            f"# round {engine} ({cache}): {result['round_s']:.2f} s, "
            f"RSS {result['rss_after_round_mb']:.0f} MiB after, peak {result['round_peak_mb']:.0f}",
            flush=True,
        )
    return rows


def round_job(
    args: argparse.Namespace, engine: str, workdir: Path, seeds: dict[str, int]
) -> dict[str, Any]:
    """The worker job of one train round with ``engine``."""
    return {
        "kind": "round",
        "message": str(workdir / "message.npz"),
        "num_partitions": args.num_partitions,
        "run_config": run_config(engine, args.data, args.k, args.batch, args.threads),
        **seeds,
    }


def print_tables(imports: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> None:
    """The two tables, in Markdown."""
    print("\n| import | import s | process s | RSS MiB | HWM MiB | modules | heavy modules |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in imports:
        heavy = ", ".join(r["heavy"]) or "none"
        print(
            f"| `{r['module']}` | {r['import_s']:.2f} | {r['process_s']:.2f} | "
            f"{r['rss_mb']:.0f} | {r['hwm_mb']:.0f} | {r['modules']:.0f} | {heavy} |"
        )
    print(
        "\n| engine | partition | round s | RSS after import MiB | RSS after round MiB "
        "| round peak MiB | heavy modules after the round |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rounds:
        heavy = ", ".join(r["heavy_after_round"]) or "none"
        print(
            f"| {r['engine']} | {r['partition']} | {r['round_s']:.2f} | "
            f"{r['rss_after_import_mb']:.0f} | {r['rss_after_round_mb']:.0f} | "
            f"{r['round_peak_mb']:.0f} | {heavy} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="one repeat, lean engine only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["lean", "fused", "batched"])
    parser.add_argument("--cold-engines", nargs="*", default=["lean"])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--num-partitions", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        out = import_worker(job["module"]) if job["kind"] == "import" else round_worker(job)
        print(json.dumps(out))
        return 0
    if args.quick:
        args.repeats, args.engines, args.cold_engines = 1, ["lean"], ["lean"]
    args.data = data_dir(args.data_dir).resolve()

    started = time.perf_counter()
    machine = machine_info(args.threads)
    imports = measure_imports(args.repeats)
    with tempfile.TemporaryDirectory(prefix="fedzo-client-imports-") as tmp:
        rounds = measure_rounds(args, Path(tmp))
    machine["load_after"] = load_average()
    print_tables(imports, rounds)
    print(f"\nmachine: {machine}")
    result = {
        "machine": machine,
        "settings": {
            "model": "lenet5",
            "density": args.density,
            "mask": "random global mask (which weights are kept does not change memory)",
            "k": args.k,
            "batch": args.batch,
            "threads": args.threads,
            "partition": f"0 of {args.num_partitions}, default partitioner (dirichlet)",
            "message": "first contact: kept weights, round seed, mask, mask id, fingerprint seed",
            "heavy": list(HEAVY),
            "units": "*_mb fields are MiB (kernel KiB / 1024); *_s fields are seconds",
        },
        "imports": imports,
        "rounds": rounds,
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
