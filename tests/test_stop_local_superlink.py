"""``scripts/stop_local_superlink.py``: a PID that vanished before its signal counts as stopped.

``os.kill`` is replaced, so no real process is signalled.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import stop_local_superlink  # noqa: E402


def test_stop_local_superlink_skips_a_pid_that_vanished(monkeypatch, capsys):
    sent: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        raise ProcessLookupError(pid)  # exited between listing and kill

    monkeypatch.setenv("FLWR_HOME", "/nonexistent/flwr-home")
    monkeypatch.setattr(stop_local_superlink, "our_superlinks", lambda home: [4242])
    monkeypatch.setattr(stop_local_superlink.os, "kill", kill)
    stop_local_superlink.main()
    assert sent == [(4242, signal.SIGTERM)]
    assert "stopping local SuperLink pid 4242" in capsys.readouterr().out


def test_stop_local_superlink_skips_a_pid_that_vanished_before_sigkill(monkeypatch):
    sent: list[tuple[int, int]] = []

    def kill(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        if sig == signal.SIGKILL:
            raise ProcessLookupError(pid)

    monkeypatch.setattr(stop_local_superlink, "_exists", lambda pid: True)  # ignores SIGTERM
    monkeypatch.setattr(stop_local_superlink.os, "kill", kill)
    stop_local_superlink.stop([4242, 4343], timeout=0.0)
    assert sent == [(p, s) for s in (signal.SIGTERM, signal.SIGKILL) for p in (4242, 4343)]
