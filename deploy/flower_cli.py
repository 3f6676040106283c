"""Flower's command lines: ``flower-superlink``, ``flower-supernode`` and the ``flwr`` CLI.

Modes: ``insecure`` (plain HTTP), ``tls`` (certificates from ``deploy/gen_certs.sh``) and
``tls-auth`` (TLS plus SuperNode authentication: one ECDSA P-384 key pair per node, registered
with ``flwr supernode register`` before the node starts).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from deploy.errors import DeployError
from deploy.processes import Record, log_tail
from deploy.state import CONNECTION, ROOT, Layout

# Offline switches (the team notes on Flower 1.41, section 8).
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}

# Flower exit codes (flwr.supercore.exit) worth explaining. A daemon logs "Exit Code: <code>"
# and then exits with OS status 1 (flwr_exit maps every error code to 1).
SUPERNODE_EXIT_CODES = {
    303: "authentication needs TLS (--insecure with a private key)",
    305: "could not establish a connection (e.g. its public key is not registered)",
}


def flower_bin(name: str) -> str:
    """Path of a Flower console script: beside this Python first, then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found (install flwr==1.41.0 in this environment)")
    return found


def toml_string(value: str) -> str:
    r"""``value`` as a TOML string that Flower's ``--node-config``/``--run-config`` parser keeps.

    Flower 1.41 splits those options with the regex ``key=('...'|"..."|\\S+)`` and then parses
    each value as TOML, so a value may hold spaces inside quotes but not the quote character
    that delimits it. A TOML literal string ('...') needs no escaping at all; a path holding a
    single quote falls back to a basic string ("...") with backslashes escaped.
    """
    if "\n" in value:
        raise DeployError(f"a newline cannot be passed through --node-config: {value!r}")
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return '"' + value.replace("\\", "\\\\") + '"'
    raise DeployError(f"a value with both ' and \" cannot be passed through Flower: {value!r}")


def node_path(pattern: str | None, index: int) -> str | None:
    """``pattern`` with ``{i}`` replaced by the node index (None stays None)."""
    return None if not pattern else str(Path(pattern.replace("{i}", str(index))).expanduser())


def node_config(partition_id: int, num_partitions: int, data_dir: str | Path) -> str:
    """The ``--node-config`` string of one SuperNode."""
    return (
        f"partition-id={partition_id} num-partitions={num_partitions} "
        f"data-dir={toml_string(str(data_dir))}"
    )


def cli_env(layout: Layout) -> dict[str, str]:
    """Environment for ``flwr`` CLI calls against this deployment."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **OFFLINE_ENV,
        "FLWR_HOME": str(layout.cli_home),
        "MPLCONFIGDIR": str(layout.root / "mpl"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def daemon_env(layout: Layout, name: str, data_dir: str) -> dict[str, str]:
    """Environment of one daemon (inherited by the SuperExec and app processes it starts)."""
    env = cli_env(layout)
    env["FLWR_HOME"] = str(layout.daemon_home(name))
    env.setdefault("FEDZO_DATA_DIR", data_dir)
    env.setdefault("FEDZO_OUTPUT_DIR", str(ROOT / "outputs"))
    return env


def flwr_cli(
    layout: Layout, *args: str, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr <args>`` with this deployment's FLWR_HOME."""
    proc = subprocess.run(
        [flower_bin("flwr"), *args],
        env=cli_env(layout),
        cwd=layout.root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode:
        raise DeployError(
            f"flwr {' '.join(args)} failed (rc {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


def list_supernodes(layout: Layout) -> list[dict[str, Any]]:
    """``flwr supernode list --format json``: one dict per node (node_id, status, ...)."""
    proc = flwr_cli(layout, "supernode", "list", CONNECTION, "--format", "json", check=False)
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return []
    if not isinstance(data, dict) or not data.get("success", True):
        return []
    return list(data.get("nodes", []))


def register_key(layout: Layout, public_key: Path) -> int | None:
    """``flwr supernode register``: the node id the SuperLink assigned (None: already known).

    ``flwr supernode register --format json`` exits 0 even when it fails, so the JSON's
    ``success`` field decides; "Public key already in use" (a kept database) is not an error.
    """
    proc = flwr_cli(
        layout, "supernode", "register", str(public_key), CONNECTION, "--format", "json"
    )
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise DeployError(f"unexpected output of flwr supernode register: {proc.stdout}") from None
    if data.get("success"):
        return int(data["node-id"])
    error = str(data.get("error-message", data))
    if "already in use" in error:
        return None
    raise DeployError(f"flwr supernode register {public_key} failed: {error}")


def superlink_argv(layout: Layout, mode: str, port: int) -> list[str]:
    """The flower-superlink command line of ``mode``."""
    argv = [flower_bin("flower-superlink")]
    if mode == "insecure":
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile",
            str(layout.certs / "ca.crt"),
            "--ssl-certfile",
            str(layout.certs / "server.pem"),
            "--ssl-keyfile",
            str(layout.certs / "server.key"),
        ]
    if mode == "tls-auth":
        argv.append("--enable-supernode-auth")
    return [
        *argv,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        "--database",
        str(layout.database),
    ]


def supernode_argv(
    layout: Layout,
    mode: str,
    superlink_port: int,
    port: int,
    config: str,
    key: Path | None,
) -> list[str]:
    """The flower-supernode command line of ``mode`` (``key``: its auth private key)."""
    argv = [flower_bin("flower-supernode")]
    if mode == "insecure":
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(layout.certs / "ca.crt")]
    argv += ["--superlink", f"127.0.0.1:{superlink_port}"]
    if key is not None:
        argv += ["--auth-supernode-private-key", str(key)]
    return [*argv, "--host", "127.0.0.1", "--port", str(port), "--node-config", config]


def flower_exit_code(record: Record) -> int | None:
    """The Flower exit code a daemon logged ("Exit Code: 305"), if any."""
    found = re.findall(r"Exit Code: (\d+)", log_tail(record["log"], 200))
    return int(found[-1]) if found else None
