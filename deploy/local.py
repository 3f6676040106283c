"""Alias of :mod:`deploy` kept for existing command lines: ``python -m deploy.local ...``.

The same command line as ``python -m deploy`` (:mod:`deploy.cli`), and the names the
deployment tests use, re-exported from the modules that define them.
"""

from __future__ import annotations

import sys

from deploy.certs import ensure_certs, expiry, renewal_reason
from deploy.cli import main
from deploy.commands import down, run_app, status, summary, up
from deploy.errors import DeployError
from deploy.flower_cli import (
    OFFLINE_ENV,
    SUPERNODE_EXIT_CODES,
    cli_env,
    daemon_env,
    flower_bin,
    flower_exit_code,
    flwr_cli,
    list_supernodes,
    node_config,
    node_path,
    register_key,
    superlink_argv,
    supernode_argv,
    toml_string,
)
from deploy.nodes import start_supernode, stop_process, wait_online, wait_superlink
from deploy.ports import free_port, port_in_use, port_open
from deploy.processes import exit_code, is_running, log_tail, spawn, stop_records, wait_exit
from deploy.run_config import checked_run_config
from deploy.runs import EXIT_FAILED, EXIT_UNFINISHED, RunOutcome, outcome, submit_run
from deploy.state import (
    CONNECTION,
    DEFAULT_STATE_DIR,
    MODES,
    ROOT,
    STATE_FILE,
    Layout,
    load_state,
    make_key,
    save_state,
    write_cli_config,
)

__all__ = [
    "CONNECTION",
    "DEFAULT_STATE_DIR",
    "EXIT_FAILED",
    "EXIT_UNFINISHED",
    "MODES",
    "OFFLINE_ENV",
    "ROOT",
    "STATE_FILE",
    "SUPERNODE_EXIT_CODES",
    "DeployError",
    "Layout",
    "RunOutcome",
    "checked_run_config",
    "cli_env",
    "daemon_env",
    "down",
    "ensure_certs",
    "exit_code",
    "expiry",
    "flower_bin",
    "flower_exit_code",
    "flwr_cli",
    "free_port",
    "is_running",
    "list_supernodes",
    "load_state",
    "log_tail",
    "main",
    "make_key",
    "node_config",
    "node_path",
    "outcome",
    "port_in_use",
    "port_open",
    "register_key",
    "renewal_reason",
    "run_app",
    "save_state",
    "spawn",
    "start_supernode",
    "status",
    "stop_process",
    "stop_records",
    "submit_run",
    "summary",
    "superlink_argv",
    "supernode_argv",
    "toml_string",
    "up",
    "wait_exit",
    "wait_online",
    "wait_superlink",
    "write_cli_config",
]

if __name__ == "__main__":
    sys.exit(main(prog="python -m deploy.local"))
