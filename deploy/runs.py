"""A run on the deployment: submitted, followed to its end, and judged by the SuperLink's record.

``flwr run --stream`` exits 0 whatever becomes of the run: a ServerApp that raises is recorded
``finished:failed`` by the SuperLink, and the stream simply ends. ``run`` therefore

1. submits with ``flwr run <app> fedzo-local --format json`` (the run id; on a refusal the
   reason, which the CLI reduces to ``[code: 15] Invalid run configuration.``, is read from the
   SuperLink's log, where Flower names it);
2. follows the ServerApp's log with ``flwr log <id> fedzo-local --stream`` until the run ends;
3. reads the run's status and status details with ``flwr ls --run-id <id> --format json``:
   ``finished:completed`` is success; anything else is reported with Flower's details (for a
   ServerApp that raised: ``ServerApp failed with exception: <its message>``) and the ERROR
   lines of the run's log (``flwr log <id> --show``), and exits non-zero.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.errors import DeployError
from deploy.flower_cli import cli_env, flower_bin, flwr_cli
from deploy.state import CONNECTION, Layout, State

COMPLETED = "finished:completed"
EXIT_FAILED = 4
"""Exit status of ``run`` when the run finished but did not complete (failed or stopped)."""
EXIT_UNFINISHED = 5
"""Exit status of ``run`` when the run had not finished when ``run`` stopped following it."""
EXIT_INTERRUPTED = 130
"""Exit status of ``run`` after Ctrl-C (the run itself goes on)."""
MAX_ERROR_LINES = 10

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class RunOutcome:
    """What the SuperLink recorded for one run."""

    run_id: int
    status: str
    """``finished:completed``, ``finished:failed``, ``finished:stopped``, ``running``, ..."""
    details: str
    """Flower's status details (the ServerApp's exception message when it failed)."""
    errors: tuple[str, ...] = ()
    """The ERROR lines of the run's log (empty for a completed run)."""

    @property
    def completed(self) -> bool:
        """Whether the run finished and completed."""
        return self.status == COMPLETED

    @property
    def exit_status(self) -> int:
        """0 completed, :data:`EXIT_FAILED` finished otherwise, :data:`EXIT_UNFINISHED`."""
        if self.completed:
            return 0
        return EXIT_FAILED if self.status.startswith("finished") else EXIT_UNFINISHED

    def describe(self) -> str:
        """The verdict ``run`` prints."""
        if self.completed:
            return f"[deploy] run {self.run_id} {self.status}"
        lines = [f"[deploy] run {self.run_id} {self.status}: {self.details or '(no details)'}"]
        if self.errors:
            lines.append("[deploy] the ServerApp's errors (flwr log):")
            lines += [f"  {line}" for line in self.errors]
        return "\n".join(lines)


def parse_json(stdout: str) -> dict[str, Any] | None:
    """The JSON object a ``flwr ... --format json`` call printed, or None."""
    text = stdout.strip()
    for candidate in (text, text[text.find("{") : text.rfind("}") + 1]):
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return data
    return None


def _superlink_log(state: State) -> Path | None:
    record = state.get("processes", {}).get("superlink")
    return Path(record["log"]) if record else None


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0


def refusal_reasons(path: Path | None, offset: int) -> list[str]:
    """The SuperLink's "Could not start run" lines written after byte ``offset`` of its log."""
    if path is None:
        return []
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        _, sep, reason = line.partition("Could not start run: ")
        if sep:
            found.append(_ANSI.sub("", reason).strip())
    return found


def submit_run(layout: Layout, state: State, app_dir: Path, run_config: str) -> int:
    """``flwr run <app_dir> fedzo-local --format json --run-config ...``: the new run's id.

    Raises
    ------
    DeployError
        If the SuperLink refuses the run; with the reason from the SuperLink's log.
    """
    link_log = _superlink_log(state)
    offset = _size(link_log)
    args = ["run", str(app_dir), CONNECTION, "--format", "json", "--run-config", run_config]
    proc = flwr_cli(layout, *args, timeout=300, check=False)
    data = parse_json(proc.stdout) or {}
    if data.get("success") and data.get("run-id"):
        return int(data["run-id"])
    # Flower's error message is the CLI's captured output, then the error: keep the error.
    lines = str(data.get("error-message") or (proc.stdout + proc.stderr)).strip().splitlines()
    error = lines[-1].strip() if lines else f"flwr run exited {proc.returncode}"
    reasons: list[str] = []
    for _ in range(10):  # the SuperLink writes its log line as it answers; allow it a moment
        reasons = refusal_reasons(link_log, offset)
        if reasons or link_log is None:
            break
        time.sleep(0.3)
    because = f"; the SuperLink's log says: {'; '.join(reasons)}" if reasons else ""
    raise DeployError(f"the SuperLink refused the run: {' '.join(error.split())}{because}")


def follow_run(layout: Layout, run_id: int, *, stream: bool = True, **popen_kwargs: Any) -> int:
    """``flwr log <run_id> fedzo-local --stream`` until the run ends; its exit status.

    With ``stream`` False the log is not shown (``flwr log`` still waits for the end).
    """
    argv = [flower_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"]
    kwargs: dict[str, Any] = {"env": cli_env(layout), "cwd": layout.root, **popen_kwargs}
    if not stream:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.DEVNULL
    return subprocess.run(argv, check=False, **kwargs).returncode


def run_status(layout: Layout, run_id: int) -> tuple[str, str]:
    """``(status, status details)`` of ``run_id`` from ``flwr ls --run-id ... --format json``."""
    proc = flwr_cli(
        layout, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json", check=False
    )
    data = parse_json(proc.stdout) or {}
    runs = data.get("runs") if data.get("success") else None
    if not runs:
        error = data.get("error-message") or (proc.stdout + proc.stderr)
        return "unknown", f"flwr ls could not read run {run_id}: {' '.join(str(error).split())}"
    run = runs[0]
    return str(run.get("status", "unknown")), str(run.get("status-details", ""))


def error_lines(layout: Layout, run_id: int) -> tuple[str, ...]:
    """The ERROR lines of the run's log (``flwr log <run_id> --show``), the last few."""
    errors: list[str] = []
    for attempt in range(3):  # a failing ServerApp uploads its last lines after its status
        if attempt:
            time.sleep(2.0)
        proc = flwr_cli(layout, "log", str(run_id), CONNECTION, "--show", check=False)
        lines = [_ANSI.sub("", line).strip() for line in proc.stdout.splitlines()]
        errors = [line for line in lines if re.match(r"ERROR\b", line)]
        if errors:
            break
    return tuple(dict.fromkeys(errors))[-MAX_ERROR_LINES:]


def outcome(layout: Layout, run_id: int, *, settle: float = 30.0) -> RunOutcome:
    """The run's recorded outcome, waiting up to ``settle`` seconds for it to finish."""
    deadline = time.monotonic() + settle
    status, details = run_status(layout, run_id)
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
        status, details = run_status(layout, run_id)
    if status == COMPLETED:
        return RunOutcome(run_id, status, details)
    return RunOutcome(run_id, status, details, error_lines(layout, run_id))
