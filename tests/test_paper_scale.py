"""The paper-scale runner: a run killed after a checkpoint and started again ends exactly where
an uninterrupted run ends; status and report say where runs stand, computed from their files.

The runs are tiny (K = 4, 3 clients, 10 rounds, a 600-image slice of CIFAR-10) but go through
the real command, background processes, checkpoints and the real ServerApp and ClientApps.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from paper_report import render_report, results_appendix  # noqa: E402
from paper_scale import parse_set  # noqa: E402
from paper_scale_report import render_paper_scale  # noqa: E402

from fedzo_flwr.environment import environment  # noqa: E402

TINY = [
    "--methods", "zo-pruned", "--rounds", "10", "--k", "4", "--clients", "3",
    "--checkpoint-every", "4", "--set", "eval-every=2", "--set", "prune-iterations=1",
    "--set", "prune-repeats=1", "--poll", "0.1",
]  # fmt: skip
RUN = "zo-pruned-a0.5"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, data_dir) -> Path:
    """The first 600 training and 200 test images of CIFAR-10, as a data folder."""
    folder = tmp_path_factory.mktemp("small-data")
    with np.load(data_dir / "cifar10.npz") as d:
        arrays = {
            "x_train": d["x_train"][:600],
            "y_train": d["y_train"][:600],
            "x_test": d["x_test"][:200],
            "y_test": d["y_test"][:200],
            "classes": d["classes"],
        }
    np.savez(folder / "cifar10.npz", **arrays)
    return folder


def paper_scale(out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(ROOT / "benchmarks" / "paper_scale.py"), *TINY]
    command += ["--data-dir", str(data), "--out-dir", str(out), *extra]
    env = {**os.environ, "MPLCONFIGDIR": str(out.parent / "mpl")}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def _trajectory(results: dict[str, Any]) -> list[tuple]:
    """Everything a round computes (no wall times, memory or first-contact bytes)."""
    keys = ("train_loss", "grad_norm", "accuracy", "loss", "clients")
    rows = [(r["round"], *(r.get(k) for k in keys)) for r in results["rounds"]]
    trained = [row for row in rows if row[0] > 0]
    assert trained and all(row[1] is not None for row in trained)  # not None == None
    return rows


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, small_data):
    interrupted, uninterrupted = tmp_path / "interrupted", tmp_path / "uninterrupted"
    # Killed (SIGKILL, no clean-up) in round 7: the checkpoint after round 4 is what survives.
    killed = paper_scale(interrupted, small_data, "--kill-at-round", "7", "--wait")
    assert killed.returncode == 1, killed.stdout + killed.stderr
    assert "exit code -9" in killed.stdout
    stopped = json.loads((interrupted / RUN / "results.json").read_text())
    assert stopped["final"] == {} and max(r["round"] for r in stopped["rounds"]) == 6
    status = paper_scale(interrupted, small_data, "--status").stdout
    assert f"| {RUN} | stopped | 6/10 | " in status and "| 4 |" in status
    # Carried to another checkout (--pack, --unpack there), where the runs go on.
    archive = tmp_path / "carry" / "paper-scale.tar.xz"
    assert paper_scale(interrupted, small_data, "--pack", str(archive)).returncode == 0
    moved = tmp_path / "moved"
    unpacked = paper_scale(moved, small_data, "--unpack", str(archive))
    assert unpacked.returncode == 0 and f"| {RUN} | stopped | 6/10 | " in unpacked.stdout
    twice = paper_scale(moved, small_data, "--unpack", str(archive))
    assert twice.returncode == 1 and "would overwrite" in twice.stderr
    shutil.rmtree(interrupted)
    interrupted = moved
    # The same command again resumes it; a third time has nothing to do.
    resumed = paper_scale(interrupted, small_data, "--wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"# {RUN}: resuming after round 4" in resumed.stdout
    again = paper_scale(interrupted, small_data, "--wait")
    assert again.returncode == 0 and f"# {RUN}: complete (10 rounds); nothing to do" in again.stdout
    full = paper_scale(uninterrupted, small_data, "--wait")
    assert full.returncode == 0, full.stdout + full.stderr

    a = json.loads((interrupted / RUN / "results.json").read_text())
    b = json.loads((uninterrupted / RUN / "results.json").read_text())
    assert a["resumed_from"]["round"] == 4 and "resumed_from" not in b
    assert _trajectory(a) == _trajectory(b) and len(a["rounds"]) == 11
    wa = torch.load(interrupted / RUN / "model.pt", weights_only=True)
    wb = torch.load(uninterrupted / RUN / "model.pt", weights_only=True)
    assert all(torch.equal(wa["model_state"][k], wb["model_state"][k]) for k in wb["model_state"])
    assert torch.equal(wa["optimizer"]["theta"], wb["optimizer"]["theta"])
    segments = json.loads((interrupted / f"{RUN}.segments.json").read_text())
    assert [s["start_round"] for s in segments] == [0, 4]  # the third call started nothing
    log = (interrupted / f"{RUN}.log").read_text()
    assert "round 10/10  accuracy" in log and "ETA" in log
    assert "resuming from the checkpoint after round 4" in log

    # The report: JSON, figure and a results.md section, all from these files.
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    for name in ("paper_comparison.json", "client_memory.json"):
        shutil.copy(ROOT / "docs" / "results" / name, docs / "results" / name)
    report = paper_scale(
        interrupted,
        small_data,
        "--report",
        "--json",
        str(docs / "results" / "paper_scale.json"),
        "--figure",
        str(docs / "figures" / "paper_scale.png"),
        "--results-md",
        str(docs / "results.md"),
    )
    assert report.returncode == 0, report.stdout + report.stderr
    data = json.loads((docs / "results" / "paper_scale.json").read_text())
    (run,) = data["runs"]
    assert run["complete"] and run["state"] == "complete" and run["processes"] == 2
    assert run["curve"] == [[r["round"], r["accuracy"]] for r in a["rounds"] if "accuracy" in r]
    assert run["environment"] == environment() and run["same_environment_throughout"]
    assert data["info"]["machine"]["environment"]["lock_sha256"] == environment()["lock_sha256"]
    assert data["info"]["data_dir_rel"] == os.path.relpath(small_data, ROOT)
    assert not data["info"]["data_dir_rel"].startswith("/")
    assert (docs / "figures" / "paper_scale.png").read_bytes()[:4] == b"\x89PNG"
    text = (docs / "results.md").read_text()
    summary = json.loads((docs / "results" / "paper_comparison.json").read_text())
    memory = json.loads((docs / "results" / "client_memory.json").read_text())
    figures = ["figures/accuracy_vs_round.png", "figures/flops_and_bytes.png"]
    figures.append("figures/client_memory.png")
    expected = render_report(summary["runs"], memory, figures, summary["info"])
    assert text == expected + results_appendix(docs)
    assert "## The paper's scale" in text and "The run is complete." in text


def _synthetic_report(done: dict[str, int], target: int = 3000) -> dict[str, Any]:
    """Synthetic report data (made-up curves, not measurements) for two runs at α = 0.5."""
    recipe = {
        "model": "lenet5",
        "dataset": "cifar10",
        "optimizer": "adam",
        "lr": 0.01,
        "weight-decay": 0.0,
        "sigma": 0.001,
        "fd": "forward",
        "directions": "gaussian",
        "batch-size": 32,
        "local-steps": 1,
        "clip": 0.0,
        "ema": 0.0,
        "engine": "fused",
        "seed": 3407,
        "prune-iterations": 20,
        "prune-repeats": 5,
    }
    env = environment()
    runs = []
    for method, end in (("zo-dense", 0.30), ("zo-pruned", 0.34)):
        last = done[method]
        curve = [[r, 0.1 + (end - 0.1) * r / target] for r in range(0, last + 1, 100)]
        runs.append(
            {
                "name": f"{method}-a0.5",
                "method": method,
                "alpha": "0.5",
                "state": "complete" if last == target else "running",
                "complete": last == target,
                "rounds_done": last,
                "target_rounds": target,
                "checkpoint_round": last - last % 100,
                "curve": curve,
                "loss_curve": [],
                "wall_seconds": 3600.0 * last / target,
                "processes": 1,
                "same_environment_throughout": True,
                "environment": env,
            }
        )
    info = {
        "date": "2026-01-01 00:00 UTC",
        "machine": {"cpu": "Test CPU", "cores": 2, "threads": 1, "environment": env},
        "rounds": target,
        "k": 200,
        "clients": 10,
        "alphas": ["0.5"],
        "checkpoint_every": 100,
        "eval_every": 100,
        "recipe": recipe,
        "overrides": {},
        "data_dir_rel": "../shared/data",
        "out_dir_rel": "../runs/paper-scale",
        "command": "python benchmarks/paper_scale.py",
        "paper": {"k": 200, "rounds": 3000, "clients": 10},
    }
    return {"info": info, "runs": runs}


def test_report_says_in_progress_until_the_runs_are_done():
    partial = render_paper_scale(_synthetic_report({"zo-dense": 1200, "zo-pruned": 900}))
    assert "| 0.5 | zo-dense (BAFFLE) | in progress: round 1200 of 3000 |" in partial
    assert "zo-pruned-a0.5 in progress: round 900 of 3000" in partial
    # Compared at the last round both evaluated: 900 (synthetic: +1.20 pp there).
    assert "α = 0.5, so far (round 900): zo-pruned 17.20 %, zo-dense 16.00 % (+1.20 pp;" in partial
    assert "The paper reports" not in partial
    assert "This is the paper's scale" in partial
    done = render_paper_scale(_synthetic_report({"zo-dense": 3000, "zo-pruned": 3000}))
    assert "All 2 runs are complete." in done and "in progress" not in done
    assert "α = 0.5, at the end (round 3000): zo-pruned 34.00 %, zo-dense 30.00 %" in done
    assert "(+4.00 pp; one seed each" in done
    assert (
        "The paper reports up to +6.35 pp (K = 200, 3000 rounds); the end-of-run gain is 2.35 pp"
        " short of it. Best against best, the gain is 2.35 pp short of it." in done
    )
    assert "from round 100 on" in done
    falling = copy.deepcopy(_synthetic_report({"zo-dense": 3000, "zo-pruned": 3000}))
    falling["runs"][0]["curve"][-1][1] = 0.20  # zo-dense drops 9.33 pp below its best at the end
    falling["runs"][0]["segments"] = [
        {"start_round": 0, "round": 1000, "seconds": 5000.0, "started_utc": "a"},
        {"start_round": 1000, "round": 3000, "seconds": 6000.0, "started_utc": "b"},
    ]
    fall_text = render_paper_scale(falling)
    assert "zo-pruned 34.00 % (round 3000), zo-dense 29.33 % (round 2900), +4.67 pp." in fall_text
    assert "zo-dense ends 9.33 pp below its best: past its peak the run loses accuracy" in fall_text
    assert "zo-pruned ends" not in fall_text
    assert "| 1 | 5.00, 3.00 |" in fall_text
    tiny = copy.deepcopy(_synthetic_report({"zo-dense": 3000, "zo-pruned": 3000}))
    tiny["info"]["k"] = 4
    tiny_text = render_paper_scale(tiny)
    assert "The scale differs from the paper's: K = 4 instead of 200." in tiny_text
    assert "Each run ran in one process, uninterrupted." in tiny_text
    resumed = copy.deepcopy(tiny)
    resumed["runs"][1]["processes"] = 2
    assert "Resumed after an interruption: zo-pruned-a0.5;" in render_paper_scale(resumed)
    resumed["runs"][1]["same_environment_throughout"] = False
    assert "(not bit-exact): zo-pruned-a0.5." in render_paper_scale(resumed)


def test_set_parses_toml_and_refuses_the_keys_that_define_the_rows():
    assert parse_set(["lr=0.02", 'engine="lean"', "ema=0.9", "optimizer=adam"]) == {
        "lr": 0.02,
        "engine": "lean",
        "ema": 0.9,
        "optimizer": "adam",
    }
    for key in ("method", "density", "k", "num-server-rounds", "resume-from"):
        with pytest.raises(SystemExit, match=f"--set {key}: fixed by paper_scale.py"):
            parse_set([f"{key}=1"])
