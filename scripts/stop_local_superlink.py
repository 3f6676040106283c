"""Stop the local simulation SuperLink that ``flwr run`` started for this FLWR_HOME, by PID.

``flwr run .`` launches a detached ``flower-superlink --simulation`` and leaves it running.
We stop only the one whose environment carries our ``FLWR_HOME`` (never by name alone).
"""

from __future__ import annotations

import os
import signal
import time
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


def main() -> None:
    """Send SIGTERM to our SuperLinks and wait up to 10 s for them to exit."""
    home = os.environ.get("FLWR_HOME", "")
    if not home:
        return
    pids = our_superlinks(home)
    for pid in pids:
        print(f"[fedzo] stopping local SuperLink pid {pid}")
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 10
    while pids and time.time() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.2)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
