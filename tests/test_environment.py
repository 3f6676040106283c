"""Every result says where it was made: machine, library versions, the lock file's SHA-256.

The expected values are computed here independently (``/proc/cpuinfo``, ``os``, ``platform``,
``importlib.metadata``, ``hashlib`` of the file), and a real in-process run's ``results.json``
and a benchmark's machine record must carry exactly them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from inprocess_grid import InProcessGrid, app_config, server_context

from client_app.client_app import app as client_app
from fedzo_flwr import environment as env_module
from fedzo_flwr.environment import environment, lock_file_path, lock_file_sha256
from server_app.server_app import app as server_app

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "torchvision", "flwr", "numpy", "pydantic")


def _cpu_from_proc() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def expected() -> dict:
    """The environment record, computed without the module under test."""
    lock = ROOT / "scripts" / "constraints.txt"
    return {
        "machine": {
            "cpu": _cpu_from_proc(),
            "cores": os.cpu_count(),
            "arch": platform.machine(),
            "os": platform.platform(),
            "distribution": platform.freedesktop_os_release().get("PRETTY_NAME"),
            "python": platform.python_version(),
        },
        "versions": {name: metadata.version(name) for name in LIBRARIES},
        "torch_build": torch.__version__,
        "lock_file": "scripts/constraints.txt",
        "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
    }


def test_environment_fields_have_the_right_values():
    got = environment()
    assert got == expected()
    assert got["versions"]["flwr"] == "1.41.0"  # the pinned Flower, read from metadata
    assert len(got["lock_sha256"]) == 64
    assert env_module.SOURCE_ROOT == ROOT  # the lock file of this checkout, not another one


def test_lock_hash_follows_the_file_and_is_none_outside_a_source_tree(tmp_path):
    tree = tmp_path / "checkout"
    (tree / "scripts").mkdir(parents=True)
    (tree / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tree / "scripts" / "constraints.txt").write_text("torch==2.14.1\n")
    assert lock_file_path(tree) == tree / "scripts" / "constraints.txt"
    assert lock_file_sha256(tree) == hashlib.sha256(b"torch==2.14.1\n").hexdigest()
    (tree / "scripts" / "constraints.txt").write_text("torch==2.14.2\n")
    assert lock_file_sha256(tree) == hashlib.sha256(b"torch==2.14.2\n").hexdigest()
    # An installed wheel: site-packages holds the package but no pyproject.toml or scripts/.
    wheel = tmp_path / "site-packages"
    (wheel / "fedzo_flwr").mkdir(parents=True)
    assert lock_file_path(wheel) is None and lock_file_sha256(wheel) is None
    record = environment(wheel)
    assert record["lock_file"] is None and record["lock_sha256"] is None
    # A stray scripts/constraints.txt without a pyproject.toml is not a checkout's lock file.
    (wheel / "scripts").mkdir()
    (wheel / "scripts" / "constraints.txt").write_text("x\n")
    assert lock_file_path(wheel) is None


def test_the_record_is_made_without_importing_flwr():
    code = (
        "import sys; from fedzo_flwr.environment import environment; e = environment(); "
        "print('flwr' in sys.modules, e['versions']['flwr'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert proc.stdout.split() == ["False", "1.41.0"]


def test_benchmark_machine_record_delegates_to_the_library():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import machine
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    info = machine.machine_info(3)
    assert info["environment"] == expected()
    assert info["threads"] == 3 and info["cpu"] == _cpu_from_proc()
    assert info["torch"] == torch.__version__ and info["cores"] == os.cpu_count()
    assert machine.cpu_model is env_module.cpu_model  # one helper, no copy


def test_every_benchmark_json_gets_its_machine_record_from_machine_info():
    """Each benchmark that writes a JSON builds its machine record with ``machine_info``."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        writes_json = "json.dump" in text and ("write_text" in text or "open(" in text)
        if not writes_json or path.name == "machine.py":
            continue
        assert "machine_info(" in text, f"{path.name} writes a JSON without machine_info"


def test_results_json_of_an_in_process_run_carries_the_environment(tmp_path, data_dir):
    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": "env",
            "num-server-rounds": 1,
            "k": 4,
            "prune-iterations": 1,
            "prune-repeats": 1,
            "eval-every": 1,
        }
    )
    server_app(InProcessGrid(client_app, 2, config), server_context(config))
    results = json.loads((tmp_path / "env" / "results.json").read_text())
    assert results["environment"] == expected()
    assert [r["round"] for r in results["rounds"] if "accuracy" in r] == [0, 1]
