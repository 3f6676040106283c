"""Measure the peak resident memory of a block of code (Linux: exact kernel high-water mark)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _read_hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False if unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakMemory:
    """Context manager recording the process's peak resident set size inside the block.

    On Linux it resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) on entry
    and reads ``VmHWM`` on exit, which is exact. Elsewhere it samples RSS every
    ``interval`` seconds from a thread (a lower bound).

    Attributes
    ----------
    baseline_bytes : int
        RSS on entry.
    peak_bytes : int
        Peak RSS during the block.
    method : str
        ``"vmhwm"`` or ``"sampling"``.
    """

    interval: float = 0.002
    baseline_bytes: int = 0
    peak_bytes: int = 0
    method: str = ""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def extra_bytes(self) -> int:
        """Peak above the entry baseline."""
        return max(0, self.peak_bytes - self.baseline_bytes)

    def __enter__(self) -> PeakMemory:
        process = psutil.Process()
        self.baseline_bytes = process.memory_info().rss
        if _reset_hwm() and _read_hwm_bytes() is not None:
            self.method = "vmhwm"
            return self
        self.method = "sampling"
        self.peak_bytes = self.baseline_bytes
        self._stop.clear()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "vmhwm":
            self.peak_bytes = _read_hwm_bytes() or self.baseline_bytes
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)
