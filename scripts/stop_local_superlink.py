"""Stop the local simulation SuperLink that ``flwr run`` started for this FLWR_HOME, by PID.

``flwr run .`` launches a detached ``flower-superlink --simulation`` and leaves it running.
We stop only the one whose environment carries our ``FLWR_HOME`` (never by name alone). A
process that exits between being listed and being signalled is already stopped, not an error.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path


def our_superlinks(flwr_home: str) -> list[int]:
    """PIDs of local SuperLinks started with ``FLWR_HOME=flwr_home``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if not any(part.endswith(b"flower-superlink") for part in cmdline):
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"FLWR_HOME={flwr_home}".encode() in environ:
            found.append(int(proc.name))
    return found


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _send(pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid``; False when the process is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def stop(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGTERM to ``pids``, then SIGKILL to those still there after ``timeout`` seconds."""
    for pid in pids:
        print(f"[fedzo] stopping local SuperLink pid {pid}")
    alive = [pid for pid in pids if _send(pid, signal.SIGTERM)]
    deadline = time.time() + timeout
    while alive and time.time() < deadline:
        alive = [p for p in alive if _exists(p)]
        time.sleep(0.2)
    for pid in alive:
        _send(pid, signal.SIGKILL)


def main() -> None:
    """Send SIGTERM to our SuperLinks and wait up to 10 s for them to exit."""
    home = os.environ.get("FLWR_HOME", "")
    if not home:
        return
    stop(our_superlinks(home))


if __name__ == "__main__":
    main()
