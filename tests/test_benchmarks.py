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
def test_progressive_memory_quick_measures_every_stage_against_the_analytic_model(
    tmp_path, data_dir
):
    from fedzo_flwr.progressive import (
        NodeInfo,
        build_staged,
        device_budget,
        eligibility_report,
        memory_plan,
    )

    result = run_benchmark("progressive_memory.py", tmp_path / "progressive.json", data_dir)
    machine = result["machine"]
    assert {"cpu", "cores", "torch", "threads", "load_before", "load_after"} <= set(machine)
    assert result["settings"]["batch"] == 8 and result["settings"]["rounds_per_stage"] == "equal"
    rows = result["rows"]
    stages = {m: [r["stage"] for r in rows if r["model"] == m] for m in ("lenet5", "resnet20")}
    assert stages == {"lenet5": [0, 1, 2, None], "resnet20": [0, None]}
    for row in rows:
        assert row["method_of_measurement"] == "vmhwm", row
        assert row["extra"] > 0 and row["then_extra"] > 0 and row["forward_extra"] >= 0, row
        assert row["extra_runs"] == [row["extra"]] and row["repeats"] == 1
    # The analytic columns are the library's model, exactly (same seed, batch and stages).
    for model in ("lenet5", "resnet20"):
        staged = build_staged(model, seed=3407)
        assert staged.num_stages == 3
        plan = memory_plan(staged, 8)
        mine = {r["stage"]: r for r in rows if r["model"] == model}
        for t, row in mine.items():
            expected = plan.full if t is None else plan.stages[t]
            assert row["analytic"] == expected.as_dict(), (model, t)
            assert row["num_stages"] == 3
    summaries = {s["model"]: s for s in result["summaries"]}
    assert summaries["lenet5"]["stages_measured"] == [0, 1, 2]
    assert summaries["resnet20"]["stages_measured"] == [0]
    assert "analytic_plan" not in summaries["resnet20"]  # peak/average need every stage
    lenet_plan = memory_plan(build_staged("lenet5", seed=3407), 8).as_dict()
    assert summaries["lenet5"]["analytic_plan"] == lenet_plan
    shares = [p["measured_share"] for p in summaries["lenet5"]["per_stage"]]
    assert summaries["lenet5"]["measured_peak"] == max(shares)
    assert summaries["lenet5"]["measured_average"] == pytest.approx(sum(shares) / 3)
    for p in summaries["resnet20"]["per_stage"]:
        assert p["analytic_vs_full"] < 1, p
    # The population fractions follow from the reported needs (100 nodes, memory-seed 0).
    for s in summaries.values():
        per_stage, full = s["per_stage"], s["full"]
        needs = {
            "measured": ([p["measured_share"] for p in per_stage], full["measured_share"]),
            "analytic": ([p["analytic_total"] for p in per_stage], full["analytic_total"]),
        }
        for kind, (stage_needs, full_need) in needs.items():
            for profile in ("profl-uniform", "device-tier"):
                nodes = [
                    NodeInfo(i, device_budget(profile, i, full_need, seed=0).budget_bytes)
                    for i in range(100)
                ]
                report = eligibility_report(nodes, stage_needs, full_need, margin=0.0)
                got = s["population"][kind][profile]
                assert got["stages"] == [len(ids) / 100 for ids in report.per_stage]
                assert got["full_model"] == len(report.full_model) / 100
                assert got["no_stage"] == len(report.never_eligible) / 100
        uniform = s["population"]["analytic"]["profl-uniform"]
        assert all(f > uniform["full_model"] for f in uniform["stages"]), s["model"]


@pytest.mark.slow
def test_zo_progressive_quick_counts_flops_and_dimensions_per_stage(tmp_path, data_dir):
    import math

    result = run_benchmark("zo_progressive.py", tmp_path / "zp.json", data_dir)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["zo-pruned", "stage-0", "stage-1", "stage-2"]
    full = rows["zo-pruned"]
    assert full["dim"] == 6413 and full["flops_ratio"] == 1.0  # lenet5, density 0.1
    for label, row in rows.items():
        assert row["k"] == 20 and row["passes"] == 21
        assert row["flops"] == row["flops_prefix"] + row["passes"] * row["flops_pass"], label
        assert row["cosine_predicted"] == pytest.approx(math.sqrt(20 / (21 + row["dim"])))
        assert len(row["cosines"]) == 2 and row["max_abs_fused_vs_lean"] < 2e-6
        assert row["fused_time_s"] > 0 and row["lean_time_s"] > 0
    stages = [rows[f"stage-{t}"] for t in range(3)]
    assert stages[0]["flops_prefix"] == 0
    assert 0 < stages[1]["flops_prefix"] < stages[2]["flops_prefix"]
    # The prefix plus the last stage's active pass is one forward of the whole masked model.
    assert stages[2]["flops_prefix"] + stages[2]["flops_pass"] == full["flops_pass"]
    assert all(s["dim"] < full["dim"] and s["flops"] < full["flops"] for s in stages)
    assert result["machine"]["load_before"] and result["machine"]["load_after"]


@pytest.mark.slow
def test_zo_progressive_run_quick_compares_at_equal_rounds(tmp_path, data_dir):
    result = run_benchmark("zo_progressive_run.py", tmp_path / "run.json", data_dir)
    runs = result["runs"]
    assert list(runs) == ["zo-progressive", "zo-pruned"] and result["quick"] is True
    zp, base = runs["zo-progressive"], runs["zo-pruned"]
    assert list(zp["accuracy"]) == list(base["accuracy"]) == ["0", "1", "2", "3"]
    assert [c["round"] for c in zp["stage_changes"]] == [1, 2]  # 3 rounds: one per stage
    assert zp["per_stage"]["rounds"] == {"0": 1, "1": 1, "2": 1}
    # Equal recipe: the same K, seeds, mask; the FLOPs per stage are the stage's prefix + passes.
    for key in ("k", "sigma", "seed", "batch-size", "optimizer", "lr", "density"):
        assert zp["config"][key] == base["config"][key], key
    assert zp["config"]["k"] == result["settings"]["k"] == 8  # --quick's K reaches the runs
    assert zp["kept_coordinates"] == base["kept_coordinates"] == 6413
    flops = list(zp["per_stage"]["client_flops"].values())
    assert flops[0] > flops[1] > flops[2] and max(flops) < base["client_flops_per_round"]
    assert zp["rejected_replies"] == base["rejected_replies"] == 0
    assert len(zp["stage_need_bytes"]) == 3 and result["zo_pruned_memory"]["total_bytes"] > 0
    assert result["settings"]["test-examples"] == 10_000
    assert not result["settings"]["data-dir"].startswith("/")


@pytest.mark.slow
def test_zo_progressive_memory_quick_measures_every_stage(tmp_path, data_dir):
    result = run_benchmark("zo_progressive_memory.py", tmp_path / "mem.json", data_dir)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["zo-pruned", "stage-0", "stage-1", "stage-2"]
    assert rows["zo-pruned"]["dim"] == 6413
    assert all(0 < rows[f"stage-{t}"]["dim"] < 6413 for t in range(3))
    for row in rows.values():
        assert row["engine"] == "lean" and row["k"] == 10
        assert row["extra"] > 0 and row["step_peak_rss"] > row["rss_idle"]
        a = row["analytic"]
        assert a["total_bytes"] == a["weights"] + a["mask"] + a["batch"] + a["step_bytes"]


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
    # The whole ClientApp process, one first-contact message each (quick: lenet5).
    app = {(r["method"], r.get("engine"), r.get("micro_batch")): r for r in result["clientapp"]}
    streams = {("zo", "stream", m) for m in (0, 4, 1)}
    assert set(app) == {("fedavg", None, None), ("zo", "lean", 0)} | streams
    prunable = sum(p.numel() for _, p in prunable_parameters(model))
    kept_prunable = sum(int(m.sum()) for m in mask.values())
    params = sum(p.numel() for p in model.parameters())
    for key, row in app.items():
        assert row["process_peak"] >= row["step_peak_rss"] > row["rss_after_imports"] > 0, key
        assert row["partition_examples"] > 0 and row["data_dir"] == result["rows"][0]["data_dir"]
        if key in streams:  # sparse at rest: kept values and bitmaps, no index, nothing dense
            assert row["held_class"] == "StreamModel"
            assert row["held"] == {"weights": 4 * kept, "mask": bitmaps, "index": 0}
        elif key[0] == "zo":  # dense weights, a bool mask and int64 indices of the kept entries
            assert row["held"] == {
                "weights": 4 * params,
                "mask": prunable,
                "index": 8 * kept_prunable,
            }
        else:  # backprop, dense: all kept, no index tables
            assert row["held"] == {"weights": 4 * params, "mask": prunable, "index": 0}
    assert {q["zo"] for q in result["clientapp_ratios"]} == {
        "ZO pruned d=0.1 (lean)",
        "ZO pruned d=0.1 (stream)",
        "ZO pruned d=0.1 (stream, micro-batch 4)",
        "ZO pruned d=0.1 (stream, micro-batch 1)",
    }
    backprop = app["fedavg", None, None]["process_peak"]
    for q in result["clientapp_ratios"]:
        engine = q["zo"].removeprefix("ZO pruned d=0.1 (").removesuffix(")").split(", micro-batch ")
        own = app["zo", engine[0], int(engine[1]) if len(engine) > 1 else 0]["process_peak"]
        assert q["process_vs_backprop"] == backprop / own
    assert not Path(result["rows"][0]["data_dir"]).is_absolute()
