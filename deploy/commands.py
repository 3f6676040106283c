"""The subcommands: ``up``, ``down``, ``status`` and ``run`` (``node`` is in :mod:`deploy.nodes`).

``up`` starts one SuperLink and N SuperNodes on 127.0.0.1 and records their PIDs; ``down``
stops exactly those PIDs (SIGTERM, then SIGKILL after a timeout) plus the helper processes they
had spawned (their SuperExecs and any app process still running), identified by PID and start
time, never by name. These functions are also the API the deployment test uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

from deploy.certs import CERTIFICATES, ensure_certs, expiry
from deploy.data import require_data
from deploy.errors import DeployError
from deploy.flower_cli import cli_env, daemon_env, flwr_cli, register_key, superlink_argv
from deploy.nodes import start_supernode, wait_online, wait_superlink
from deploy.ports import port_in_use
from deploy.processes import forget, is_running, spawn, stop_records
from deploy.run_config import checked_run_config
from deploy.runs import EXIT_INTERRUPTED, follow_run, outcome, submit_run
from deploy.state import (
    CONNECTION,
    DEFAULT_STATE_DIR,
    MODES,
    ROOT,
    STATE_FILE,
    Layout,
    State,
    display_path,
    layout_of,
    load_state,
    make_key,
    require_state,
    save_state,
    write_cli_config,
)

PROG = "python -m deploy"


def up(
    mode: str = "tls-auth",
    nodes: int = 2,
    data_dir: str | Path | None = None,
    state_dir: str | Path = DEFAULT_STATE_DIR,
    port: int = 9093,
    node_port_base: int | None = None,
    node_ports: Sequence[int] | None = None,
    timeout: float = 120.0,
    keep_state: bool = False,
    quiet: bool = False,
    node_data_dir: str | None = None,
    node_cache_dir: str | None = None,
    dataset: str | None = None,
) -> State:
    """Start a SuperLink and ``nodes`` SuperNodes on 127.0.0.1; return the deployment state.

    ``data_dir`` is the ServerApp's (the test set) and, by default, every node's ``data-dir``;
    it must hold ``dataset`` (None: CIFAR-10 or CIFAR-100). ``node_data_dir`` /
    ``node_cache_dir`` (``{i}`` = node index) give each SuperNode its own ``data-dir`` in
    ``--node-config`` and its own ``$FEDZO_CACHE_DIR``, as separate devices have (e.g. an
    empty data folder plus a partition file from scripts/split_partitions.py).

    Blocks until the SuperLink listens and every SuperNode is online (bounded by
    ``timeout``). On any failure it stops what it started and raises :class:`DeployError`.
    """
    if mode not in MODES:
        raise DeployError(f"mode must be one of {MODES}, got {mode!r}")
    if nodes < 1:
        raise DeployError("need at least one SuperNode")
    data = Path(data_dir or os.environ.get("FEDZO_DATA_DIR") or ROOT.parent / "shared" / "data")
    data = data.expanduser().resolve()
    require_data(data, dataset)
    layout = layout_of(state_dir)
    old = load_state(layout.root)
    if old and any(is_running(r) for r in old["processes"].values()):
        raise DeployError(f"a deployment is already running from {layout.root}: `down` it first")
    if node_ports is None:
        base = node_port_base if node_port_base is not None else port + 1
        node_ports = [base + i for i in range(nodes)]
    node_ports = [int(p) for p in node_ports]
    if len(node_ports) != nodes:
        raise DeployError("need one node port per SuperNode")
    check_ports(port, node_ports)

    for folder in (layout.logs, layout.pids):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    layout.database.parent.mkdir(parents=True, exist_ok=True)
    if not keep_state:
        for path in layout.database.parent.glob("state.db*"):
            path.unlink()
    if mode != "insecure":
        renewed = ensure_certs(layout)
        if renewed and not quiet:
            print(renewed)
    write_cli_config(layout, mode, port)
    state: State = {
        "mode": mode,
        "nodes": nodes,
        "port": port,
        "node_ports": node_ports,
        "data_dir": str(data),
        "node_data_dir": node_data_dir,
        "node_cache_dir": node_cache_dir,
        "connection": CONNECTION,
        "flwr_home": str(layout.cli_home),
        "processes": {},
    }
    save_state(layout, state)
    try:
        link = spawn(
            layout,
            "superlink",
            superlink_argv(layout, mode, port),
            daemon_env(layout, "superlink", str(data)),
        )
        state["processes"]["superlink"] = link
        save_state(layout, state)
        wait_superlink(link, port, timeout)
        node_ids: dict[str, int] = {}
        if mode == "tls-auth":
            for i in range(nodes):
                key = make_key(layout.keys / f"node{i}")
                node_id = register_key(layout, key.with_suffix(".pub"))
                if node_id is not None:
                    node_ids[f"supernode-{i}"] = node_id
        state["registered"] = node_ids
        save_state(layout, state)
        records = [start_supernode(layout.root, i) for i in range(nodes)]
        wait_online(layout, records, nodes, timeout)
        state = require_state(layout)
    except BaseException:
        current = load_state(layout.root) or state
        stop_records(list(current["processes"].values()))
        for name in current["processes"]:
            layout.pid_file(name).unlink(missing_ok=True)
        raise
    if not quiet:
        print(summary(layout, state))
    return state


def port_roles(port: int, node_ports: Sequence[int]) -> dict[int, str]:
    """What each port of a deployment serves (the SuperLink's, then each node's Runtime API)."""
    roles = {port: "the SuperLink"}
    for i, node_port in enumerate(node_ports):
        roles.setdefault(node_port, f"supernode-{i}'s Runtime API")
    return roles


def check_ports(port: int, node_ports: Sequence[int]) -> None:
    """Refuse ports that repeat or that something on 127.0.0.1 already holds, naming each.

    A stock ``flower-supernode`` started by hand takes 9094 (its default ``--port``), the port
    ``up``'s first SuperNode gets by default (``--port`` 9093 + 1).
    """
    wanted = [port, *node_ports]
    repeated = sorted({p for p in wanted if wanted.count(p) > 1})
    if repeated:
        raise DeployError(
            f"port(s) {repeated} given twice (SuperLink {port}, SuperNodes "
            f"{', '.join(map(str, node_ports))}): every daemon needs its own"
        )
    roles = port_roles(port, node_ports)
    busy = [p for p in wanted if port_in_use(p)]
    if busy:
        which = ", ".join(f"{p} ({roles[p]})" for p in busy)
        hint = (
            " (9094 is also the default --port of a flower-supernode started by hand)"
            if 9094 in busy
            else ""
        )
        raise DeployError(
            f"port(s) {busy} on 127.0.0.1 already in use: {which}{hint}; choose free ones "
            "with --port (SuperLink) and --node-port-base (SuperNode i: base+i)"
        )


def summary(layout: Layout, state: State) -> str:
    """What ``up`` prints: addresses, PIDs, log paths, how to run and stop."""
    scheme = "http" if state["mode"] == "insecure" else "https"
    rel = display_path(layout.root)
    procs = state["processes"]
    where = "" if rel == ".deploy" else f" --state-dir {rel}"
    roles = port_roles(state["port"], state["node_ports"])
    ports = ", ".join(f"{p} ({role.removeprefix('the ')})" for p, role in roles.items())
    lines = [
        f"[deploy] mode {state['mode']}: SuperLink {scheme}://127.0.0.1:{state['port']} "
        f"(pid {procs['superlink']['pid']}), {state['nodes']} SuperNode(s) online "
        f"(Runtime API ports {', '.join(map(str, state['node_ports']))})",
        f"  data:      {state['data_dir']} (each node: --node-config partition-id=i "
        f"num-partitions={state['nodes']} data-dir=...)",
        "  logs:",
        *[
            f"    {name:<12} pid {r['pid']:<8} {display_path(Path(r['log']))}"
            for name, r in procs.items()
        ],
        f"  ports:     {ports} on 127.0.0.1 (a flower-supernode started by hand on this host "
        "needs a --port of its own)",
        f"  pid files: {rel}/pids/   state: {rel}/{STATE_FILE}",
    ]
    if state["mode"] != "insecure":
        until = min(expiry(layout.certs / name) for name in CERTIFICATES)
        lines.append(
            f"  TLS:       CA {rel}/certs/ca.crt, server cert {rel}/certs/server.pem "
            f"(valid until {until:%Y-%m-%d %H:%M} UTC; `up` renews them a day before)"
        )
    if state["mode"] == "tls-auth":
        lines.append(f"  auth keys: {rel}/keys/node<i> (registered: {state.get('registered')})")
    lines += [
        f"  run:       {PROG} run 'num-server-rounds=3'{where}",
        f"             (= FLWR_HOME={rel}/flwr-home flwr run . {CONNECTION} --stream ...)",
        f"  stop:      {PROG} down{where}",
    ]
    return "\n".join(lines)


def down(
    state_dir: str | Path = DEFAULT_STATE_DIR,
    timeout: float = 15.0,
    purge: bool = False,
    quiet: bool = False,
) -> list[str]:
    """Stop every process the deployment recorded (SuperNodes first), by PID.

    Returns the names of the processes that were running. Logs, certificates and keys stay
    unless ``purge`` (then the whole state directory is removed).
    """
    layout = layout_of(state_dir)
    state = load_state(layout.root)
    if state is None:
        if not quiet:
            print(f"[deploy] nothing to stop: no {STATE_FILE} in {layout.root}")
        return []
    records = list(state["processes"].values())
    records.sort(key=lambda r: r["name"] == "superlink")  # SuperNodes first
    running = [r["name"] for r in records if is_running(r)]
    for record in records:
        if is_running(record) and not quiet:
            print(f"[deploy] stopping {record['name']} (pid {record['pid']})")
    stop_records([r for r in records if r["name"] != "superlink"], timeout=timeout)
    stop_records([r for r in records if r["name"] == "superlink"], timeout=timeout)
    for record in records:
        layout.pid_file(record["name"]).unlink(missing_ok=True)
        forget(int(record["pid"]))
    if purge:
        shutil.rmtree(layout.root)
    elif not quiet:
        print(f"[deploy] stopped; logs kept in {display_path(layout.logs)}/")
    return running


def status(state_dir: str | Path = DEFAULT_STATE_DIR) -> int:
    """Print the processes and `flwr supernode list`; 0 if all are running, else 3."""
    layout = layout_of(state_dir)
    state = load_state(layout.root)
    if state is None:
        print(f"[deploy] no deployment in {layout.root}")
        return 1
    print(
        f"[deploy] mode {state['mode']}, SuperLink 127.0.0.1:{state['port']}, "
        f"{state['nodes']} node(s), data {state['data_dir']}"
    )
    alive = {}
    for name, record in state["processes"].items():
        alive[name] = is_running(record)
        print(
            f"  {name:<12} pid {record['pid']:<8} {'running' if alive[name] else 'stopped':<8}"
            f" log {display_path(Path(record['log']))}"
        )
    if alive.get("superlink"):
        proc = flwr_cli(layout, "supernode", "list", CONNECTION, check=False)
        print(proc.stdout.rstrip() or proc.stderr.rstrip())
    return 0 if all(alive.values()) else 3


@overload
def run_app(
    state_dir: str | Path = ...,
    run_config: str = ...,
    *,
    stream: bool = ...,
    app_dir: str | Path = ...,
    background: Literal[False] = ...,
    **popen_kwargs: Any,
) -> int: ...


@overload
def run_app(
    state_dir: str | Path = ...,
    run_config: str = ...,
    *,
    stream: bool = ...,
    app_dir: str | Path = ...,
    background: Literal[True],
    **popen_kwargs: Any,
) -> subprocess.Popen[Any]: ...


def run_app(
    state_dir: str | Path = DEFAULT_STATE_DIR,
    run_config: str = "",
    *,
    stream: bool = True,
    app_dir: str | Path = ROOT,
    background: bool = False,
    **popen_kwargs: Any,
) -> int | subprocess.Popen[Any]:
    """Run the app on the deployment and report what became of it; ``run``'s exit status.

    The run config is checked first (:func:`deploy.run_config.checked_run_config`: unknown
    keys, invalid values and a dataset missing from its ``data-dir`` raise
    :class:`DeployError` naming the key, before anything is submitted). ``data-dir`` (the
    deployment's) and ``output-dir`` (``outputs/`` of the repository) are added unless
    ``run_config`` sets them: the ServerApp runs with the SuperLink's working directory, so
    relative paths would land in the state directory. Then the run is submitted, its log
    followed (shown if ``stream``) and its recorded outcome printed (:mod:`deploy.runs`):
    0 if it completed, :data:`deploy.runs.EXIT_FAILED` if it failed or was stopped,
    :data:`deploy.runs.EXIT_UNFINISHED` if it had not finished. ``popen_kwargs`` go to the
    ``flwr log`` process that shows the log.

    With ``background`` the checks run here and the rest runs in a ``python -m deploy run``
    child, whose :class:`subprocess.Popen` is returned (its exit status is the same verdict).
    """
    layout = layout_of(state_dir)
    state = require_state(layout)
    app = Path(app_dir).resolve()
    config = checked_run_config(run_config, state["data_dir"], app)
    if background:
        argv = [sys.executable, "-m", "deploy", "--state-dir", str(layout.root), "run"]
        argv += [run_config, "--app-dir", str(app), *([] if stream else ["--no-stream"])]
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**cli_env(layout), "PYTHONPATH": path}
        return subprocess.Popen(argv, **{"env": env, "cwd": ROOT, **popen_kwargs})
    run_id = submit_run(layout, state, app, config)
    print(f"[deploy] run {run_id} submitted; its log: `flwr log {run_id} {CONNECTION}`", flush=True)
    try:
        follow_run(layout, run_id, stream=stream, **popen_kwargs)
    except KeyboardInterrupt:
        print(
            f"[deploy] stopped following run {run_id}; it goes on "
            f"(FLWR_HOME={layout.cli_home} flwr stop {run_id} {CONNECTION} stops it)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    result = outcome(layout, run_id)
    print(result.describe(), file=sys.stdout if result.completed else sys.stderr, flush=True)
    return result.exit_status
