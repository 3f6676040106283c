"""A client process stays slim: no heavy module enters the ClientApp's import graph.

Each check runs in a fresh interpreter started from the repository root (what a SuperNode's
``flwr-clientapp`` process does), so nothing the test session imported hides a leak.

:data:`DENY` is what a device has no use for: plotting (matplotlib, its PIL), dataframes and
the dataset stack (pandas, datasets, pyarrow, huggingface_hub, flwr_datasets), scipy and
scikit-learn, torchvision, Ray, and the server (``server_app`` and the library's server-side
modules). ``import flwr.clientapp`` alone imports none of them (checked below), so every one is
ours to keep out. One exception is by design: a node without a partition file or a cached
partition cuts its share from the full dataset with flwr-datasets partitioners on its first
round, which brings in the dataset stack, imported only then (checked: cold round). From the
on-disk partition cache (a deployed node from its second message on) a whole train round runs
without any of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedzo_flwr.config import RunConfig
from fedzo_flwr.data import load_dataset
from fedzo_flwr.data.client_data import partition_of

ROOT = Path(__file__).resolve().parents[1]

DENY: tuple[str, ...] = (
    "matplotlib",
    "PIL",
    "pandas",
    "datasets",
    "pyarrow",
    "huggingface_hub",
    "flwr_datasets",
    "scipy",
    "sklearn",
    "torchvision",
    "ray",
    "server_app",
)
"""Top-level packages that must not be imported by ``import client_app.client_app``."""

SERVER_MODULES: tuple[str, ...] = (
    "fedzo_flwr.run.results",
    "fedzo_flwr.run.setup",
    "fedzo_flwr.run.checkpoint",
    "fedzo_flwr.run.inprocess",
    "fedzo_flwr.zo.server",
)
"""The library's server-side modules: the client never needs them."""

PARTITION_STACK: tuple[str, ...] = (
    "flwr_datasets",
    "datasets",
    "pyarrow",
    "pandas",
    "huggingface_hub",
    "matplotlib",  # flwr_datasets.partitioner imports its visualisation helpers
    "PIL",
)
"""What cutting a partition from the full dataset may import (a cold first round only)."""

K = 16

# One first-contact ZO train message through the real ClientApp, in this fresh process.
ROUND_DRIVER = """
import json, sys
import numpy as np
import client_app.client_app as client
after_import = sorted(sys.modules)
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
job = json.loads(sys.argv[1])
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
with np.load(job["message"]) as saved:
    kept, mask = saved["kept"].copy(), saved["mask"].tobytes()
config = ConfigRecord({**job["config"], "mask": mask})
content = RecordDict({"arrays": ArrayRecord({"kept": Array(kept)}), "config": config})
message = Message(content, dst_node_id=1000, message_type=MessageType.TRAIN)
context = Context(run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 10},
                  state=RecordDict(), run_config=job["run_config"])
reply = client.app(message, context)
assert not reply.has_error(), reply.error.reason
zo = reply.content.config_records["zo"]
print(json.dumps({"after_import": after_import, "after_round": sorted(sys.modules),
                  "deltas": bytes(zo["deltas"]).hex(), "num_examples":
                  int(reply.content.metric_records["metrics"]["num-examples"])}))
"""


def fresh_python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``python -c code args`` from the repository root; its stdout's last line."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def top_level(modules: list[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def leaks(modules: list[str]) -> list[str]:
    """The :data:`DENY` packages and :data:`SERVER_MODULES` present in ``modules``."""
    present = set(modules)
    return sorted((top_level(modules) & set(DENY)) | (present & set(SERVER_MODULES)))


def imported_by(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    modules: list[str] = json.loads(fresh_python(code))
    return modules


def test_flower_client_runtime_imports_none_of_the_denied_modules() -> None:
    """The floor: every DENY entry is ours to keep out (Flower's client brings none)."""
    modules = imported_by("import flwr.clientapp")
    assert "flwr.clientapp" in modules
    assert leaks(modules) == []


def test_client_app_import_pulls_no_heavy_module() -> None:
    modules = imported_by("import client_app.client_app")
    assert "client_app.client_app" in modules and "torch" in modules
    assert leaks(modules) == [], f"heavy modules in the ClientApp's import graph: {leaks(modules)}"


def test_zo_progressive_handler_pulls_no_heavy_or_server_module() -> None:
    """The zo-progressive handler needs the client half of ``progressive.zo`` only."""
    modules = imported_by("import client_app.zo_progressive")
    assert "fedzo_flwr.progressive.zo.client" in modules
    assert "fedzo_flwr.progressive.zo.server" not in modules
    assert leaks(modules) == [], f"heavy modules in the handler's import graph: {leaks(modules)}"


@pytest.fixture(scope="module")
def first_contact(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Any]:
    """A first-contact train message (LeNet-5, random mask at density 0.1) saved to a file."""
    from inprocess_grid import app_config

    from fedzo_flwr import protocol, seeding
    from fedzo_flwr.models import build_model
    from fedzo_flwr.protocol.wire import encode_mask
    from fedzo_flwr.pruning.baselines import random_mask
    from fedzo_flwr.sparse.mask import apply_mask_
    from fedzo_flwr.sparse.space import KeptSpace

    tmp = tmp_path_factory.mktemp("slim-client")
    model = build_model("lenet5", 10, seeding.model_seed(3407))
    mask = random_mask(model, 0.1, seed=0)
    apply_mask_(model, mask)
    kept = KeptSpace(model, mask).gather(model).numpy().astype(np.float32)
    mask_bytes = encode_mask(mask)
    np.savez(tmp / "message.npz", kept=kept, mask=np.frombuffer(mask_bytes, dtype=np.uint8))
    config = {
        protocol.ROUND_KEY: 1,
        protocol.ROUND_SEED_KEY: seeding.round_seed(3407, 1),
        protocol.MASK_ID_KEY: protocol.mask_id(mask_bytes),
        protocol.FINGERPRINT_SEED_KEY: seeding.fingerprint_seed(3407),
    }
    run_config = app_config(
        **{"data-dir": str(data_dir), "k": K, "engine": "lean", "client-threads": 1}
    )
    job = {"message": str(tmp / "message.npz"), "config": config, "run_config": run_config}
    return {"job": json.dumps(job), "cache": tmp / "partition-cache", "run_config": run_config}


@pytest.mark.slow
def test_partition_stack_is_imported_only_when_a_partition_is_cut(
    first_contact: dict[str, Any],
) -> None:
    """Cold node (no cache) cuts its partition, importing flwr-datasets only then; cached: never.

    Both rounds answer the same message, so their K loss differences must be the same bytes:
    the cached partition is the one the cold round cut.
    """
    env = {"FEDZO_CACHE_DIR": str(first_contact["cache"])}
    cold = json.loads(fresh_python(ROUND_DRIVER, first_contact["job"], env=env))
    assert leaks(cold["after_import"]) == []
    assert {"flwr_datasets", "datasets"} <= top_level(cold["after_round"])  # lazily, for the cut
    assert set(leaks(cold["after_round"])) <= set(PARTITION_STACK)
    cache_files = list(first_contact["cache"].iterdir())
    assert [p.suffix for p in cache_files] == [".npz"]
    with np.load(cache_files[0]) as cut:
        x, y = cut["x"], cut["y"]
    expected_x, expected_y = partition_of(
        RunConfig.from_run_config(first_contact["run_config"]),
        load_dataset("cifar10", first_contact["run_config"]["data-dir"]),
        0,
        10,
    )
    assert np.array_equal(x, expected_x) and np.array_equal(y, expected_y)
    assert cold["num_examples"] == len(expected_y)

    cached = json.loads(fresh_python(ROUND_DRIVER, first_contact["job"], env=env))
    assert leaks(cached["after_round"]) == [], "a cached round imported heavy modules"
    assert len(bytes.fromhex(cached["deltas"])) == 4 * K
    assert cached["deltas"] == cold["deltas"]
    assert cached["num_examples"] == cold["num_examples"]


@pytest.mark.slow
def test_client_imports_benchmark_quick_reports_what_it_measures(
    tmp_path: Path, data_dir: Path
) -> None:
    """``benchmarks/client_imports.py --quick``: its tables agree with the checks above."""
    out = tmp_path / "client_imports.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "client_imports.py"), "--quick"]
    command += ["--json", str(out), "--data-dir", str(data_dir)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    imports = {row["module"]: row for row in result["imports"]}
    assert set(imports) == {"client_app.client_app", "flwr.clientapp", "torch"}
    assert all(row["heavy"] == [] and row["rss_mb"] > 0 for row in imports.values())
    # The ClientApp imports torch and Flower's client: it can only weigh more than either.
    assert imports["client_app.client_app"]["modules"] > imports["torch"]["modules"]
    assert imports["client_app.client_app"]["modules"] > imports["flwr.clientapp"]["modules"]
    rounds = {(row["engine"], row["partition"]): row for row in result["rounds"]}
    assert set(rounds) == {("lean", "cold"), ("lean", "cached")}
    assert all(row["deltas"] == result["settings"]["k"] == 16 for row in rounds.values())
    assert rounds["lean", "cached"]["heavy_after_round"] == []
    assert "flwr_datasets" in rounds["lean", "cold"]["heavy_after_round"]
    assert all(row["heavy_after_import"] == [] for row in rounds.values())
    for row in rounds.values():
        assert row["round_peak_mb"] >= row["rss_before_round_mb"] >= row["rss_after_import_mb"]
