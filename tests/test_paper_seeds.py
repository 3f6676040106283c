"""Several seeds per comparison row: one ``seed`` key varies everything, rows aggregate to
mean ± sample standard deviation, and verdicts call a difference within the spread unresolved.

The summaries below are **synthetic** (made-up accuracies, not measurements): two data sets with
the same mean gains but different spreads must flip the accuracy verdict between "reproduced"
and "not resolved".
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from paper_notes import commands  # noqa: E402
from paper_report import render_report  # noqa: E402
from paper_summary import aggregate, compare, paper_scale_days  # noqa: E402
from paper_verdicts import accuracy_verdict, verdicts  # noqa: E402

from fedzo_flwr.config import RunConfig  # noqa: E402
from fedzo_flwr.data import load_dataset  # noqa: E402
from fedzo_flwr.data.client_data import partition_of  # noqa: E402
from fedzo_flwr.run.setup import initial_model  # noqa: E402
from fedzo_flwr.zo.server import ZOServer  # noqa: E402

FIGURES = ["figures/accuracy_vs_round.png", "figures/flops_and_bytes.png"]
ALPHAS = ("0.1", "0.5", "iid")


# ----------------------------------------------------------- one key drives every draw


def _draws(seed: int, data_dir: Path) -> dict[str, Any]:
    cfg = RunConfig.from_run_config(
        {"seed": seed, "prune-iterations": 1, "prune-repeats": 1, "data-dir": str(data_dir)}
    )
    init = initial_model(cfg)
    server = ZOServer(cfg, init.model, init.mask)
    data = load_dataset("cifar10", data_dir)
    return {
        "theta0": torch.cat([p.detach().flatten() for p in init.model.parameters()]),
        "mask": torch.cat([m.flatten() for m in init.mask.values()]),
        "partition": partition_of(cfg, data, 0, 10)[1],
        "round_seeds": [server.round_seed(r) for r in (1, 2, 3)],
        "step_seeds": server.expected_seeds(1, 0),
    }


def test_the_seed_key_changes_initialisation_mask_partitions_and_round_seeds(data_dir):
    a, again, b = _draws(3407, data_dir), _draws(3407, data_dir), _draws(3408, data_dir)
    assert torch.equal(a["theta0"], again["theta0"]) and torch.equal(a["mask"], again["mask"])
    assert (a["partition"] == again["partition"]).all()
    assert a["round_seeds"] == again["round_seeds"] and a["step_seeds"] == again["step_seeds"]
    # Another seed: another θ0, another mask, another split, other round seeds.
    assert not torch.equal(a["theta0"], b["theta0"])
    assert not torch.equal(a["mask"], b["mask"])
    assert a["mask"].sum() == b["mask"].sum()  # same density, other weights
    assert len(a["partition"]) != len(b["partition"]) or (a["partition"] != b["partition"]).any()
    assert set(a["round_seeds"]).isdisjoint(b["round_seeds"])
    assert set(a["step_seeds"]).isdisjoint(b["step_seeds"])


# ------------------------------------------------------------------- synthetic rows


def _seed_run(name: str, method: str, density: float, seed: int, last: float) -> dict[str, Any]:
    """One synthetic per-seed summary: accuracy rising from 0.1 to ``last`` at round 150, flat
    after (so final, last-2 and best accuracy are all ``last``)."""
    alpha = name.rsplit("-a", 1)[1]
    curve = [[r, 0.1 + (last - 0.1) * min(r, 150) / 150] for r in range(0, 201, 50)]
    return {
        "name": name,
        "group": "core",
        "alpha": alpha,
        "method": method,
        "prune_method": "ntk" if density < 1 else "none",
        "density": density,
        "kept_coordinates": 6413 if density < 1 else 62006,
        "curve": curve,
        "final_accuracy": curve[-1][1],
        "last2_accuracy": (curve[-1][1] + curve[-2][1]) / 2,
        "best_accuracy": curve[-1][1],
        "flops_per_client_round": 5e8 if density < 1 else 1e9,
        "uplink_per_client_round": 400.0,
        "downlink_per_client_round": 2000.0,
        "downlink_first_round": 9000.0,
        "pruning_phase_bytes": 0,
        "client_seconds": 0.2,
        "client_extra_mem_bytes": 2**20,
        "wall_seconds": 60.0 + seed % 10,
        "results_json": f"{name}-s{seed}",
        "seed": seed,
    }


def _rows(offsets: tuple[float, ...], seeds: tuple[int, ...] = (3407, 3408, 3409)) -> list:
    """Synthetic rows for every α: dense ZO ends at 0.20 + offset, pruned at 0.27 + offset
    (per seed), so every mean gain is +7 pp and the spread grows with the offsets."""
    rows = []
    for alpha in ALPHAS:
        for name, method, density, base in (
            (f"zo-dense-a{alpha}", "zo-dense", 1.0, 0.20),
            (f"zo-ntk-d0.1-a{alpha}", "zo-pruned", 0.1, 0.27),
        ):
            per_seed = [
                _seed_run(name, method, density, seed, base + off)
                for seed, off in zip(seeds, offsets)
            ]
            rows.append(aggregate(per_seed))
    return rows


def _info(seeds: list[int]) -> dict[str, Any]:
    return {
        "date": "2026-01-01 00:00 UTC",
        "quick": False,
        "cpu": "Test CPU",
        "cores": 2,
        "torch": "2.14.1",
        "python": "3.11.7",
        "workers": 2,
        "load_before": [0.1, 0.1, 0.1],
        "load_after": [0.1, 0.1, 0.1],
        "seconds": 3600.0,
        "model": "lenet5",
        "dataset": "cifar10",
        "clients": 5,
        "clients_per_round": 0,
        "rounds": 200,
        "k": 50,
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
        "eval_every": 50,
        "seed": seeds[0],
        "seeds": seeds,
        "engine": "fused",
        "engine_note": "ZO clients used the `fused` engine",
        "out_dir_rel": "outputs/x",
        "json_rel": "x.json",
        "gpus": [],
    }


def test_aggregate_is_mean_and_sample_standard_deviation():
    rows = _rows((-0.02, 0.0, 0.02))
    dense = rows[0]
    # Ground truth by hand: 0.18, 0.20, 0.22 -> mean 0.20, sample sd sqrt(0.0008 / 2) = 0.02.
    assert dense["n"] == 3 and dense["seeds"] == [3407, 3408, 3409]
    for key in ("final_accuracy", "last2_accuracy", "best_accuracy"):
        assert dense[key] == pytest.approx(0.20)
        assert dense[f"{key}_sd"] == pytest.approx(0.02)
    assert [r for r, _ in dense["curve"]] == [0, 50, 100, 150, 200]
    assert dense["curve"][2][1] == pytest.approx(0.1 + 0.1 * 100 / 150)  # mean curve
    assert dense["curve_sd"][0][1] == pytest.approx(0.0)  # round 0 is the same for every seed
    assert dense["curve_sd"][3][1] == pytest.approx(0.02)
    assert dense["wall_seconds"] == pytest.approx(68.0)  # mean of 67, 68, 69
    assert dense["kept_coordinates"] == 62006 and "seed" not in dense
    assert [s["seed"] for s in dense["per_seed"]] == [3407, 3408, 3409]
    # One seed: the summary as it was, with n = 1.
    single = aggregate([_seed_run("zo-dense-a0.5", "zo-dense", 1.0, 3407, 0.2)])
    assert single["n"] == 1 and single["seeds"] == [3407] and "final_accuracy_sd" not in single


def test_the_spread_decides_between_reproduced_and_not_resolved():
    tight = _rows((-0.005, 0.0, 0.005))  # synthetic: sd 0.5 pp per row, gain +7 pp
    loose = _rows((-0.07, 0.0, 0.07))  # synthetic: sd 7 pp per row, same mean gain
    c_tight = compare(tight[3], tight[2])  # α = 0.5: pruned against dense
    c_loose = compare(loose[3], loose[2])
    assert c_tight.diff_pp == pytest.approx(c_loose.diff_pp) == pytest.approx(7.0)
    assert c_tight.spread_pp is not None and c_loose.spread_pp is not None
    assert c_tight.spread_pp < 7.0 < c_loose.spread_pp  # spread = sqrt(sd_a² + sd_b²)
    assert c_tight.spread_pp == pytest.approx(100 * math.sqrt(2 * 0.005**2))
    assert c_loose.spread_pp == pytest.approx(100 * math.sqrt(2 * 0.07**2))
    v_tight = verdicts(tight, None)[0]
    v_loose = verdicts(loose, None)[0]
    assert v_tight["verdict"].startswith(
        "reproduced at this scale (3 seeds each, every difference beyond the spread"
    )
    assert v_loose["verdict"] == "not resolved (every difference within the spread of 3 seeds)"
    # The numbers behind it are printed as mean ± sd with the spread.
    assert "α=0.5: 27.0 ± 0.5% vs 20.0 ± 0.5% (+7.0 pp, spread 0.7 pp" in v_tight["ours"]


def test_one_seed_keeps_the_noise_rule_and_says_one_seed():
    rows = [aggregate([s]) for s in (_seed_run(n, m, d, 3407, a) for n, m, d, a in _single())]
    (verdict,) = [v["verdict"] for v in verdicts(rows, None) if v["claim"].startswith("accuracy")]
    # Gains +3 pp at every α (>= the 2-point noise threshold, below the paper's 6.35).
    assert verdict == "partly (pruned ahead at every α, by less than 6.35 pp; one seed each)"
    comparisons = [compare(rows[i + 1], rows[i]) for i in (0, 2, 4)]
    assert all(c.spread_pp is None and c.n == 1 for c in comparisons)
    assert accuracy_verdict(comparisons, improving=False).endswith("one seed each)")
    text = render_report(rows, None, FIGURES, _info([3407]))
    assert "Accuracy differences below 2 points between single-seed runs" in text
    assert "| α | method | density | final acc. | last-2 acc. | best acc. | run wall (s) |" in text
    assert "* **One seed per configuration** (seed 3407)." in text


def _single() -> list[tuple[str, str, float, float]]:
    return [
        (f"{name}-a{alpha}", method, density, end)
        for alpha in ALPHAS
        for name, method, density, end in (
            ("zo-dense", "zo-dense", 1.0, 0.20),
            ("zo-ntk-d0.1", "zo-pruned", 0.1, 0.23),
        )
    ]


def test_the_report_shows_mean_sd_and_n_per_row():
    rows = _rows((-0.07, 0.0, 0.07))
    info = _info([3407, 3408, 3409])
    text = render_report(rows, None, FIGURES, info)
    assert "| α | method | density | n | final acc. | last-2 acc. | best acc. |" in text
    assert "| 0.5 | zo-dense (BAFFLE) | 1 | 3 | 20.00 ± 7.00% |" in text
    assert "| 0.5 | zo-pruned ntk d=0.1 | 0.1 | 3 | 27.00 ± 7.00% |" in text
    assert "3 seeds (3407, 3408, 3409) per configuration" in text
    assert "is **not resolved** when |Δ| ≤ √(sd_a² + sd_b²)" in text
    assert "* **3 seeds per configuration** (3407, 3408, 3409)." in text
    assert "Every row has all its seeds." in text
    assert "--seeds 3 --seed 3407" in commands(info)[-1]
    # The paper-scale estimate is per seed: three seeds took three times as long.
    assert paper_scale_days(info) == pytest.approx(paper_scale_days({**_info([3407])}) / 3)
