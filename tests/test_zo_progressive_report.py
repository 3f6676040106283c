"""The zo-progressive section of docs/results.md says what its data says.

Synthetic runs whose accuracies contrast (zo-progressive clearly above, clearly below, and
within the noise of zo-pruned) must give the three verdicts; costs and memory sentences follow
the numbers.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from zo_progressive_report import render_zo_progressive, verdict  # noqa: E402

MIB = 2**20


def _memory(**items: int) -> dict[str, int]:
    base = {"weights": 0, "mask": 0, "batch": 0, "prefix": 0, "features": 0}
    base.update(items)
    base["total_bytes"] = sum(base.values())
    return base


def _run(curve: list[float], staged: bool, **extra: Any) -> dict[str, Any]:
    run: dict[str, Any] = {
        "config": {"optimizer": "adam", "lr": 0.01},
        "seconds": 600.0,
        "accuracy": {str(10 * i): a for i, a in enumerate(curve)},
        "final_accuracy": curve[-1],
        "rejected_replies": 0,
        "client_seconds_per_round": 0.2 if staged else 0.5,
        "client_flops_per_round": 1.0e9 if staged else 4.0e9,
        "uplink_bytes_per_client_round": 1500.0,
        "client_extra_mem_bytes": 2 * MIB,
        "stage_changes": [{"round": 20}, {"round": 40}] if staged else [],
        "kept_coordinates": 6413,
        **extra,
    }
    if staged:
        run["per_stage"] = {
            "client_seconds": {"0": 0.3, "1": 0.2, "2": 0.1},
            "client_flops": {"0": 2e9, "1": 1e9, "2": 1e8},
            "client_extra_mem_bytes": {"0": MIB, "1": MIB, "2": MIB},
            "rounds": {"0": 20, "1": 20, "2": 20},
        }
    return run


def data(progressive: list[float], pruned: list[float]) -> dict[str, Any]:
    stage_memory = [
        _memory(activations=3 * MIB, perturbation=MIB // 100),
        _memory(prefix=3 * MIB, perturbation=MIB // 10),
        _memory(prefix=3 * MIB, perturbation=MIB // 2),
    ]
    return {
        "settings": {
            "nodes": 10,
            "model": "lenet5",
            "partitioner": "dirichlet",
            "alpha": 0.5,
            "rounds": 60,
            "seed": 3407,
            "batch-size": 32,
            "k": 200,
            "sigma": 1e-3,
            "fd": "forward",
            "local-steps": 1,
            "stage-rounds": "20",
            "data-dir": "../shared/data",
            "test-examples": 10_000,
        },
        "machine": {
            "cpu": "Test CPU",
            "cores": 2,
            "torch": "2.x",
            "threads": 1,
            "nice": 10,
            "load_before": [1.0, 1.0, 1.0],
            "load_after": [2.0, 2.0, 2.0],
        },
        "command": "python benchmarks/zo_progressive_run.py --rounds 60",
        "zo_pruned_memory": _memory(activations=3 * MIB, perturbation=MIB),
        "runs": {
            "zo-progressive": _run(
                progressive,
                True,
                stage_dims=[300, 1100, 5000],
                stage_need_bytes=[m["total_bytes"] for m in stage_memory],
                stage_memory=stage_memory,
            ),
            "zo-pruned": _run(pruned, False),
        },
    }


FLAT = [0.10, 0.20, 0.25, 0.30, 0.30, 0.30, 0.30]


def test_the_verdict_follows_the_accuracies():
    ahead = data([0.10, 0.20, 0.25, 0.30, 0.35, 0.35, 0.35], FLAT)
    behind = data([0.10, 0.15, 0.18, 0.20, 0.20, 0.20, 0.20], FLAT)
    level = data([0.10, 0.20, 0.25, 0.30, 0.301, 0.302, 0.300], FLAT)
    assert verdict(ahead)[0] == "better"
    assert verdict(behind)[0] == "worse"
    assert verdict(level)[0] == "not resolved"
    texts = {name: render_zo_progressive(d) for name, d in [("a", ahead), ("b", behind)]}
    assert (
        "* Verdict: at equal rounds zo-progressive is **better** than zo-pruned: 35.00 % "
        "against 30.00 % (mean of the last 3 evaluations; difference +5.00 pp" in texts["a"]
    )
    assert "zo-progressive is **worse** than zo-pruned: 20.00 % against 30.00 %" in texts["b"]
    assert "difference -10.00 pp" in texts["b"]
    level_text = render_zo_progressive(level)
    assert "* Verdict: **not resolved** at equal rounds" in level_text
    # Margin: 2 x max(test-set standard error of the difference, largest spread of the tails).
    _, diff, margin = verdict(level)
    se = ((0.301 * 0.699 + 0.3 * 0.7) / 10_000) ** 0.5
    assert abs(margin - 2 * max(se, 0.002)) < 1e-12 and abs(diff - 0.001) < 1e-12
    # A noisy tail widens the margin: the same means, now unresolved.
    noisy = copy.deepcopy(ahead)
    noisy["runs"]["zo-progressive"]["accuracy"] = {
        str(10 * i): a for i, a in enumerate([0.10, 0.20, 0.25, 0.30, 0.25, 0.45, 0.35])
    }
    assert verdict(noisy)[0] == "not resolved"


def test_costs_and_memory_follow_the_numbers():
    text = render_zo_progressive(data(FLAT, FLAT))
    assert "a zo-progressive client spends 0.25x the FLOPs and 0.40x the time" in text
    assert "| zo-progressive | 1 | 20 | 1,100 | 1.00 | 0.200 |" in text
    assert "| zo-pruned | all | 60 | 6,413 | 4.00 | 0.500 | 4.00 | 2.0 |" in text
    assert "MiB, below a zo-pruned client's 4.00 MiB" in text
    assert "stage 0: activations 3.00 MiB; stage 1: prefix 3.00 MiB" in text
    assert "zo-progressive's stage changes came at rounds 20, 40" in text
    assert "SmartFreeze" not in text  # no reference run in this data
    bigger = data(FLAT, FLAT)
    bigger["zo_pruned_memory"] = _memory(activations=MIB, perturbation=MIB)
    assert "MiB, above a zo-pruned client's 2.00 MiB" in render_zo_progressive(bigger)
    busy = data(FLAT, FLAT)
    busy["machine"]["load_before"] = [7.5, 6.0, 5.0]
    assert "load average (7.5, 6.0, 5.0) before" in render_zo_progressive(busy)


def test_the_isolated_memory_table_follows_its_data():
    def row(variant, engine, extra):
        return {
            "variant": variant,
            "engine": engine,
            "dim": 100,
            "extra": extra,
            "analytic": {"step_bytes": MIB},
        }

    memory = {
        "settings": {"model": "lenet5", "k": 200, "batch": 32, "density": 0.1, "data-dir": "d"},
        "machine": {"load_before": [1.0, 1.0, 1.0], "load_after": [1.5, 1.5, 1.5]},
        "command": "python benchmarks/zo_progressive_memory.py",
        "rows": [
            row("zo-pruned", "lean", 4 * MIB),
            row("stage-0", "lean", 2 * MIB),
            row("stage-1", "lean", 3 * MIB),
            row("zo-pruned", "fused", 2 * MIB),
            row("stage-0", "fused", 4 * MIB),
        ],
    }
    text = render_zo_progressive(data(FLAT, FLAT), memory)
    assert "| stage-1 | lean | 100 | 3.00 | 1.00 |" in text
    assert "* `lean`: a stage step's measured extra is 0.50-0.75x a zo-pruned step's" in text
    assert "* `fused`: a stage step's measured extra is 2.00-2.00x a zo-pruned step's" in text
    assert "Client memory of one step" not in render_zo_progressive(data(FLAT, FLAT))
