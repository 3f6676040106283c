"""The paper-comparison report says what its data says, and rebuilds docs/results.md exactly.

Two synthetic matrices that differ in scale (K, rounds), GPU, machine load and whether FedAvg
trains must give different sentences; the checked-in summary must give the checked-in report.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from paper_report import render_report, results_appendix  # noqa: E402

FIGURES = ["figures/accuracy_vs_round.png", "figures/flops_and_bytes.png"]


def _run(name: str, method: str, density: float, curve: list[tuple[int, float]]) -> dict[str, Any]:
    dense = density >= 1
    return {
        "name": name,
        "group": "ablation" if method == "fedavg" and not dense else "core",
        "alpha": "0.5",
        "method": method,
        "prune_method": "none" if dense else "ntk",
        "density": density,
        "kept_coordinates": 62006 if dense else 6413,
        "curve": [list(p) for p in curve],
        "final_accuracy": curve[-1][1],
        "last2_accuracy": (curve[-1][1] + curve[-2][1]) / 2,
        "best_accuracy": max(a for _, a in curve),
        "flops_per_client_round": 1e9 if dense else 5e8,
        "uplink_per_client_round": 400.0,
        "downlink_per_client_round": 2000.0,
        "downlink_first_round": 9000.0,
        "pruning_phase_bytes": 0,
        "client_seconds": 0.2,
        "client_extra_mem_bytes": 2**20,
        "wall_seconds": 60.0,
    }


def _matrix(k: int, rounds: int, gpus: list[str], load: float, fedavg_final: float) -> tuple:
    q = rounds // 4

    def curve(end: float) -> list[tuple[int, float]]:
        return [(i * q, 0.1 + i * (end - 0.1) / 4) for i in range(4)] + [(rounds, end)]

    runs = [
        _run("fedavg-dense-a0.5", "fedavg", 1.0, curve(0.46)),
        _run("zo-dense-a0.5", "zo-dense", 1.0, curve(0.20)),
        _run("zo-ntk-d0.1-a0.5", "zo-pruned", 0.1, curve(0.27)),
        _run("fedavg-ntk-d0.1-a0.5", "fedavg", 0.1, curve(fedavg_final)),
    ]
    info = {
        "date": "2026-01-01 00:00 UTC",
        "quick": False,
        "cpu": "Test CPU",
        "cores": 16,
        "torch": "2.14.1",
        "python": "3.11.7",
        "workers": 2,
        "load_before": [load, load, load],
        "load_after": [load, load, load],
        "seconds": 600.0,
        "model": "lenet5",
        "dataset": "cifar10",
        "clients": 5,
        "clients_per_round": 0,
        "rounds": rounds,
        "k": k,
        "local_steps": 1,
        "sigma": 0.001,
        "batch": 32,
        "optimizer": "adam",
        "lr": 0.01,
        "local_batches": 5,
        "fedavg_lr": 0.05,
        "client_optimizer": "sgd",
        "torch_threads": 1,
        "prune_iterations": 20,
        "prune_repeats": 5,
        "eval_every": q,
        "seed": 3407,
        "engine": "fused",
        "engine_note": "ZO clients used the `fused` engine",
        "out_dir_rel": "outputs/x",
        "json_rel": "x.json",
        "gpus": gpus,
    }
    return runs, info


def test_report_sentences_follow_the_data():
    small = render_report(*_swap(_matrix(50, 200, [], 6.0, 0.14)))
    large = render_report(*_swap(_matrix(200, 3000, ["NVIDIA H200"], 0.1, 0.42)))
    # GPU and scale.
    assert "**No GPU was visible to these runs**" in small and "No GPU" not in large
    assert "A GPU was visible to these runs (NVIDIA H200)." in large
    assert "K = 50 instead of 200, 200 rounds instead of 3000." in small
    assert "This run is at the paper's scale (K = 200, 3000 rounds)." in large
    whole = "The whole matrix at the paper's scale is `python benchmarks/paper_comparison.py"
    assert whole + " --clients 10 " in small
    assert "The whole matrix at the paper's scale is" not in large
    assert "this matrix is K = 200 and 3000 rounds on 16 CPU cores" in large
    # Machine load.
    assert "* Shared machine: other jobs were running (load average (6.0, 6.0, 6.0)" in small
    assert "* The machine was idle when the matrix started (load average (0.1, 0.1, 0.1)" in large
    # FedAvg on the mask, last-2 accuracy minus round 0: (0.13 + 0.14) / 2 - 0.1 = +3.5 pp
    # ("barely": under 5), (0.34 + 0.42) / 2 - 0.1 = +28.0 pp; ZO on that mask: +14.9 pp.
    assert "(d = 0.1, α = 0.5) barely trains in these rounds (+3.5 pp over round 0)" in small
    assert "(d = 0.1, α = 0.5) trains in these rounds (+28.0 pp over round 0)" in large
    assert "the zeroth-order run on the same mask trains (+14.9 pp)" in small
    assert (
        "Every dense FedAvg run is ahead of every zeroth-order run (by at least 16.6 pp)" in small
    )
    # Recorded settings, not fixed text.
    assert "| client batch | 32, 1 ZO step(s) per round |" in small
    assert "FedAvg uses 5 local SGD steps (lr 0.05)." in small


def _swap(matrix: tuple) -> tuple:
    runs, info = matrix
    return runs, None, FIGURES, info


def test_missing_records_are_said_to_be_missing():
    runs, info = _matrix(50, 200, [], 6.0, 0.14)
    old = copy.deepcopy(info)
    for key in ("gpus", "local_steps", "client_optimizer", "engine"):
        del old[key]
    text = render_report(runs, None, FIGURES, old)
    assert "Whether a GPU was visible to these runs is not recorded in the summary." in text
    assert "| client batch | 32, not recorded per round |" in text
    assert "5 local steps (lr 0.05) (client optimizer not recorded)" in text
    assert "--engine fused" in text  # from the recorded engine note


def test_docs_results_md_is_the_report_of_its_json():
    summary = json.loads((ROOT / "docs/results/paper_comparison.json").read_text())
    memory = json.loads((ROOT / "docs/results/client_memory.json").read_text())
    figures = [*FIGURES, "figures/client_memory.png"]
    text = render_report(summary["runs"], memory, figures, summary["info"])
    assert text + results_appendix(ROOT / "docs") == (ROOT / "docs/results.md").read_text()
