"""Behaviour preserved: the default run's first 20 rounds, recorded once, must not change.

The real ServerApp, FedZO strategy and ClientApps (in process, 10 nodes, the defaults of
``pyproject.toml``) train 20 rounds; every number that a refactor must not move (training loss,
gradient norm, test accuracy and loss, measured bytes per client, FLOPs, the mask's layer
densities) is compared exactly with ``tests/golden/default-20-rounds.json``.

The run is bit-exact on one machine and one set of library versions; the golden file records
the versions it was made with and the test skips elsewhere (it is a refactoring guard, not a
portability claim). Regenerate it only for an intended change of behaviour, and say so in the
commit: ``FEDZO_REGEN_GOLDEN=1 python -m pytest tests/test_golden_run.py``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess_grid import InProcessGrid, app_config, server_context

from client_app.client_app import app as client_app
from fedzo_flwr.environment import cpu_model
from server_app.server_app import app as server_app

GOLDEN = Path(__file__).parent / "golden" / "default-20-rounds.json"
DEFAULTS = app_config()
ROUNDS = 20
NODES = 10
ROUND_FIELDS = ("train_loss", "grad_norm", "accuracy", "loss", "clients", "reconstructions")
PER_CLIENT_FIELDS = ("uplink_bytes", "downlink_bytes", "forward_flops")
SETUP_FIELDS = (
    "density",
    "kept_weights",
    "kept_coordinates",
    "layer_densities",
    "mask_bytes",
    "sparse_weights_bytes",
    "forward_flops_per_example",
    "client_round_forward_flops",
)


def environment() -> dict[str, str]:
    """What bit-exactness depends on: the machine and the numeric libraries."""
    return {
        "machine": platform.machine(),
        "processor": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def observed(results: dict) -> dict:
    """The behaviour-defining numbers of a results.json."""
    rounds = []
    for entry in results["rounds"]:
        row = {"round": entry["round"]}
        row.update({key: entry[key] for key in ROUND_FIELDS if key in entry})
        row.update({key: entry[key]["per_client"] for key in PER_CLIENT_FIELDS if key in entry})
        rounds.append(row)
    setup = {key: results["setup"][key] for key in SETUP_FIELDS}
    return {"setup": setup, "rounds": rounds}


@pytest.mark.slow
def test_default_run_first_rounds_unchanged(tmp_path, data_dir):
    config = app_config(
        **{
            "data-dir": str(data_dir),
            "output-dir": str(tmp_path),
            "run-name": "golden",
            "num-server-rounds": ROUNDS,
            # The first ROUNDS steps of the default run's own lr schedule (its horizon).
            "lr-schedule-rounds": DEFAULTS["lr-schedule-rounds"] or DEFAULTS["num-server-rounds"],
            "eval-every": 10,
        }
    )
    grid = InProcessGrid(client_app, NODES, config)
    server_app(grid, server_context(config))
    got = observed(json.loads((tmp_path / "golden" / "results.json").read_text()))
    if os.environ.get("FEDZO_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"environment": environment(), **got}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if golden["environment"] != environment():
        pytest.skip(f"golden run recorded on {golden['environment']}, this is {environment()}")
    assert got["setup"] == golden["setup"]
    assert len(got["rounds"]) == len(golden["rounds"]) == ROUNDS + 1
    for mine, theirs in zip(got["rounds"], golden["rounds"]):
        assert mine == theirs, f"round {theirs['round']} differs"
