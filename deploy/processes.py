"""Daemons started and stopped by PID: spawning, liveness, reaping, log tails.

Daemons are started in their own session with their argv exec'ed directly (no shell), so each
recorded PID is the daemon's own. A process is identified by its PID *and* its start time (from
``/proc/<pid>/stat``), so a PID the kernel has since reused is never signalled; nothing is ever
matched by name.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.errors import DeployError
from deploy.state import Layout

Record = dict[str, Any]
"""One daemon of the deployment: ``name``, ``pid``, ``start_ticks``, ``log``, ``argv``."""

# Popen handles of the daemons this Python process started (to reap them and read exit codes).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def spawn(layout: Layout, name: str, argv: list[str], env: dict[str, str]) -> Record:
    """Start ``argv`` as a daemon in its own session; the recorded PID is its own."""
    layout.daemon_home(name).mkdir(parents=True, exist_ok=True)
    log = layout.log(name)
    with log.open("ab") as out:
        out.write(f"# {time.strftime('%F %T')} started: {shlex.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=layout.root,
            env=env,
            start_new_session=True,  # setsid: its own session, no controlling terminal
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    stat = _proc_stat(proc.pid)
    record: Record = {
        "name": name,
        "pid": proc.pid,
        "start_ticks": stat[1] if stat else 0,
        "log": str(log),
        "argv": argv,
    }
    layout.pid_file(name).write_text(f"{proc.pid}\n")
    return record


def forget(pid: int) -> None:
    """Drop the Popen handle of ``pid`` (after it was stopped)."""
    _CHILDREN.pop(pid, None)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks)`` of a process from /proc, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def is_running(record: Record) -> bool:
    """Whether the process of ``record`` is alive and still the one we started."""
    pid = int(record["pid"])
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return stat[1] == int(record.get("start_ticks", stat[1]))


def exit_code(record: Record) -> int | None:
    """Exit code of a daemon started by this Python process, or None if unknown/running."""
    child = _CHILDREN.get(int(record["pid"]))
    return None if child is None else child.poll()


def wait_exit(record: Record, timeout: float) -> int | None:
    """Wait up to ``timeout`` s for a daemon started by this process to exit; its exit code."""
    child = _CHILDREN.get(int(record["pid"]))
    if child is None:
        raise DeployError(f"pid {record['pid']} was not started by this process")
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def log_tail(path: str | Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _descendants(pid: int) -> list[tuple[int, int]]:
    """``(pid, start ticks)`` of every descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[tuple[int, int]] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        stat = _proc_stat(child)
        if stat is not None:
            found.append((child, stat[1]))
        todo.extend(children.get(child, []))
    return found


def _signal(pid: int, ticks: int, sig: int) -> None:
    stat = _proc_stat(pid)
    if stat is None or stat[1] != ticks or stat[0] in ("Z", "X"):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int, ticks: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == ticks and stat[0] not in ("Z", "X")


def stop_records(
    records: Sequence[Record], timeout: float = 15.0, sig: int = signal.SIGTERM
) -> None:
    """Stop the given daemons by PID: ``sig``, then SIGKILL after ``timeout`` seconds.

    The helpers they spawned (a SuperNode's SuperExec, a running ClientApp or ServerApp) are
    listed by PID before the signal. They normally exit on their own once their parent is
    gone; whatever is left after a grace period is stopped the same way, by PID.
    """
    targets = [(int(r["pid"]), int(r["start_ticks"])) for r in records if is_running(r)]
    helpers = [d for pid, _ in targets for d in _descendants(pid)]
    for pid, ticks in targets:
        _signal(pid, ticks, sig)
    _wait_gone(targets, timeout)
    _wait_gone(helpers, 10.0)
    for pid, ticks in helpers:
        _signal(pid, ticks, signal.SIGTERM)
    _wait_gone(helpers, 5.0)


def _wait_gone(procs: list[tuple[int, int]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(*p) for p in procs):
        time.sleep(0.2)
    for pid, ticks in procs:
        if _alive(pid, ticks):
            _signal(pid, ticks, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(*p) for p in procs):
        time.sleep(0.1)
