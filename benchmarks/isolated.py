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

:func:`first_contact_message` writes the kept weights and mask bitmap of a first-contact train
message (what the ServerApp sends a node the first time) for the benchmarks that drive the real
ClientApp in a fresh process (``client_imports.py``, ``client_memory.py --clientapp``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from machine import trim_memory

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["cifar_batch", "first_contact_message", "measure_step", "run_worker", "status_bytes"]


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``...) in bytes; 0 if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_worker(
    script: str, job: dict[str, Any], env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run ``script --worker JOB`` in a fresh interpreter; return the JSON of its last line.

    ``env``: variables added to this process's environment (e.g. ``GLIBC_TUNABLES``); the
    repository is always importable (``PYTHONPATH``).
    """
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(job)]
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=full_env, cwd=ROOT)
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


def first_contact_message(path: Path, model: str, density: float, seed: int) -> dict[str, int]:
    """Write the kept weights and mask of a first-contact message for ``model`` to ``path``.

    θ0 is the run's initial model (``model_seed(seed)``) under a random global mask at
    ``density`` (which weights are kept does not change memory; density 1: the dense mask).
    Returns the seeds the message carries (``round_seed``, ``fingerprint_seed``).
    """
    import numpy as np

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from fedzo_flwr import seeding
    from fedzo_flwr.models import build_model
    from fedzo_flwr.protocol.wire import encode_mask
    from fedzo_flwr.pruning.baselines import random_mask
    from fedzo_flwr.sparse.mask import apply_mask_, dense_mask
    from fedzo_flwr.sparse.space import KeptSpace

    net = build_model(model, 10, seeding.model_seed(seed))
    mask = random_mask(net, density, seed=0) if density < 1 else dense_mask(net)
    apply_mask_(net, mask)
    kept = KeptSpace(net, mask).gather(net).numpy().astype(np.float32)
    mask_bytes = np.frombuffer(encode_mask(mask), dtype=np.uint8)
    np.savez(path, kept=kept, mask=mask_bytes)
    return {
        "round_seed": seeding.round_seed(seed, 1),
        "fingerprint_seed": seeding.fingerprint_seed(seed),
    }
