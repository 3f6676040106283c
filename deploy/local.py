"""A local multi-node Flower deployment on loopback: one SuperLink and N SuperNodes.

::

    python -m deploy.local up --mode tls-auth --nodes 2 --data-dir ../shared/data
    python -m deploy.local status
    python -m deploy.local run 'num-server-rounds=3 k=50'
    python -m deploy.local node stop 1        # simulate a device going away (node start 1: back)
    python -m deploy.local down

Modes: ``insecure`` (plain HTTP), ``tls`` (certificates from ``deploy/gen_certs.sh``) and
``tls-auth`` (TLS plus SuperNode authentication: one ECDSA P-384 key pair per node, generated
with ``ssh-keygen`` and registered with ``flwr supernode register`` before the node starts).

Everything lives in the state directory (default ``.deploy/`` in the repository): ``certs/``,
``keys/``, ``logs/<daemon>.log``, ``pids/<daemon>.pid``, the SuperLink database, one Flower home
per daemon under ``home/`` and, for the ``flwr`` CLI, ``flwr-home/config.toml`` with the
connection ``fedzo-local`` (so ``FLWR_HOME=.deploy/flwr-home flwr run . fedzo-local`` works
too). Daemons are started in their own session with their argv exec'ed directly (no shell), so
each recorded PID is the daemon's own; ``down`` stops exactly those PIDs (SIGTERM, then SIGKILL
after a timeout) plus the helper processes they had spawned (their SuperExecs and any app
process still running), identified by PID and start time, never by name.

The functions here (:func:`up`, :func:`down`, :func:`run_app`, :func:`start_supernode`, ...)
are also the API the deployment test uses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedzo_flwr.errors import DeploymentError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = ROOT / ".deploy"
CONNECTION = "fedzo-local"
MODES = ("insecure", "tls", "tls-auth")
STATE_FILE = "deployment.json"

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

# Popen handles of the daemons this Python process started (to reap them and read exit codes).
_CHILDREN: dict[int, subprocess.Popen] = {}


class DeployError(DeploymentError):
    """The deployment could not be started, found or stopped; the message says why."""


@dataclass(frozen=True)
class Layout:
    """Paths inside a deployment's state directory."""

    root: Path

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def database(self) -> Path:
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
        return self.root / STATE_FILE

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.pids / f"{name}.pid"


# ------------------------------------------------------------------------------ helpers


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether 127.0.0.1:``port`` cannot be bound right now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks)`` of a process from /proc, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def is_running(record: dict) -> bool:
    """Whether the process of ``record`` is alive and still the one we started."""
    pid = int(record["pid"])
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return stat[1] == record.get("start_ticks", stat[1])


def flower_exit_code(record: dict) -> int | None:
    """The Flower exit code a daemon logged ("Exit Code: 305"), if any."""
    found = re.findall(r"Exit Code: (\d+)", log_tail(record["log"], 200))
    return int(found[-1]) if found else None


def exit_code(record: dict) -> int | None:
    """Exit code of a daemon started by this Python process, or None if unknown/running."""
    child = _CHILDREN.get(int(record["pid"]))
    return None if child is None else child.poll()


def wait_exit(record: dict, timeout: float) -> int | None:
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
    found, todo = [], list(children.get(pid, []))
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


def stop_records(records: Sequence[dict], timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
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


# ------------------------------------------------------------------------------ state


def load_state(state_dir: str | Path = DEFAULT_STATE_DIR) -> dict | None:
    """The deployment record (``deployment.json``) of ``state_dir``, or None."""
    path = Layout(Path(state_dir).resolve()).state_file
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def save_state(layout: Layout, state: dict) -> None:
    """Write the deployment record atomically."""
    tmp = layout.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(layout.state_file)


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


def flwr_cli(
    layout: Layout, *args: str, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess:
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


def list_supernodes(layout: Layout) -> list[dict]:
    """``flwr supernode list --format json``: one dict per node (node_id, status, ...)."""
    proc = flwr_cli(layout, "supernode", "list", CONNECTION, "--format", "json", check=False)
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return []
    if not isinstance(data, dict) or not data.get("success", True):
        return []
    return list(data.get("nodes", []))


# ------------------------------------------------------------------------------ daemons


def spawn(layout: Layout, name: str, argv: list[str], env: dict[str, str]) -> dict:
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
    record = {
        "name": name,
        "pid": proc.pid,
        "start_ticks": stat[1] if stat else 0,
        "log": str(log),
        "argv": argv,
    }
    layout.pid_file(name).write_text(f"{proc.pid}\n")
    return record


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


def start_supernode(
    state_dir: str | Path,
    index: int,
    *,
    name: str | None = None,
    key: Path | None = None,
    port: int | None = None,
) -> dict:
    """Start SuperNode ``index`` of a running deployment (again), or an extra one.

    With ``name`` and ``key`` it starts an additional SuperNode under that name with that
    private key (which need not be registered: the test of a refused node uses this). The new
    record is added to the deployment's state so that ``down`` stops it too.
    """
    layout = Layout(Path(state_dir).resolve())
    state = _require_state(layout)
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
    layout = Layout(Path(state_dir).resolve())
    state = _require_state(layout)
    record = state["processes"].get(name)
    if record is None:
        raise DeployError(f"no process named {name}; known: {sorted(state['processes'])}")
    stop_records([record], sig=signal.SIGKILL if kill else signal.SIGTERM)
    layout.pid_file(name).unlink(missing_ok=True)


def _require_state(layout: Layout) -> dict:
    state = load_state(layout.root)
    if state is None:
        raise DeployError(f"no deployment in {layout.root} (run `up` first)")
    return state


def wait_superlink(record: dict, port: int, timeout: float) -> None:
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


def wait_online(layout: Layout, records: Sequence[dict], want: int, timeout: float) -> list[dict]:
    """Poll ``flwr supernode list`` until ``want`` nodes are online; fail if a node exits."""
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
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


# ------------------------------------------------------------------------------ commands


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
) -> dict:
    """Start a SuperLink and ``nodes`` SuperNodes on 127.0.0.1; return the deployment state.

    ``data_dir`` is the ServerApp's (the test set) and, by default, every node's ``data-dir``.
    ``node_data_dir`` / ``node_cache_dir`` (``{i}`` = node index) give each SuperNode its own
    ``data-dir`` in ``--node-config`` and its own ``$FEDZO_CACHE_DIR``, as separate devices
    have (e.g. an empty data folder plus a partition file from scripts/split_partitions.py).

    Blocks until the SuperLink listens and every SuperNode is online (bounded by
    ``timeout``). On any failure it stops what it started and raises :class:`DeployError`.
    """
    if mode not in MODES:
        raise DeployError(f"mode must be one of {MODES}, got {mode!r}")
    if nodes < 1:
        raise DeployError("need at least one SuperNode")
    data = Path(data_dir or os.environ.get("FEDZO_DATA_DIR") or ROOT.parent / "shared" / "data")
    data = data.expanduser().resolve()
    if not (data / "cifar10.npz").is_file() and not (data / "cifar-10-batches-py").is_dir():
        raise DeployError(f"no CIFAR-10 in {data} (cifar10.npz or cifar-10-batches-py)")
    layout = Layout(Path(state_dir).resolve())
    old = load_state(layout.root)
    if old and any(is_running(r) for r in old["processes"].values()):
        raise DeployError(f"a deployment is already running from {layout.root}: `down` it first")
    if node_ports is None:
        base = node_port_base if node_port_base is not None else port + 1
        node_ports = [base + i for i in range(nodes)]
    node_ports = [int(p) for p in node_ports]
    if len(node_ports) != nodes:
        raise DeployError("need one node port per SuperNode")
    busy = [p for p in [port, *node_ports] if port_in_use(p)]
    if busy:
        raise DeployError(f"port(s) {busy} on 127.0.0.1 already in use; choose --port")

    for folder in (layout.logs, layout.pids):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    layout.database.parent.mkdir(parents=True, exist_ok=True)
    if not keep_state:
        for path in layout.database.parent.glob("state.db*"):
            path.unlink()
    if mode != "insecure" and not all(
        (layout.certs / f).is_file() for f in ("ca.crt", "server.pem", "server.key")
    ):
        subprocess.run(
            ["bash", str(ROOT / "deploy" / "gen_certs.sh"), str(layout.certs)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    write_cli_config(layout, mode, port)
    state: dict = {
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
        state = _require_state(layout)
    except BaseException:
        current = load_state(layout.root) or state
        stop_records(list(current["processes"].values()))
        for name in current["processes"]:
            layout.pid_file(name).unlink(missing_ok=True)
        raise
    if not quiet:
        print(summary(layout, state))
    return state


def summary(layout: Layout, state: dict) -> str:
    """What ``up`` prints: addresses, PIDs, log paths, how to run and stop."""
    scheme = "http" if state["mode"] == "insecure" else "https"
    rel = _short(layout.root)
    procs = state["processes"]
    lines = [
        f"[deploy] mode {state['mode']}: SuperLink {scheme}://127.0.0.1:{state['port']} "
        f"(pid {procs['superlink']['pid']}), {state['nodes']} SuperNode(s) online "
        f"(Runtime API ports {', '.join(map(str, state['node_ports']))})",
        f"  data:      {state['data_dir']} (each node: --node-config partition-id=i "
        f"num-partitions={state['nodes']} data-dir=...)",
        "  logs:",
        *[
            f"    {name:<12} pid {r['pid']:<8} {_short(Path(r['log']))}"
            for name, r in procs.items()
        ],
        f"  pid files: {rel}/pids/   state: {rel}/{STATE_FILE}",
    ]
    if state["mode"] != "insecure":
        lines.append(f"  TLS:       CA {rel}/certs/ca.crt, server cert {rel}/certs/server.pem")
    if state["mode"] == "tls-auth":
        lines.append(f"  auth keys: {rel}/keys/node<i> (registered: {state.get('registered')})")
    lines += [
        "  run:       python -m deploy.local run 'num-server-rounds=3'"
        f"{'' if rel == '.deploy' else f' --state-dir {rel}'}",
        f"             (= FLWR_HOME={rel}/flwr-home flwr run . {CONNECTION} --stream ...)",
        f"  stop:      python -m deploy.local down"
        f"{'' if rel == '.deploy' else f' --state-dir {rel}'}",
    ]
    return "\n".join(lines)


def _short(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
    layout = Layout(Path(state_dir).resolve())
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
        _CHILDREN.pop(int(record["pid"]), None)
    if purge:
        shutil.rmtree(layout.root)
    elif not quiet:
        print(f"[deploy] stopped; logs kept in {_short(layout.logs)}/")
    return running


def status(state_dir: str | Path = DEFAULT_STATE_DIR) -> int:
    """Print the processes and `flwr supernode list`; 0 if all are running, else 3."""
    layout = Layout(Path(state_dir).resolve())
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
            f" log {_short(Path(record['log']))}"
        )
    if alive.get("superlink"):
        proc = flwr_cli(layout, "supernode", "list", CONNECTION, check=False)
        print(proc.stdout.rstrip() or proc.stderr.rstrip())
    return 0 if all(alive.values()) else 3


def run_app(
    state_dir: str | Path = DEFAULT_STATE_DIR,
    run_config: str = "",
    *,
    stream: bool = True,
    app_dir: str | Path = ROOT,
    background: bool = False,
    **popen_kwargs,
) -> int | subprocess.Popen:
    """``flwr run <app> fedzo-local [--stream] --run-config ...`` against the deployment.

    ``data-dir`` (the deployment's) and ``output-dir`` (``outputs/`` of the repository) are
    added unless ``run_config`` sets them: the ServerApp runs with the SuperLink's working
    directory, so relative paths would land in the state directory.
    """
    layout = Layout(Path(state_dir).resolve())
    state = _require_state(layout)
    extra = []
    if not re.search(r"(^|\s)data-dir\s*=", run_config):
        extra.append(f"data-dir={toml_string(state['data_dir'])}")
    if not re.search(r"(^|\s)output-dir\s*=", run_config):
        extra.append(f"output-dir={toml_string(str(ROOT / 'outputs'))}")
    config = " ".join([*extra, run_config]).strip()
    argv = [flower_bin("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION]
    if stream:
        argv.append("--stream")
    argv += ["--run-config", config]
    kwargs = {"env": cli_env(layout), "cwd": layout.root, **popen_kwargs}
    if background:
        return subprocess.Popen(argv, **kwargs)
    return subprocess.run(argv, check=False, **kwargs).returncode


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m deploy.local``)."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local",
        description="Local Flower deployment on 127.0.0.1: a SuperLink and N SuperNodes.",
    )
    state_help = "certs, keys, logs, PID files, DB, FLWR_HOME (default: .deploy/)"
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help=state_help)
    common = argparse.ArgumentParser(add_help=False)  # --state-dir after the subcommand too
    common.add_argument("--state-dir", default=argparse.SUPPRESS, help=state_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p_up = sub.add_parser(
        "up", parents=[common], help="start a SuperLink and N SuperNodes, wait until online"
    )
    p_up.add_argument("--mode", choices=MODES, default="tls-auth")
    p_up.add_argument("--nodes", type=int, default=2)
    p_up.add_argument(
        "--data-dir",
        default=None,
        help="folder with cifar10.npz (default $FEDZO_DATA_DIR or ../shared/data)",
    )
    p_up.add_argument("--port", type=int, default=9093, help="SuperLink port (default 9093)")
    p_up.add_argument(
        "--node-port-base",
        type=int,
        default=None,
        help="first SuperNode Runtime API port (default PORT+1; node i: base+i)",
    )
    p_up.add_argument("--timeout", type=float, default=120.0)
    p_up.add_argument(
        "--node-data-dir",
        default=None,
        help="data-dir in each SuperNode's --node-config ({i} = node index; default: --data-dir)",
    )
    p_up.add_argument(
        "--node-cache-dir",
        default=None,
        help="$FEDZO_CACHE_DIR of each SuperNode ({i} = node index; default: inherited)",
    )
    p_up.add_argument(
        "--keep-state",
        action="store_true",
        help="keep the SuperLink database (registered keys, runs) from last time",
    )

    p_down = sub.add_parser(
        "down", parents=[common], help="stop every process `up` started, by PID"
    )
    p_down.add_argument("--timeout", type=float, default=15.0, help="SIGTERM grace period")
    p_down.add_argument("--purge", action="store_true", help="also delete the state directory")

    sub.add_parser(
        "status", parents=[common], help="processes, log paths and `flwr supernode list`"
    )

    p_run = sub.add_parser(
        "run", parents=[common], help="flwr run . fedzo-local --stream --run-config ..."
    )
    p_run.add_argument(
        "run_config",
        nargs="?",
        default="",
        help="run-config overrides, e.g. 'num-server-rounds=3 k=50'",
    )
    p_run.add_argument("--no-stream", action="store_true")

    p_node = sub.add_parser("node", parents=[common], help="stop or (re)start one SuperNode")
    p_node.add_argument("action", choices=("stop", "start"))
    p_node.add_argument("index", type=int)
    p_node.add_argument("--kill", action="store_true", help="SIGKILL (a crash), not SIGTERM")

    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(
                args.mode,
                args.nodes,
                args.data_dir,
                args.state_dir,
                args.port,
                args.node_port_base,
                timeout=args.timeout,
                keep_state=args.keep_state,
                node_data_dir=args.node_data_dir,
                node_cache_dir=args.node_cache_dir,
            )
        elif args.command == "down":
            down(args.state_dir, timeout=args.timeout, purge=args.purge)
        elif args.command == "status":
            return status(args.state_dir)
        elif args.command == "run":
            return int(run_app(args.state_dir, args.run_config, stream=not args.no_stream))
        elif args.command == "node":
            name = f"supernode-{args.index}"
            if args.action == "stop":
                stop_process(args.state_dir, name, kill=args.kill)
                print(f"[deploy] stopped {name}")
            else:
                record = start_supernode(args.state_dir, args.index)
                print(f"[deploy] started {name} (pid {record['pid']}), log {record['log']}")
    except DeployError as err:
        print(f"[deploy] error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
