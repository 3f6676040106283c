"""The benchmarks' quick modes run and check what they claim (CI keeps them from rotting).

Timings are printed, never asserted; what is asserted is what the benchmarks verify: every
engine returns the naive reference's K scalars, and the server's shared-seed round rebuilds
one update whatever the number of clients.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, out: Path, data_dir: Path, *extra: str) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / name), "--quick", "--json", str(out)]
    command += ["--data-dir", str(data_dir), *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_zo_client_quick_engines_agree_with_the_naive_reference(tmp_path, data_dir):
    result = run_benchmark("zo_client.py", tmp_path / "zo.json", data_dir)
    rows = result["rows"]
    engines = {(r["density"], r["engine"]) for r in rows}
    assert engines == {(d, e) for d in (1.0, 0.1) for e in ("naive", "lean", "batched", "fused")}
    for row in rows:
        assert row["k"] == 20 and row["agrees"], row
        assert row["max_abs_diff_vs_naive"] < 1e-6
        assert row["time_s"] > 0 and row["dense_gflops"] > 0
    # Memory is measured for every engine but batched in quick mode, the lean one included.
    lean = [r for r in rows if r["engine"] == "lean"]
    assert all(r["kept_bytes"] == 4 * r["kept_coordinates"] for r in lean)
    assert result["machine"]["matmul_gflops_before"]["best"] > 0


@pytest.mark.slow
def test_server_rounds_quick_shared_mode_rebuilds_once(tmp_path, data_dir):
    result = run_benchmark("server_rounds.py", tmp_path / "server.json", data_dir)
    for row in result["rows"]:
        expected = 1 if row["seed_mode"] == "shared" else row["clients"]
        assert row["reconstructions_per_round"] == expected, row
    assert [r["clients"] for r in result["strategy_rows"]] == [10, 100]
    assert all(r["rounds_timed"] >= 1 and r["round_s"] > 0 for r in result["strategy_rows"])


@pytest.mark.slow
def test_client_memory_quick_measures_backprop_lean_and_stream(tmp_path, data_dir):
    from fedzo_flwr.models import build_model
    from fedzo_flwr.pruning import prune
    from fedzo_flwr.sparse.mask import prunable_parameters
    from fedzo_flwr.sparse.space import KeptSpace

    result = run_benchmark("client_memory.py", tmp_path / "memory.json", data_dir)
    rows = result["rows"]
    jobs = {(r["method"], r.get("engine"), r["density"], r.get("micro_batch")) for r in rows}
    zo = {
        ("zo", e, d, m) for d in (1.0, 0.1) for e, m in (("lean", 0), ("stream", 0), ("stream", 4))
    }
    assert jobs == {("backprop", None, d, None) for d in (1.0, 0.1)} | zo
    # The stream client's analytic weights and mask are exact byte counts of what it holds.
    model = build_model("lenet5", seed=3407)
    mask = prune("random", model, "lenet5", 0.1, seed=0)
    kept = KeptSpace(model, mask).dim
    bitmaps = sum((p.numel() + 7) // 8 for _, p in prunable_parameters(model))
    for row in rows:
        assert row["extra"] > 0 and row["step_peak_rss"] > row["rss_idle"] > 0, row
        if row.get("engine") != "stream":
            continue
        analytic = row["analytic"]
        if row["density"] == 1.0:
            assert (analytic["weights"], analytic["mask"]) == (4 * row["param_count"], 0)
        else:
            assert (analytic["weights"], analytic["mask"]) == (4 * kept, bitmaps)
    micro = {r["density"]: r for r in rows if r.get("micro_batch") == 4}
    whole = {r["density"]: r for r in rows if r.get("engine") == "stream" and not r["micro_batch"]}
    for density, row in micro.items():  # an eighth of the batch per pass: fewer activations
        assert row["analytic"]["activations"] < whole[density]["analytic"]["activations"]
    assert {v["zo"] for v in result["speed"]} == {
        "ZO dense (stream)",
        "ZO dense (stream, micro-batch 4)",
        "ZO pruned d=0.1 (stream)",
        "ZO pruned d=0.1 (stream, micro-batch 4)",
    }
