"""Figure 2 of the paper at its scale: zo-dense against zo-pruned, K = 200, 3000 rounds.

The default model and data set of the recipe (LeNet-5 on CIFAR-10 today), 10 clients, Dirichlet
α = 0.5 (``--alphas 0.5 0.1`` adds α = 0.1), dense zeroth-order training (BAFFLE) against
NTK-SAP-pruned zeroth-order training at density 0.1.
Both rows take **the same recipe: the run-config defaults of pyproject.toml** (a later change
of the default recipe carries over) **with a constant lr** (:data:`SCHEDULE`, today's default
too): a cosine sized for the 10-minute default run would end long before round 3000
(docs/recipe.md). ``--set key=value`` overrides a key for
both (TOML values, as ``flwr run --run-config``), the schedule's keys included. Only the keys
that define the two rows and the scale are fixed here (``method``, ``prune-method``,
``density``; ``--k``, ``--rounds``, ``--clients``).

Every run is the real ServerApp against real ClientApps in one process
(``tests/inprocess_grid.py``, as ``paper_comparison.py`` runs them), **in its own background
process** with one torch thread, writing ``checkpoint.pt`` every ``--checkpoint-every`` rounds.
Re-running the command after an interruption (reboot, kill) resumes every unfinished run from
its latest checkpoint (run-config ``resume-from``), bit-exactly; a finished run is left alone,
and one still running is not started twice. Everything lives under ``--out-dir`` (default
``../runs/paper-scale`` beside the checkout, outside git)::

    <out-dir>/<run>/results.json, checkpoint.pt, model.pt   the run (ServerApp outputs)
    <out-dir>/<run>.log                                      progress: round, accuracy, ETA
    <out-dir>/<run>.pid                                      the process while it runs
    <out-dir>/<run>.segments.json                            one entry per process that ran it

Usage::

    python benchmarks/paper_scale.py [--alphas 0.5 [0.1]] [--set key=value ...] [--wait]
    python benchmarks/paper_scale.py --status        # where each run stands
    python benchmarks/paper_scale.py --stop          # stop the running runs (SIGTERM)
    python benchmarks/paper_scale.py --pack F.tar.xz    # carry the runs to another checkout:
    python benchmarks/paper_scale.py --unpack F.tar.xz  # there, then the first command resumes
    python benchmarks/paper_scale.py --report        # docs/results/paper_scale.json,
                                                     # docs/figures/paper_scale.png, results.md

``--report`` may run at any time: an unfinished run is reported as "in progress: round r of
3000". The runs' names are ``<method>-a<alpha>`` (``zo-dense-a0.5``, ``zo-pruned-a0.5``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machine import ROOT, data_dir, load_average, machine_info

for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from fedzo_flwr.environment import environment  # noqa: E402
from fedzo_flwr.files import atomic_write_bytes  # noqa: E402

PAPER_K = 200
PAPER_ROUNDS = 3000
CLIENTS = 10
RUN_THREADS = 1
"""torch threads of every run process."""
METHODS: dict[str, dict[str, Any]] = {
    "zo-dense": {"method": "zo-dense"},
    "zo-pruned": {"method": "zo-pruned", "prune-method": "ntk", "density": 0.1},
}
"""The two rows of Figure 2 and the keys that make them (everything else is shared)."""
SCHEDULE: dict[str, Any] = {"lr-schedule": "constant", "lr-schedule-rounds": 0}
"""The lr schedule of both rows unless ``--set`` names it: constant at every scale."""
FIXED_KEYS = frozenset(
    {
        "method",
        "prune-method",
        "density",
        "partitioner",
        "alpha",
        "k",
        "num-server-rounds",
        "checkpoint-every",
        "data-dir",
        "output-dir",
        "run-name",
        "resume-from",
    }
)
"""Keys ``--set`` may not change: the rows, the scale (own flags) and the bookkeeping."""
DEFAULT_OUT = ROOT.parent / "runs" / "paper-scale"
JSON_PATH = ROOT / "docs" / "results" / "paper_scale.json"
FIGURE_PATH = ROOT / "docs" / "figures" / "paper_scale.png"
RESULTS_MD = ROOT / "docs" / "results.md"


# --------------------------------------------------------------------------- the plan


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr=0.02", 'engine="lean"']`` -> ``{"lr": 0.02, "engine": "lean"}`` (TOML values;
    a value TOML cannot read is taken as a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value")
        if key in FIXED_KEYS:
            raise SystemExit(
                f"--set {key}: fixed by paper_scale.py (the rows, the scale or bookkeeping); "
                "use --k, --rounds, --clients, --alphas, --checkpoint-every or --out-dir"
            )
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def run_name(method: str, alpha: str) -> str:
    """``zo-dense-a0.5``, ``zo-pruned-a0.1``."""
    return f"{method}-a{alpha}"


@dataclass(frozen=True)
class Run:
    """One run of the plan: its name, method, α and full run config."""

    name: str
    method: str
    alpha: str
    config: dict[str, Any]


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run: for each α, zo-dense and zo-pruned with the same recipe."""
    from inprocess_grid import app_config

    from fedzo_flwr.config import RunConfig
    from fedzo_flwr.errors import ConfigError

    runs = []
    for alpha in args.alphas:
        for method in args.methods:
            name = run_name(method, alpha)
            config: dict[str, Any] = app_config(
                **{
                    **SCHEDULE,
                    **args.overrides,
                    "data-dir": str(args.data_dir),
                    "output-dir": str(args.out_dir),
                    "run-name": name,
                    "num-server-rounds": args.rounds,
                    "k": args.k,
                    "checkpoint-every": args.checkpoint_every,
                    "partitioner": "dirichlet",
                    "alpha": float(alpha),
                    **METHODS[method],
                }
            )
            try:
                RunConfig.from_run_config(config)
            except ConfigError as err:
                raise SystemExit(f"{name}: {err}") from None
            runs.append(Run(name, method, alpha, config))
    return runs


# ------------------------------------------------------------------------- run state


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live paper_scale run process (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(part.endswith(b"paper_scale.py") for part in cmdline) and b"--run-one" in cmdline


@dataclass
class RunState:
    """Where one run stands, read from its files."""

    name: str
    target: int
    trained: int  # last round trained (0: none)
    curve: list[list[float]]  # [[round, accuracy], ...]
    losses: list[list[float]]  # [[round, test loss], ...]
    checkpoint: int | None  # round of checkpoint.pt
    pid: int | None  # live process
    complete: bool
    segments: list[dict[str, Any]]
    results: dict[str, Any] | None

    @property
    def state(self) -> str:
        """``complete``, ``running``, ``stopped`` (resumable), ``failed`` or ``not started``."""
        if self.complete:
            return "complete"
        if self.pid is not None:
            return "running"
        if self.checkpoint is not None:
            return "stopped"
        return "failed" if self.segments else "not started"

    @property
    def wall_seconds(self) -> float:
        """Seconds the run's processes ran, summed (each up to its last progress update)."""
        return sum(segment_seconds(s) for s in self.segments)

    def eta_seconds(self) -> float | None:
        """Remaining seconds at the current process's pace (``None`` when not running)."""
        if self.pid is None or not self.segments:
            return None
        seg = self.segments[-1]
        done = self.trained - seg["start_round"]
        elapsed = segment_seconds(seg)
        if done <= 0 or elapsed <= 0:
            return None
        return float((self.target - self.trained) * elapsed / done)


def segment_seconds(segment: dict[str, Any]) -> float:
    """Seconds one process of a run ran, up to its last progress update."""
    return float(segment.get("updated_unix", segment["started_unix"]) - segment["started_unix"])


def checkpoint_round(path: Path) -> int | None:
    """The round a checkpoint was taken after (``None``: no readable checkpoint)."""
    from fedzo_flwr.errors import CheckpointError
    from fedzo_flwr.run.checkpoint import load_checkpoint

    if not path.is_file():
        return None
    try:
        return int(load_checkpoint(path)["round"])
    except CheckpointError:
        return None


def read_state(run: Run, out_dir: Path) -> RunState:
    """Read ``run``'s results, checkpoint, pid and segments."""
    run_dir = out_dir / run.name
    results = _read_json(run_dir / "results.json")
    rounds = results["rounds"] if results else []
    target = int(run.config["num-server-rounds"])
    trained = max((r["round"] for r in rounds if "train_loss" in r), default=0)
    curve = [[r["round"], r["accuracy"]] for r in rounds if "accuracy" in r]
    losses = [[r["round"], r["loss"]] for r in rounds if "loss" in r]
    pid_file = out_dir / f"{run.name}.pid"
    pid_text = pid_file.read_text().strip() if pid_file.is_file() else ""
    pid = int(pid_text) if pid_text.isdigit() and _alive(int(pid_text)) else None
    final = results.get("final", {}) if results else {}
    complete = final.get("rounds") == target == trained and final.get("accuracy") is not None
    return RunState(
        name=run.name,
        target=target,
        trained=trained,
        curve=curve,
        losses=losses,
        checkpoint=checkpoint_round(run_dir / "checkpoint.pt"),
        pid=pid,
        complete=complete,
        segments=_read_json(out_dir / f"{run.name}.segments.json") or [],
        results=results,
    )


# --------------------------------------------------------------------------- one run


def run_one(job: dict[str, Any]) -> int:
    """In this (background) process: run or resume one configuration to its last round."""
    import torch

    torch.set_num_threads(RUN_THREADS)
    from inprocess_grid import InProcessGrid, server_context

    import client_app.client_app as client_module
    from server_app.server_app import app as server_app

    # Flower's per-round INFO lines would bury the progress lines; warnings and errors stay.
    logging.getLogger("flwr").setLevel(logging.WARNING)

    config = dict(job["config"])
    out_dir = Path(config["output-dir"])
    name = config["run-name"]
    run_dir = out_dir / name
    target = int(config["num-server-rounds"])
    done = checkpoint_round(run_dir / "checkpoint.pt")
    if done is not None and done >= target:
        _say(f"{name}: already complete (checkpoint after round {done})")
        return 0
    if done is not None:
        config["resume-from"] = str(run_dir / "checkpoint.pt")
        _say(f"{name}: resuming from the checkpoint after round {done}")
    else:
        _say(f"{name}: starting ({target} rounds, K = {config['k']}, {job['clients']} clients)")
    segments_path = out_dir / f"{name}.segments.json"
    segments = _read_json(segments_path) or []
    now = time.time()
    segments.append(
        {
            "pid": os.getpid(),
            "start_round": done or 0,
            "round": done or 0,
            "started_unix": now,
            "updated_unix": now,
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
            "environment": environment(),
        }
    )
    _write_json(segments_path, segments)
    monitor = Monitor(
        run_dir / "results.json", segments_path, segments, target, job["poll"], done or -1, now
    )
    monitor.start()
    kill_at = job.get("kill_at_round")
    grid = InProcessGrid(
        client_module.app, job["clients"], config, _killer(int(kill_at)) if kill_at else None
    )
    try:
        server_app(grid, server_context(config))
    finally:
        monitor.stop()
    _say(f"{name}: done ({monitor.summary()})")
    return 0


def _killer(server_round: int) -> Any:
    """A grid intercept that kills this process (SIGKILL, no clean-up) in ``server_round``:
    the fault injection of the interrupted-run test."""

    def intercept(index: int, message: Any, reply: Any) -> Any:
        records = message.content.config_records
        if "config" in records and int(records["config"].get("server-round", 0)) >= server_round:
            os.kill(os.getpid(), signal.SIGKILL)
        return reply

    return intercept


class Monitor:
    """Prints one progress line per evaluated round (round, accuracy, pace, ETA) and keeps the
    current process's entry of ``<run>.segments.json`` up to date.

    A ``results.json`` older than this process (``since``) is the interrupted process's and is
    ignored; evaluations up to ``after`` (the checkpoint resumed from) were printed by then.
    """

    def __init__(
        self,
        results: Path,
        segments_path: Path,
        segments: list[dict[str, Any]],
        target: int,
        poll: float,
        after: int,
        since: float,
    ) -> None:
        self.results, self.segments_path, self.segments = results, segments_path, segments
        self.target, self.poll, self.since = target, poll, since
        self.last_printed = after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        """Start polling in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Poll once more, then stop."""
        self._stop.set()
        self._thread.join()
        self.check()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            self.check()

    def check(self) -> None:
        """Read ``results.json``; print new evaluations; update the segment."""
        try:
            if self.results.stat().st_mtime < self.since:
                return
        except OSError:
            return
        data = _read_json(self.results)
        if not data:
            return
        rounds = data["rounds"]
        trained = max((r["round"] for r in rounds if "train_loss" in r), default=0)
        seg = self.segments[-1]
        seg["round"], seg["updated_unix"] = max(trained, seg["start_round"]), time.time()
        _write_json(self.segments_path, self.segments)
        for entry in rounds:
            if "accuracy" in entry and entry["round"] > self.last_printed:
                self.last_printed = entry["round"]
                _say(self._line(entry, seg))

    def _line(self, entry: dict[str, Any], seg: dict[str, Any]) -> str:
        done = seg["round"] - seg["start_round"]
        elapsed = segment_seconds(seg)
        pace = f"{elapsed / done:.2f} s/round" if done > 0 else "-"
        eta = _duration((self.target - seg["round"]) * elapsed / done) if done > 0 else "-"
        return (
            f"round {entry['round']}/{self.target}  accuracy {100 * entry['accuracy']:.2f}%  "
            f"loss {entry['loss']:.4f}  |  {pace}, ETA {eta}"
        )

    def summary(self) -> str:
        """The last evaluation and this process's wall time."""
        seg = self.segments[-1]
        return (
            f"round {seg['round']}, last evaluated round {self.last_printed}, "
            f"{_duration(segment_seconds(seg))} in this process"
        )


def _say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", flush=True)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------ launching


def launch(run: Run, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """Start ``run`` in its own background process (own session; output to its log)."""
    job = {
        "config": run.config,
        "clients": args.clients,
        "poll": args.poll,
        "kill_at_round": args.kill_at_round,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PYTHONUNBUFFERED": "1"}
    with open(args.out_dir / f"{run.name}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--run-one", json.dumps(job)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
    (args.out_dir / f"{run.name}.pid").write_text(f"{proc.pid}\n")
    return proc


def refuse_incompatible(run: Run, out_dir: Path) -> str | None:
    """Why ``run`` cannot resume its checkpoint (other trajectory settings), or ``None``."""
    from fedzo_flwr.config import RunConfig
    from fedzo_flwr.errors import CheckpointError
    from fedzo_flwr.run.checkpoint import load_checkpoint

    path = out_dir / run.name / "checkpoint.pt"
    if not path.is_file():
        return None
    try:
        saved = RunConfig.from_run_config(load_checkpoint(path)["config"])
    except CheckpointError as err:
        return str(err)
    differing = saved.trajectory_differences(RunConfig.from_run_config(run.config))
    if not differing:
        return None
    return (
        f"its checkpoint was made with other settings ({', '.join(differing)}); keep them, "
        f"or move {out_dir / run.name} away to start afresh"
    )


def start(runs: list[Run], args: argparse.Namespace) -> int:
    """Start (or resume) every unfinished run that is not running; ``--wait``: until they end."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    refused = 0
    for run in runs:
        st = read_state(run, args.out_dir)
        if st.state == "complete":
            print(f"# {run.name}: complete ({st.target} rounds); nothing to do")
            continue
        if st.state == "running":
            print(f"# {run.name}: already running (pid {st.pid}), round {st.trained}")
            continue
        why = refuse_incompatible(run, args.out_dir)
        if why:
            print(f"# {run.name}: not resumed: {why}", file=sys.stderr)
            refused += 1
            continue
        procs[run.name] = launch(run, args)
        how = f"resuming after round {st.checkpoint}" if st.checkpoint else "starting"
        print(
            f"# {run.name}: {how}, pid {procs[run.name].pid}, "
            f"log {args.out_dir / (run.name + '.log')}",
            flush=True,
        )
    if not args.wait:
        if procs:
            print("# running in the background; `--status` shows progress, `--report` reports")
        return 1 if refused else 0
    codes = {name: proc.wait() for name, proc in procs.items()}
    for name, code in codes.items():
        print(f"# {name}: exit code {code}", flush=True)
    states = [read_state(run, args.out_dir) for run in runs]
    return 0 if all(s.complete for s in states) and not refused else 1


def status(runs: list[Run], out_dir: Path) -> int:
    """Print where each run stands."""
    print(f"# runs under {out_dir}")
    print("| run | state | round | last accuracy | checkpoint | wall | ETA |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        st = read_state(run, out_dir)
        acc = f"{100 * st.curve[-1][1]:.2f}% @ {st.curve[-1][0]}" if st.curve else "-"
        state = st.state + (f" (pid {st.pid})" if st.pid else "")
        eta = st.eta_seconds()
        print(
            f"| {run.name} | {state} | {st.trained}/{st.target} | {acc} "
            f"| {st.checkpoint if st.checkpoint is not None else '-'} "
            f"| {_duration(st.wall_seconds)} | {_duration(eta) if eta is not None else '-'} |"
        )
    return 0


# ------------------------------------------------------------- carrying runs elsewhere

CARRIED = ("{name}/checkpoint.pt", "{name}/results.json", "{name}.segments.json", "{name}.log")
"""A run's files that resume it and report it elsewhere (paths under the out-dir)."""


def stop(runs: list[Run], out_dir: Path, wait_s: float = 60.0) -> int:
    """SIGTERM every live run process (by its pid file) and wait for it to exit.

    The checkpoint is written atomically, so a stopped run resumes from its latest one; the
    rounds after it are trained again.
    """
    live = [st for st in (read_state(run, out_dir) for run in runs) if st.pid is not None]
    for st in live:
        assert st.pid is not None
        os.kill(st.pid, signal.SIGTERM)
        print(
            f"# {st.name}: stopped pid {st.pid} at round {st.trained} (checkpoint {st.checkpoint})"
        )
    deadline = time.monotonic() + wait_s
    while any(_alive(st.pid) for st in live if st.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [st.name for st in live if st.pid and _alive(st.pid)]
    if left:
        print(f"# still running after {wait_s:.0f} s: {', '.join(left)}", file=sys.stderr)
        return 1
    return 0


def pack(runs: list[Run], out_dir: Path, archive: Path) -> int:
    """Write every run's :data:`CARRIED` files to ``archive`` (``.tar.xz``), to carry unfinished
    runs to another checkout or machine (``--unpack`` there, then the usual command resumes).
    Refused while a run is running (``--stop`` first)."""
    states = [read_state(run, out_dir) for run in runs]
    live = [st.name for st in states if st.pid is not None]
    if live:
        print(f"# not packed: running: {', '.join(live)} (--stop first)", file=sys.stderr)
        return 1
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:xz") as tar:
        for st in states:
            files = [f.format(name=st.name) for f in CARRIED]
            for rel in files:
                if (out_dir / rel).is_file():
                    tar.add(out_dir / rel, arcname=rel)
            print(f"# {st.name}: {st.state}, round {st.trained}, checkpoint {st.checkpoint}")
    os.replace(partial, archive)
    print(f"# packed into {archive} ({archive.stat().st_size:,} B)")
    return 0


def unpack(runs: list[Run], out_dir: Path, archive: Path) -> int:
    """Extract a ``--pack`` archive into ``out_dir``: only the :data:`CARRIED` files of this
    plan's runs, and never over a file that exists (each refusal named)."""
    allowed = {f.format(name=run.name) for run in runs for f in CARRIED}
    with tarfile.open(archive, "r:xz") as tar:
        members = tar.getmembers()
        strange = [m.name for m in members if m.name not in allowed or not m.isfile()]
        there = [m.name for m in members if (out_dir / m.name).exists()]
        if strange or there:
            if strange:
                print(f"# not unpacked: not a run file of this plan: {strange}", file=sys.stderr)
            if there:
                print(f"# not unpacked: would overwrite {there} under {out_dir}", file=sys.stderr)
            return 1
        out_dir.mkdir(parents=True, exist_ok=True)
        tar.extractall(out_dir, members=members, filter="data")
    print(f"# unpacked {len(members)} files into {out_dir}")
    return status(runs, out_dir)


# --------------------------------------------------------------------------- report


def _relative(path: str | Path) -> str:
    return os.path.relpath(Path(path).resolve(), ROOT)


def collect(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    """The report's data: settings, machine, and per run its curve, state and wall time."""
    from fedzo_flwr.config import BOOKKEEPING_KEYS

    recipe = {
        k: v
        for k, v in runs[0].config.items()
        if k not in BOOKKEEPING_KEYS and k not in METHODS["zo-pruned"] and k != "alpha"
    }
    out: dict[str, Any] = {
        "info": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine_info(RUN_THREADS),
            "rounds": args.rounds,
            "k": args.k,
            "clients": args.clients,
            "alphas": list(args.alphas),
            "checkpoint_every": args.checkpoint_every,
            "eval_every": runs[0].config["eval-every"],
            "recipe": recipe,
            "overrides": args.overrides,
            "methods": {m: METHODS[m] for m in args.methods},
            "data_dir_rel": _relative(args.data_dir),
            "out_dir_rel": _relative(args.out_dir),
            "command": command_line(args),
            "paper": {"k": PAPER_K, "rounds": PAPER_ROUNDS, "clients": CLIENTS},
        },
        "runs": [],
    }
    for run in runs:
        st = read_state(run, args.out_dir)
        results = st.results or {}
        environments = [s["environment"] for s in st.segments if "environment" in s]
        out["runs"].append(
            {
                "name": run.name,
                "method": run.method,
                "alpha": run.alpha,
                "state": st.state,
                "complete": st.complete,
                "rounds_done": st.trained,
                "target_rounds": st.target,
                "checkpoint_round": st.checkpoint,
                "curve": st.curve,
                "loss_curve": st.losses,
                "wall_seconds": st.wall_seconds,
                "processes": len(st.segments),
                "segments": [
                    {
                        "start_round": seg["start_round"],
                        "round": seg["round"],
                        "seconds": segment_seconds(seg),
                        "started_utc": seg["started_utc"],
                    }
                    for seg in st.segments
                ],
                "same_environment_throughout": all(e == environments[0] for e in environments),
                "environment": results.get("environment"),
                "setup": {
                    k: results.get("setup", {}).get(k)
                    for k in ("density", "kept_coordinates", "client_round_forward_flops")
                },
            }
        )
    return out


def command_line(args: argparse.Namespace) -> str:
    """The command that starts (and, re-run, resumes) these runs."""
    parts = ["python benchmarks/paper_scale.py"]
    if list(args.alphas) != ["0.5"]:
        parts.append("--alphas " + " ".join(args.alphas))
    if list(args.methods) != list(METHODS):
        parts.append("--methods " + " ".join(args.methods))
    for flag, value, default in (
        ("--rounds", args.rounds, PAPER_ROUNDS),
        ("--k", args.k, PAPER_K),
        ("--clients", args.clients, CLIENTS),
        ("--checkpoint-every", args.checkpoint_every, 100),
    ):
        if value != default:
            parts.append(f"{flag} {value}")
    parts += [f"--set {item}" for item in args.set]
    return " ".join(parts)


def report(runs: list[Run], args: argparse.Namespace) -> int:
    """Write the JSON, the figure and ``docs/results.md`` (via the report generator)."""
    from paper_report import rebuild_results_md
    from paper_scale_report import plot_paper_scale

    data = collect(runs, args)
    data["info"]["machine"]["load_after"] = load_average()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    plot_paper_scale(data, args.figure)
    rebuilt = rebuild_results_md(args.results_md)
    print(f"# wrote {args.json}, {args.figure}" + (f", {args.results_md}" if rebuilt else ""))
    return 0


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", nargs="+", default=["0.5"], help="Dirichlet α values")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=PAPER_ROUNDS)
    parser.add_argument("--k", type=int, default=PAPER_K)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], help="key=value for both rows")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--wait", action="store_true", help="wait for the runs to end")
    parser.add_argument("--poll", type=float, default=20.0, help="seconds between progress checks")
    parser.add_argument("--status", action="store_true", help="print where each run stands")
    parser.add_argument("--stop", action="store_true", help="stop the running runs (SIGTERM)")
    parser.add_argument("--pack", type=Path, default=None, help="write the runs to a .tar.xz")
    parser.add_argument("--unpack", type=Path, default=None, help="restore a --pack archive")
    parser.add_argument("--report", action="store_true", help="write the JSON, plot, results.md")
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    parser.add_argument("--figure", type=Path, default=FIGURE_PATH)
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    parser.add_argument("--kill-at-round", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        return run_one(json.loads(args.run_one))
    args.overrides = parse_set(args.set)
    args.data_dir = data_dir(args.data_dir).resolve()
    args.out_dir = args.out_dir.resolve()
    runs = plan(args)
    if args.status:
        return status(runs, args.out_dir)
    if args.stop:
        return stop(runs, args.out_dir)
    if args.pack:
        return pack(runs, args.out_dir, args.pack.resolve())
    if args.unpack:
        return unpack(runs, args.out_dir, args.unpack.resolve())
    if args.report:
        return report(runs, args)
    return start(runs, args)


if __name__ == "__main__":
    sys.exit(main())
