"""What every benchmark needs about the machine it runs on, and where the data is.

One place for the helpers the benchmark scripts share: the CPU's name and the machine record a
result carries, the data folder they read CIFAR-10 from, and returning freed memory to the
system between measurements.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.1."""
    return [round(x, 1) for x in os.getloadavg()]


def machine_info(threads: int) -> dict[str, Any]:
    """What a result must say about its machine: CPU, cores, torch, Python, threads, load.

    ``load_before`` is taken now; a benchmark adds ``load_after`` (:func:`load_average`) at the end.
    """
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "load_before": load_average(),
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
