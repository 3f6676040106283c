"""The state directory of a deployment: its layout, its record and the nodes' keys.

Everything lives in the state directory (default ``.deploy/`` in the repository): ``certs/``
(made and renewed by :mod:`deploy.certs`), ``keys/``, ``logs/<daemon>.log``,
``pids/<daemon>.pid``, the SuperLink database, one Flower home per daemon under ``home/``,
``flwr-home/config.toml`` (the ``flwr`` CLI's connection :data:`CONNECTION`) and
``deployment.json`` (the record of what runs, read by every command).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.errors import DeployError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = ROOT / ".deploy"
CONNECTION = "fedzo-local"
MODES = ("insecure", "tls", "tls-auth")
STATE_FILE = "deployment.json"
TLS_FILES = ("ca.crt", "server.pem", "server.key")

State = dict[str, Any]
"""The deployment record (``deployment.json``): mode, ports, data folders, processes."""


@dataclass(frozen=True)
class Layout:
    """Paths inside a deployment's state directory."""

    root: Path

    @property
    def certs(self) -> Path:
        """The CA and the SuperLink's certificate and key."""
        return self.root / "certs"

    @property
    def keys(self) -> Path:
        """The SuperNodes' authentication key pairs (``node<i>``, ``node<i>.pub``)."""
        return self.root / "keys"

    @property
    def logs(self) -> Path:
        """One log file per daemon."""
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        """One PID file per daemon."""
        return self.root / "pids"

    @property
    def database(self) -> Path:
        """The SuperLink's database."""
        return self.root / "superlink" / "state.db"

    @property
    def cli_home(self) -> Path:
        """FLWR_HOME of the ``flwr`` CLI (holds ``config.toml`` with the connection)."""
        return self.root / "flwr-home"

    def daemon_home(self, name: str) -> Path:
        """FLWR_HOME of one daemon (installed app bundles), as on separate machines."""
        return self.root / "home" / name

    @property
    def state_file(self) -> Path:
        """The deployment record."""
        return self.root / STATE_FILE

    def log(self, name: str) -> Path:
        """The log file of daemon ``name``."""
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        """The PID file of daemon ``name``."""
        return self.pids / f"{name}.pid"


def layout_of(state_dir: str | Path) -> Layout:
    """The :class:`Layout` of ``state_dir`` (resolved)."""
    return Layout(Path(state_dir).resolve())


def load_state(state_dir: str | Path = DEFAULT_STATE_DIR) -> State | None:
    """The deployment record (``deployment.json``) of ``state_dir``, or None."""
    path = layout_of(state_dir).state_file
    if not path.is_file():
        return None
    state: State = json.loads(path.read_text())
    return state


def save_state(layout: Layout, state: State) -> None:
    """Write the deployment record atomically."""
    tmp = layout.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(layout.state_file)


def require_state(layout: Layout) -> State:
    """The deployment record of ``layout``; :class:`DeployError` if there is none."""
    state = load_state(layout.root)
    if state is None:
        raise DeployError(f"no deployment in {layout.root} (run `up` first)")
    return state


def write_cli_config(layout: Layout, mode: str, port: int) -> Path:
    """``flwr-home/config.toml`` with the connection :data:`CONNECTION` as the default."""
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "127.0.0.1:{port}"',
    ]
    if mode == "insecure":
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{layout.certs / "ca.crt"}"')
    layout.cli_home.mkdir(parents=True, exist_ok=True)
    path = layout.cli_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_key(path: Path) -> Path:
    """An ECDSA P-384 key pair (``path`` and ``path.pub``) for SuperNode authentication."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ecdsa",
                "-b",
                "384",
                "-N",
                "",
                "-C",
                path.name,
                "-f",
                str(path),
            ],
            check=True,
        )
    return path


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
