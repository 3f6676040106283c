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


@pytest.mark.slow
def test_flwr_run_simulation_writes_results(tmp_path, data_dir):
    env, ray_tmp = sandbox_env(tmp_path)
    flwr_home = env["FLWR_HOME"]
    run_config = (
        f'num-server-rounds=2 k=10 prune-iterations=2 eval-every=2 data-dir="{data_dir}" '
        f'output-dir="{tmp_path / "out"}" run-name="ci"'
    )
    command = flwr_run_command(ROOT, 3, run_config)
    try:
        proc = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480
        )
    finally:
        for pid in our_superlinks(flwr_home):
            os.kill(pid, 15)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = proc.stdout + proc.stderr
    results_path = tmp_path / "out" / "ci" / "results.json"
    assert results_path.is_file(), log[-4000:]
    results = json.loads(results_path.read_text())
    trained = [r for r in results["rounds"] if r["round"]]
    assert [r["round"] for r in trained] == [1, 2]
    assert all(r["clients"] == 3 and not r["rejected"] for r in trained)
    assert "accuracy" in trained[-1]
    assert "[fedzo] round 2/2" in log


@pytest.mark.slow
def test_flwr_run_replay_downlink_matches_the_weights_downlink(tmp_path, data_dir):
    """Under real `flwr run`, nodes replaying round updates train exactly as with the weights."""
    env, ray_tmp = sandbox_env(tmp_path)
    common = (
        f'num-server-rounds=3 k=10 prune-iterations=2 eval-every=1 optimizer="adam" '
        f'data-dir="{data_dir}" output-dir="{tmp_path / "out"}"'
    )
    logs = {}
    try:
        for downlink in ("weights", "replay"):
            run_config = f'{common} downlink="{downlink}" run-name="{downlink}"'
            proc = subprocess.run(
                flwr_run_command(ROOT, 3, run_config),
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=480,
            )
            logs[downlink] = proc.stdout + proc.stderr
    finally:
        for pid in our_superlinks(env["FLWR_HOME"]):
            os.kill(pid, 15)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    runs = {}
    for downlink in ("weights", "replay"):
        path = tmp_path / "out" / downlink / "results.json"
        assert path.is_file(), logs[downlink][-4000:]
        runs[downlink] = json.loads(path.read_text())["rounds"]
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
def test_flwr_run_simulation_smartfreeze(tmp_path, data_dir):
    """Progressive block training under a real `flwr run`: a stage change and its prefix."""
    env, ray_tmp = sandbox_env(tmp_path)
    run_config = (
        f'method="smartfreeze" num-server-rounds=2 local-batches=1 pace="fixed" stage-rounds="1" '
        f'eval-every=2 data-dir="{data_dir}" output-dir="{tmp_path / "out"}" run-name="sf"'
    )
    try:
        proc = subprocess.run(
            flwr_run_command(ROOT, 3, run_config),
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=480,
        )
    finally:
        for pid in our_superlinks(env["FLWR_HOME"]):
            os.kill(pid, 15)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = proc.stdout + proc.stderr
    results_path = tmp_path / "out" / "sf" / "results.json"
    assert results_path.is_file(), log[-4000:]
    results = json.loads(results_path.read_text())
    trained = [r for r in results["rounds"] if r["round"]]
    assert [(r["round"], r["stage"], r["clients"]) for r in trained] == [(1, 0, 3), (2, 1, 3)]
    assert all(not r["rejected"] for r in trained)
    assert results["final"]["stage_changes"][0]["to"] == {"phase": "grow", "stage": 1}
    assert "Round 1: stage change grow 0 -> grow 1 (schedule)" in log
