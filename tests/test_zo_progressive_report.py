"""The zo-progressive section of docs/results.md says what its data says.

Synthetic runs whose accuracies contrast (zo-progressive clearly above, clearly below, and
within the noise of zo-pruned) must give the three verdicts; costs and memory sentences follow
the numbers.
"""

from __future__ import annotations

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
        "config": {"optimizer": "adam", "lr": 0.01, "engine": "fused", "engine-memory-mb": 32.0},
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
    ahead = data([0.10, 0.20, 0.30, 0.40, 0.40, 0.40, 0.40], FLAT)
    behind = data([0.10, 0.15, 0.18, 0.20, 0.20, 0.20, 0.20], FLAT)
    level = data([0.10, 0.20, 0.25, 0.30, 0.301, 0.302, 0.300], FLAT)
    assert verdict(ahead)[0] == "better"
    assert verdict(behind)[0] == "worse"
    assert verdict(level)[0] == "not resolved"
    # Flat tails: the margin is 2 x the test-set standard error of the difference alone.
    se = ((0.4 * 0.6 + 0.3 * 0.7) / 10_000) ** 0.5
    _, diff, margin = verdict(ahead)
    assert abs(diff - 0.1) < 1e-12 and abs(margin - 2 * se) < 1e-12
    text = render_zo_progressive(ahead)
    assert (
        "* Verdict: at equal rounds zo-progressive is **better** than zo-pruned: 40.00 % "
        f"against 30.00 % at round 60 (difference +10.00 pp, noise margin {200 * se:.2f} pp"
    ) in text
    assert "zo-progressive was not rising faster than zo-pruned when the run ended" in text
    text = render_zo_progressive(behind)
    assert "zo-progressive is **worse** than zo-pruned: 20.00 % against 30.00 %" in text
    assert "difference -10.00 pp" in text
    assert "* Verdict: **not resolved** at equal rounds" in render_zo_progressive(level)
    # A scattered tail widens the margin: the same final accuracies, now unresolved.
    noisy = data([0.10, 0.20, 0.25, 0.40, 0.30, 0.45, 0.40], FLAT)
    assert verdict(noisy)[0] == "not resolved" and abs(verdict(noisy)[1] - 0.1) < 1e-12
    # A curve still climbing at the end is said to be.
    rising = data([0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.22], FLAT)
    assert verdict(rising)[0] == "worse"
    assert (
        "gained +2.00 pp per evaluation, zo-pruned +0.00 pp: zo-progressive was still "
        "rising faster" in render_zo_progressive(rising)
    )


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
        "settings": {
            "model": "lenet5",
            "k": 200,
            "batch": 32,
            "density": 0.1,
            "ntk_iterations": 5,
            "data-dir": "d",
        },
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
