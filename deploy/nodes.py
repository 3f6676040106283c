"""The daemons of a running deployment: start or stop one, wait until they are up."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.errors import DeployError
from deploy.flower_cli import (
    SUPERNODE_EXIT_CODES,
    daemon_env,
    flower_exit_code,
    list_supernodes,
    node_config,
    node_path,
    supernode_argv,
)
from deploy.ports import port_in_use, port_open
from deploy.processes import Record, exit_code, is_running, log_tail, spawn, stop_records
from deploy.state import Layout, layout_of, require_state, save_state


def start_supernode(
    state_dir: str | Path,
    index: int,
    *,
    name: str | None = None,
    key: Path | None = None,
    port: int | None = None,
) -> Record:
    """Start SuperNode ``index`` of a running deployment (again), or an extra one.

    With ``name`` and ``key`` it starts an additional SuperNode under that name with that
    private key (which need not be registered: the test of a refused node uses this). The new
    record is added to the deployment's state so that ``down`` stops it too.
    """
    layout = layout_of(state_dir)
    state = require_state(layout)
    name = name or f"supernode-{index}"
    old = state["processes"].get(name)
    if old is not None and is_running(old):
        raise DeployError(f"{name} is already running (pid {old['pid']})")
    if old is not None and name.startswith("supernode-") and key is None and port is None:
        argv = old["argv"]
    else:
        if key is None and state["mode"] == "tls-auth":
            key = layout.keys / f"node{index}"
        port = port if port is not None else state["node_ports"][index]
        argv = supernode_argv(
            layout,
            state["mode"],
            state["port"],
            port,
            node_config(
                index,
                state["nodes"],
                node_path(state.get("node_data_dir"), index) or state["data_dir"],
            ),
            key,
        )
    node_port = int(argv[argv.index("--port") + 1])
    if port_in_use(node_port):
        raise DeployError(
            f"port {node_port} on 127.0.0.1 ({name}'s Runtime API) is already in use, e.g. by "
            "a flower-supernode started by hand (give that one another --port)"
        )
    env = daemon_env(layout, name, state["data_dir"])
    cache = node_path(state.get("node_cache_dir"), index)
    if cache:
        env["FEDZO_CACHE_DIR"] = cache
    record = spawn(layout, name, argv, env)
    state["processes"][name] = record
    save_state(layout, state)
    return record


def stop_process(state_dir: str | Path, name: str, *, kill: bool = False) -> None:
    """Stop one daemon of the deployment by its recorded PID (SIGKILL if ``kill``)."""
    layout = layout_of(state_dir)
    state = require_state(layout)
    record = state["processes"].get(name)
    if record is None:
        raise DeployError(f"no process named {name}; known: {sorted(state['processes'])}")
    stop_records([record], sig=signal.SIGKILL if kill else signal.SIGTERM)
    layout.pid_file(name).unlink(missing_ok=True)


def wait_superlink(record: Record, port: int, timeout: float) -> None:
    """Wait until the SuperLink listens on ``port``; fail fast if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(record):
            raise DeployError(
                f"the SuperLink exited (rc {exit_code(record)}); log {record['log']}:\n"
                + log_tail(record["log"])
            )
        if port_open(port) and "running on" in log_tail(record["log"], 200):
            return
        time.sleep(0.5)
    raise DeployError(f"the SuperLink did not listen on port {port} within {timeout:.0f}s")


def wait_online(
    layout: Layout, records: Sequence[Record], want: int, timeout: float
) -> list[dict[str, Any]]:
    """Poll ``flwr supernode list`` until ``want`` nodes are online; fail if a node exits."""
    deadline = time.monotonic() + timeout
    nodes: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        for record in records:
            if not is_running(record):
                code = flower_exit_code(record)
                why = SUPERNODE_EXIT_CODES.get(code or 0, "")
                raise DeployError(
                    f"{record['name']} exited (rc {exit_code(record)}, Flower exit code {code}"
                    f"{': ' + why if why else ''}); "
                    f"log {record['log']}:\n{log_tail(record['log'])}"
                )
        nodes = list_supernodes(layout)
        if sum(n.get("status") == "online" for n in nodes) >= want:
            return nodes
        time.sleep(1.0)
    raise DeployError(
        f"only {sum(n.get('status') == 'online' for n in nodes)} of {want} SuperNodes came "
        f"online within {timeout:.0f}s: {nodes}"
    )
