"""The default-run record (benchmarks/default_run.py) is computed from the run's results.json."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from default_run import END, START, readme_block, summarize  # noqa: E402


def _per_client(values: list[float]) -> dict[str, Any]:
    return {
        "per_client": {str(i): v for i, v in enumerate(values)},
        "total": sum(values),
        "mean": sum(values) / len(values),
        "max": max(values),
    }


def _results() -> dict[str, Any]:
    def trained(rnd: int, up: list[float], down: list[float], acc: float) -> dict[str, Any]:
        return {
            "round": rnd,
            "uplink_bytes": _per_client(up),
            "downlink_bytes": _per_client(down),
            "client_seconds": _per_client([0.1 * rnd, 0.3 * rnd]),
            "client_peak_mem_bytes": _per_client([900.0 + rnd, 1000.0 * rnd]),
            "round_seconds": float(rnd),
            "accuracy": acc,
        }

    return {
        "setup": {
            "density": 0.1,
            "prune_seconds": 3.5,
            "kept_coordinates": 6413,
            "layer_densities": {"conv1": 0.5},
            "client_round_forward_flops": 4_000,
        },
        "rounds": [
            {"round": 0, "accuracy": 0.1, "loss": 2.3},
            trained(1, [1600.0, 1640.0], [34000.0, 34400.0], 0.2),
            trained(2, [1500.0, 1540.0], [26600.0, 26700.0], 0.25),
            trained(3, [1520.0, 1560.0], [26600.0, 26600.0], 0.3),
        ],
        "final": {"accuracy": 0.3, "loss": 1.9, "rounds": 3, "seconds": 12.5},
        "config": {"method": "zo-pruned", "k": 200, "num-server-rounds": 3, "seed": 1},
        "environment": {"lock_sha256": "ab"},
    }


def test_default_run_record_is_computed_from_the_results() -> None:
    record = summarize(_results(), wall=61.0)
    assert record["wall_seconds"] == 61.0 and record["strategy_seconds"] == 12.5
    assert record["median_round_seconds"] == 2.0
    assert record["client_seconds_mean"] == pytest.approx((0.2 + 0.4 + 0.6) / 3, rel=1e-15)
    assert record["final"] == {"accuracy": 0.3, "loss": 1.9, "rounds": 3}
    assert record["curve"] == [[0, 0.1], [1, 0.2], [2, 0.25], [3, 0.3]]
    # The first round carries the mask and fingerprint: it is reported apart from the rest.
    assert record["uplink_first_round"] == 1620.0
    assert record["uplink_per_client_round"] == (1520.0 + 1540.0) / 2
    assert record["downlink_first_round"] == 34200.0
    assert record["downlink_per_client_round"] == (26650.0 + 26600.0) / 2
    assert record["uplink_total_bytes"] == 3240 + 3040 + 3080
    assert record["downlink_total_bytes"] == 68400 + 53300 + 53200
    assert record["client_peak_mem_bytes_max"] == 3000.0
    assert record["client_forward_flops_per_round"] == 4_000
    assert record["layer_densities"] == {"conv1": 0.5}
    assert "layer_densities" not in record["setup"] and record["setup"]["prune_seconds"] == 3.5
    assert record["environment"] == {"lock_sha256": "ab"}
    assert record["config"] == {"method": "zo-pruned", "k": 200, "num-server-rounds": 3}
    assert record["clients"] == 2  # from the per-client byte records


def test_the_readme_block_is_the_recorded_default_run() -> None:
    import json

    record = json.loads((ROOT / "docs/results/default_run.json").read_text())
    readme = (ROOT / "README.md").read_text()
    begin, end = readme.index(START), readme.index(END) + len(END) + 1
    assert readme[begin:end] == readme_block(record)
    block = readme_block(record)
    final = record["final"]
    assert f"**{final['rounds']}: {100 * final['accuracy']:.1f} %**" in block
    assert f"**{record['uplink_per_client_round']:,.0f} B** = {4 * record['config']['k']:,} B" in (
        block
    )
