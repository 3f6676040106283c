"""An isolated environment for one ``flwr run .`` simulation (tests and benchmarks).

Its own Flower home (so its local SuperLink can be found and stopped by PID), its own free
local SuperLink ports (a user's running simulation cannot collide with it), a short Ray folder
(Ray's socket paths must stay under 107 bytes), Ray on the loopback interface only, and
Flower's offline switches.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flwr_run_command(app_dir: Path, num_supernodes: int, run_config: str) -> list[str]:
    """``flwr run <app_dir> --stream`` with ``num_supernodes`` simulated nodes, one core each."""
    return [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(app_dir),
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
        "--run-config",
        run_config,
    ]


def sandbox_env(work: Path) -> tuple[dict[str, str], str]:
    """``(environment, ray_tmp)`` for a ``flwr run`` whose state lives under ``work``.

    ``work/flwr-home`` is created and becomes ``FLWR_HOME``; ``ray_tmp`` is a new short
    temporary folder the caller removes afterwards. The venv's ``bin`` comes first on ``PATH``.
    """
    flwr_home = work / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="ray-")
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # Ray binds to 127.0.0.1 (otherwise it uses the machine's own network address).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_TMPDIR": ray_tmp,
        "MPLCONFIGDIR": str(work / "mpl"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    return env, ray_tmp
