"""A real `flwr run .` simulation (local SuperLink + Ray), as the README's main command runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from flwr_sandbox import flwr_run_command, sandbox_env  # noqa: E402
from stop_local_superlink import our_superlinks  # noqa: E402


def flwr_run(tmp_path: Path, *run_configs: str) -> list[str]:
    """Run `flwr run` (3 nodes) once per run config in one sandbox; each run's stdout + stderr.

    The sandbox's local SuperLinks are stopped and its Ray folder removed afterwards, whatever
    happened.
    """
    env, ray_tmp = sandbox_env(tmp_path)
    logs = []
    try:
        for run_config in run_configs:
            proc = subprocess.run(
                flwr_run_command(ROOT, 3, run_config),
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=480,
            )
            logs.append(proc.stdout + proc.stderr)
    finally:
        for pid in our_superlinks(env["FLWR_HOME"]):
            os.kill(pid, 15)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return logs


def run_results(tmp_path: Path, run_name: str, log: str) -> dict:
    """Run ``run_name``'s ``results.json`` under ``tmp_path / "out"`` (missing: show ``log``)."""
    path = tmp_path / "out" / run_name / "results.json"
    assert path.is_file(), log[-4000:]
    return json.loads(path.read_text())


@pytest.mark.slow
def test_flwr_run_simulation_writes_results(tmp_path, data_dir):
    run_config = (
        f'num-server-rounds=2 k=10 prune-iterations=2 eval-every=2 data-dir="{data_dir}" '
        f'output-dir="{tmp_path / "out"}" run-name="ci"'
    )
    (log,) = flwr_run(tmp_path, run_config)
    results = run_results(tmp_path, "ci", log)
    trained = [r for r in results["rounds"] if r["round"]]
    assert [r["round"] for r in trained] == [1, 2]
    assert all(r["clients"] == 3 and not r["rejected"] for r in trained)
    assert "accuracy" in trained[-1]
    assert "[fedzo] round 2/2" in log


@pytest.mark.slow
def test_flwr_run_replay_downlink_matches_the_weights_downlink(tmp_path, data_dir):
    """Under real `flwr run`, nodes replaying round updates train exactly as with the weights."""
    common = (
        f'num-server-rounds=3 k=10 prune-iterations=2 eval-every=1 optimizer="adam" '
        f'data-dir="{data_dir}" output-dir="{tmp_path / "out"}"'
    )
    downlinks = ("weights", "replay")
    run_configs = [f'{common} downlink="{d}" run-name="{d}"' for d in downlinks]
    logs = dict(zip(downlinks, flwr_run(tmp_path, *run_configs), strict=True))
    runs = {d: run_results(tmp_path, d, logs[d])["rounds"] for d in downlinks}
    keys = ("round", "accuracy", "loss", "train_loss", "grad_norm", "clients")
    assert [{k: r.get(k) for k in keys} for r in runs["replay"]] == [
        {k: r.get(k) for k in keys} for r in runs["weights"]
    ]
    paths = [r["downlink_path"] for r in runs["replay"] if r["round"]]
    assert [sorted(set(p.values())) for p in paths] == [["weights"], ["replay"], ["replay"]]
    later = [r["downlink_bytes"]["max"] for r in runs["replay"] if r["round"] > 1]
    full = [
        min(r["downlink_bytes"]["per_client"].values()) for r in runs["weights"] if r["round"] > 1
    ]
    assert max(later) < min(full) / 5


@pytest.mark.slow
def test_flwr_run_simulation_smartfreeze_and_profl(tmp_path, data_dir):
    """Progressive block training under a real `flwr run`: a stage change, and ProFL's shrinking."""
    common = f'num-server-rounds=2 local-batches=1 eval-every=2 data-dir="{data_dir}" ' + (
        f'output-dir="{tmp_path / "out"}"'
    )
    logs = flwr_run(
        tmp_path,
        f'method="smartfreeze" pace="fixed" stage-rounds="1" run-name="sf" {common}',
        f'method="profl" profl-shrink-rounds=1 run-name="profl" {common}',
    )
    results = run_results(tmp_path, "sf", logs[0])
    trained = [r for r in results["rounds"] if r["round"]]
    assert [(r["round"], r["stage"], r["clients"]) for r in trained] == [(1, 0, 3), (2, 1, 3)]
    assert all(not r["rejected"] for r in trained)
    assert results["final"]["stage_changes"][0]["to"] == {"phase": "grow", "stage": 1}
    assert "Round 1: stage change grow 0 -> grow 1 (schedule)" in logs[0]
    profl = [r for r in run_results(tmp_path, "profl", logs[1])["rounds"] if r["round"]]
    assert [(r["phase"], r["stage"], r["clients"]) for r in profl] == [
        ("shrink", 1, 3),
        ("shrink", 0, 3),
    ]
    assert all(not r["rejected"] for r in profl)


@pytest.mark.slow
def test_flwr_run_simulation_zo_progressive(tmp_path, data_dir):
    """Zeroth-order progressive training under a real `flwr run`: stage 0, a change, stage 1."""
    (log,) = flwr_run(
        tmp_path,
        'method="zo-progressive" pace="fixed" stage-rounds="1" num-server-rounds=2 k=10 '
        'prune-iterations=2 prune-repeats=1 eval-every=2 run-name="zp" '
        f'data-dir="{data_dir}" output-dir="{tmp_path / "out"}"',
    )
    results = run_results(tmp_path, "zp", log)
    trained = [r for r in results["rounds"] if r["round"]]
    assert [(r["round"], r["stage"], r["clients"]) for r in trained] == [(1, 0, 3), (2, 1, 3)]
    assert all(not r["rejected"] for r in trained)
    assert results["final"]["stage_changes"][0]["to"] == {"phase": "grow", "stage": 1}
    assert "[fedzo] Round 1: stage change zo 0 -> 1 (schedule)" in log
    assert "accuracy" in trained[-1]
    flops = results["setup"]["zo_progressive"]["client_round_forward_flops"]
    assert [r["forward_flops"]["max"] for r in trained] == flops[:2]
    # Only K float32 scalars (and the envelope) go up: far less than the stage's weights.
    dims = results["setup"]["zo_progressive"]["stage_dims"]
    assert all(r["uplink_bytes"]["max"] < 4 * dims[1] for r in trained)
