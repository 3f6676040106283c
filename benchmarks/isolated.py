"""One memory measurement per fresh Python process: the protocol the memory benchmarks share.

A benchmark script re-runs itself with ``--worker JOB`` (:func:`run_worker`); the worker loads
one real CIFAR-10 batch (:func:`cifar_batch`), builds what the job needs, and measures one
training step with :func:`measure_step`:

1. one warm-up step (kernels, thread pools and lazy plans are set up once per process), then
   ``reset`` frees what it left (gradients, optimizer) and :func:`machine.trim_memory` returns
   the freed heap: the **idle baseline** is a client holding its model and batch, nothing else;
2. optionally one plain no-grad forward pass inside :class:`~fedzo_flwr.measure.memory.PeakMemory`
   (``forward_extra``: activations plus the framework's convolution workspace);
3. exactly one step inside ``PeakMemory`` (kernel ``VmHWM``): ``extra`` is its peak RSS above the
   idle baseline, ``step_peak_rss`` the whole process's peak;
4. optionally ``then`` (e.g. a second local step that finds the first step's optimizer state
   alive), measured the same way against the same idle baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import trim_memory

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["cifar_batch", "measure_step", "run_worker", "status_bytes"]


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``...) in bytes; 0 if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_worker(script: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --worker JOB`` in a fresh interpreter; return the JSON of its last line."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {job}:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def cifar_batch(data_dir: str, batch: int) -> tuple[Any, Any]:
    """The first ``batch`` CIFAR-10 training images (normalised float32) and labels.

    The dataset itself is dropped afterwards: a client holds its batch, not the whole dataset.
    """
    import torch

    from fedzo_flwr.data import clear_cache, load_dataset, to_tensor

    data = load_dataset("cifar10", data_dir)
    x = to_tensor(data.x_train[:batch], "cifar10")
    y = torch.tensor(data.y_train[:batch], dtype=torch.long)
    del data
    clear_cache()
    return x, y


def measure_step(
    step: Callable[[], object],
    reset: Callable[[], object],
    forward: Callable[[], object] | None = None,
    then: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Warm up, settle to the idle baseline, then measure ``step`` (see the module docstring).

    Returns
    -------
    dict
        ``rss_idle``, ``step_peak_rss``, ``extra``, ``method_of_measurement``,
        ``step_seconds``; ``forward_extra`` if ``forward``; ``then_peak_rss`` and
        ``then_extra`` (above the idle baseline) if ``then``.

    """
    import torch

    from fedzo_flwr.measure.memory import PeakMemory

    step()  # warm-up: lazy initialisation (kernels, thread pools, plans)
    reset()
    trim_memory()
    out: dict[str, Any] = {}
    if forward is not None:
        with torch.no_grad(), PeakMemory() as plain:
            forward()
        out["forward_extra"] = plain.extra_bytes
        trim_memory()
    rss_idle = status_bytes("VmRSS")
    started = time.perf_counter()
    with PeakMemory() as memory:
        step()
    out.update(
        rss_idle=rss_idle,
        step_peak_rss=memory.peak_bytes,
        extra=memory.extra_bytes,
        method_of_measurement=memory.method,
        step_seconds=time.perf_counter() - started,
    )
    if then is not None:
        with PeakMemory() as after:
            then()
        out["then_peak_rss"] = after.peak_bytes
        out["then_extra"] = max(0, after.peak_bytes - rss_idle)
    reset()
    return out
