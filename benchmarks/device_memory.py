"""Measure a ClientApp's memory per model, the way a SuperNode runs it (for docs/devices.md).

::

    python benchmarks/device_memory.py --data-dir ../shared/data [--models lenet5 resnet18] [--k 20]

Each model is measured in a fresh Python process (as a deployed SuperNode starts one per
message) with ``torch.set_num_threads(1)``: import torch, Flower's ClientApp runtime and our
``client_app`` module; load the node's partition from the on-disk partition cache (warmed first,
as from round 2 on, or as from a per-device partition file); build the model and apply the mask
decoded from its wire bytes as the ClientApp does (density from the run config; a random mask made
in the warm-up run: which weights are kept does not change memory); then one
:func:`fedzo_flwr.zo.client.train_round` inside :class:`fedzo_flwr.measure.memory.PeakMemory`.

Reported per model (bytes): RSS after the imports, RSS before training, the train round's peak
(``client_peak_mem_bytes`` in results.json measures the same) and its extra over the entry RSS,
and the process's lifetime peak (VmHWM). The lean engine's memory does not grow with K (the
directions are applied in place one at a time), so a small K keeps the measurement quick.
``--out`` writes ``{"machine": machine.machine_info(1), "rows": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("lenet5", "lenet-gn", "resnet20", "resnet18")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure_one(model: str, data_dir: str, k: int, run_config: dict[str, Any]) -> dict[str, Any]:
    """In this (fresh) process: the ClientApp's memory for one train round of ``model``."""
    started = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    rss_torch = _status_bytes("VmRSS")
    sys.path.insert(0, str(ROOT))
    import flwr.clientapp  # noqa: F401  (the ClientApp runtime a SuperNode starts)

    from client_app import client_app  # noqa: F401  (what the FAB's ClientApp imports)
    from fedzo_flwr.config import RunConfig
    from fedzo_flwr.data import NUM_CLASSES
    from fedzo_flwr.data.client_data import load_client_data
    from fedzo_flwr.models import build_model
    from fedzo_flwr.protocol.wire import decode_mask, encode_mask
    from fedzo_flwr.pruning import prune
    from fedzo_flwr.sparse.mask import apply_mask_, dense_mask, kept_count, total_count
    from fedzo_flwr.sparse.space import KeptSpace
    from fedzo_flwr.zo.client import train_round

    rss_imports = _status_bytes("VmRSS")
    cfg = RunConfig.from_run_config(
        {"model": model, "data-dir": data_dir, "k": k, "prune-method": "random", **run_config}
    )
    x, y = load_client_data(cfg, 0, 10)
    net = build_model(cfg.model, NUM_CLASSES[cfg.dataset])
    mask_file = Path(os.environ["FEDZO_CACHE_DIR"]) / f"mask-{model}-{cfg.effective_density}.bin"
    if not mask_file.is_file():  # made by the warm-up process: the server's job, not measured
        mask = (
            prune("random", net, cfg.model, cfg.density, seed=0) if cfg.pruned else dense_mask(net)
        )
        mask_file.write_bytes(encode_mask(mask))
    mask = decode_mask(mask_file.read_bytes(), net)  # as client_app.masked_model does
    apply_mask_(net, mask)
    space = KeptSpace(net, mask)
    rss_before = _status_bytes("VmRSS")
    hwm_before = _status_bytes("VmHWM")
    result = train_round(cfg, net, space, x, y, 12345, 0)
    return {
        "model": model,
        "method": cfg.method,
        "density": cfg.effective_density,
        "engine": cfg.engine,
        "k": cfg.k,
        "batch_size": cfg.batch_size,
        "params": sum(p.numel() for p in net.parameters()),
        "kept_weights": kept_count(mask),
        "prunable_weights": total_count(mask),
        "partition_examples": len(y),
        "rss_after_torch": rss_torch,
        "rss_after_imports": rss_imports,
        "rss_before_train": rss_before,
        "train_peak": result.peak_mem_bytes,
        "train_extra": result.extra_mem_bytes,
        "process_peak": max(hwm_before, _status_bytes("VmHWM")),
        "train_seconds": result.seconds,
        "process_seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure every model, each in two fresh processes (warm-up, then measured)."""
    parser = argparse.ArgumentParser(description="ClientApp memory per model (fresh processes)")
    parser.add_argument("--data-dir", default=os.environ.get("FEDZO_DATA_DIR", ""))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--run-config", default="{}", help="JSON dict of extra run-config keys")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    extra = json.loads(args.run_config)
    if args.one:
        print(json.dumps(measure_one(args.one, args.data_dir, args.k, extra)))
        return 0
    with tempfile.TemporaryDirectory(prefix="fedzo-memcache-") as scratch:
        env = {"FEDZO_CACHE_DIR": scratch, **os.environ, "PYTHONUNBUFFERED": "1"}
        return _measure_all(args, env)


def _measure_all(args: argparse.Namespace, env: dict[str, str]) -> int:
    from machine import load_average, machine_info  # not in the measured processes

    machine = machine_info(1)
    rows = []
    for model in args.models:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--one",
            model,
            "--data-dir",
            args.data_dir,
            "--k",
            str(args.k),
            "--run-config",
            args.run_config,
        ]
        # Warm-up run: fills the partition cache (as a node's first round does) and writes the
        # model's mask file (the server's part); the second, measured run starts from those.
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        proc = subprocess.run(
            command, cwd=ROOT, env=env, check=True, capture_output=True, text=True
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{model:<9} imports {row['rss_after_imports'] / 2**20:6.0f} MiB  "
            f"train peak {row['train_peak'] / 2**20:6.0f} MiB (+{row['train_extra'] / 2**20:.0f})"
            f"  process peak {row['process_peak'] / 2**20:6.0f} MiB  "
            f"params {row['params']:,}",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        machine["load_after"] = load_average()
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
