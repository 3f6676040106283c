"""What every benchmark needs about the machine it runs on, and where the data is.

One place for the helpers the benchmark scripts share: the machine record a result carries
(:func:`machine_info`, which includes the library's :func:`fedzo_flwr.environment.environment`:
machine, library versions and the lock file's SHA-256, the same record as a run's
``results.json``), the data folder they read CIFAR-10 from, and returning freed memory to the
system between measurements.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedzo_flwr.environment import cpu_model, environment  # noqa: E402

__all__ = ["ROOT", "cpu_model", "data_dir", "environment", "load_average", "machine_info"]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.1."""
    return [round(x, 1) for x in os.getloadavg()]


def machine_info(threads: int | None) -> dict[str, Any]:
    """What a result must say about its machine: CPU, cores, torch, Python, threads, load, and
    the full :func:`~fedzo_flwr.environment.environment` (versions, lock-file hash).

    ``cpu``, ``cores``, ``torch`` and ``python`` repeat fields of ``environment`` at the top
    level, where the reports have always read them. ``load_before`` is taken now; a benchmark
    adds ``load_after`` (:func:`load_average`) at the end. ``threads``: the torch threads of
    the measurement (``None``: not one fixed number).
    """
    env = environment()
    return {
        "cpu": env["machine"]["cpu"],
        "cores": env["machine"]["cores"],
        "torch": env["torch_build"],
        "python": env["machine"]["python"],
        "threads": threads,
        "load_before": load_average(),
        "environment": env,
    }


def data_dir(arg: str | None) -> Path:
    """``arg``, else ``$FEDZO_DATA_DIR``, else ``../shared/data`` beside the checkout."""
    if arg:
        return Path(arg)
    env = os.environ.get("FEDZO_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def trim_memory() -> None:
    """Collect garbage and hand glibc's free heap back to the system (``malloc_trim``)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
