"""Progressive training, server side: pace controller, device budgets, participant selector."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from fedzo_flwr.errors import CheckpointError, ConfigError
from fedzo_flwr.progressive.devices import DEVICE_TIERS, PROFL_RATIO_RANGE, device_budget
from fedzo_flwr.progressive.memory import memory_plan
from fedzo_flwr.progressive.pace import PaceController, PaceSettings
from fedzo_flwr.progressive.selector import (
    NodeInfo,
    Selector,
    SpeedTracker,
    eligibility_report,
    label_groups,
)
from fedzo_flwr.progressive.staged import build_staged

NUMEL = 30_000  # > the 10,000-coordinate sample


def _oscillating(rounds: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(NUMEL, generator=g)
    return [c + 0.01 * (-1) ** r * torch.randn(NUMEL, generator=g) for r in range(rounds + 1)]


def _drifting(rounds: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(NUMEL, generator=g)
    return [r * 0.01 * v + 1e-4 * torch.randn(NUMEL, generator=g) for r in range(rounds + 1)]


def _run(settings: PaceSettings, trajectory: list[torch.Tensor], stage: int = 0) -> list:
    pace = PaceController(settings)
    pace.begin_stage(stage, trajectory[0])
    steps = []
    for theta in trajectory[1:]:
        steps.append(pace.step(theta))
        if steps[-1].freeze:
            break
    return steps


# --- pace controller -------------------------------------------------------------------------


def test_effective_movement_matches_the_formula():
    path = [np.array([0.0, 0.0]), np.array([1.0, 0.0]), np.array([1.0, 2.0]), np.array([0.0, 1.0])]
    pace = PaceController(PaceSettings(window=2))
    pace.begin_stage(0, torch.tensor(path[0]))
    metrics = [pace.step(torch.tensor(p)).metric for p in path[1:]]
    # r=2: |(1,2)-(0,0)| / (1 + 2) = 1; r=3: |(0,1)-(1,0)| / (2 + 2) = 2 / 4
    assert metrics == [None, 1.0, 0.5]


def test_freezes_on_oscillation_not_on_drift():
    settings = PaceSettings(tau=0.3, window=6, patience=3, min_rounds=1, max_rounds=40)
    steps = _run(settings, _oscillating(60))
    print("oscillating EM:", [None if s.metric is None else round(s.metric, 3) for s in steps])
    assert [s.metric is None for s in steps[:5]] == [True] * 5
    assert all(s.metric < 0.3 for s in steps[5:])
    assert (
        steps[-1].freeze and steps[-1].reason == "settled" and len(steps) == 8
    )  # W + patience - 1
    drift = _run(settings, _drifting(60))
    print("drifting EM:", [None if s.metric is None else round(s.metric, 3) for s in drift][-5:])
    assert all(s.metric > 0.9 for s in drift[5:])
    assert len(drift) == 40 and drift[-1].reason == "max-rounds"
    assert not any(s.freeze for s in drift[:-1])


def test_min_rounds_is_respected():
    settings = PaceSettings(tau=0.3, window=6, patience=3, min_rounds=15, max_rounds=40)
    steps = _run(settings, _oscillating(60))
    assert len(steps) == 15 and steps[-1].reason == "settled"
    assert all(s.settled for s in steps[7:])


def test_sample_is_seeded_and_bounded():
    pace = PaceController(PaceSettings(seed=5))
    pace.begin_stage(1, torch.zeros(NUMEL))
    again = PaceController(PaceSettings(seed=5))
    again.begin_stage(1, torch.zeros(NUMEL))
    other = PaceController(PaceSettings(seed=5))
    other.begin_stage(2, torch.zeros(NUMEL))
    assert pace.index.numel() == 10_000 and len(set(pace.index.tolist())) == 10_000
    assert torch.equal(pace.index, again.index) and not torch.equal(pace.index, other.index)
    small = PaceController(PaceSettings())
    small.begin_stage(0, torch.zeros(7))
    assert small.index.tolist() == list(range(7))
    with pytest.raises(ValueError, match="expected 7"):
        small.step(torch.zeros(8))


def test_apf_rule():
    settings = PaceSettings(rule="apf", patience=2, min_rounds=1, max_rounds=40, apf_level=0.5)
    osc = _run(settings, _oscillating(60))
    assert osc[-1].reason == "settled" and len(osc) < 40
    drift = _run(settings, _drifting(60))
    assert drift[-1].reason == "max-rounds" and len(drift) == 40
    assert max(s.metric for s in drift) < 0.01
    # Ground truth of the metric on 3 coordinates: deltas +1, -1 then +1 on coordinate 0 only.
    pace = PaceController(PaceSettings(rule="apf", apf_threshold=0.05))
    pace.begin_stage(0, torch.zeros(3))
    metrics = [pace.step(torch.tensor(v)).metric for v in ([1.0, 0, 0], [0.0, 0, 0])]
    # coord 0: EMA(Δ) = 0.01 then 0.0099 - 0.01 = -1e-4, EMA(|Δ|) = 0.0199 -> ratio 0.005 < 0.05
    assert metrics == [pytest.approx(2 / 3), pytest.approx(1.0)]


def test_fixed_schedule():
    settings = PaceSettings(rule="fixed", stage_rounds=(3, 5))
    assert len(_run(settings, _drifting(20), stage=0)) == 3
    assert len(_run(settings, _drifting(20), stage=1)) == 5
    last = _run(settings, _drifting(20), stage=2)
    assert len(last) == 5 and last[-1].reason == "schedule"
    assert last[-1].metric is None  # reported (effective movement), undefined before W rounds


def test_resume_from_state_dict_is_bit_exact():
    for rule in ("effective-movement", "apf"):
        settings = PaceSettings(rule=rule, tau=0.3, window=4, patience=2, min_rounds=3)
        trajectory = _oscillating(30, seed=2)
        straight = PaceController(settings)
        straight.begin_stage(0, trajectory[0])
        first = [straight.step(t) for t in trajectory[1:11]]
        buffer = io.BytesIO()
        torch.save(straight.state_dict(), buffer)
        buffer.seek(0)
        resumed = PaceController(settings)
        resumed.load_state_dict(torch.load(buffer))
        rest = [straight.step(t) for t in trajectory[11:]]
        again = [resumed.step(t) for t in trajectory[11:]]
        assert first and rest == again
    with pytest.raises(CheckpointError, match="rule"):
        PaceController(PaceSettings()).load_state_dict(straight.state_dict())  # an apf state
    with pytest.raises(CheckpointError, match="malformed"):
        PaceController(PaceSettings()).load_state_dict({"rule": "effective-movement"})


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"rule": "loss"}, "pace"),
        ({"tau": 1.5}, "pace-tau"),
        ({"window": 0}, "pace-window"),
        ({"patience": 0}, "pace-patience"),
        ({"min_rounds": 5, "max_rounds": 4}, "stage-max-rounds"),
        ({"stage_rounds": (3, 0)}, "stage-rounds"),
        ({"apf_level": -0.1}, "pace-apf-level"),
    ],
)
def test_pace_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        PaceSettings(**kwargs)


# --- device budgets --------------------------------------------------------------------------


def test_profl_uniform_budgets():
    full = 10_000_000
    budgets = [device_budget("profl-uniform", i, full, seed=1).budget_bytes for i in range(2000)]
    ratios = np.array(budgets) / full
    assert ratios.min() >= PROFL_RATIO_RANGE[0] and ratios.max() < PROFL_RATIO_RANGE[1]
    assert ratios.mean() == pytest.approx(0.595, abs=0.02)
    assert np.mean(ratios >= 1) == pytest.approx(0.07 / 0.95, abs=0.02)  # ~7 % fit the full model
    assert device_budget("profl-uniform", 7, full, seed=1).budget_bytes == budgets[7]
    assert device_budget("profl-uniform", 7, full, seed=2).budget_bytes != budgets[7]
    assert device_budget("none", 3, full).budget_bytes is None


def test_device_tier_budgets():
    devices = [device_budget("device-tier", i, 1, seed=0) for i in range(2000)]
    share = {t.name: np.mean([d.kind == t.name for d in devices]) for t in DEVICE_TIERS}
    assert all(v == pytest.approx(0.25, abs=0.04) for v in share.values())
    ram = {t.name: t.ram_bytes for t in DEVICE_TIERS}
    assert all(d.budget_bytes == ram[d.kind] // 2 for d in devices)
    only_zero = device_budget("device-tier", 9, 1, proportions=(1, 0, 0, 0), usable_share=0.25)
    assert only_zero.kind == "pi-zero-2w-512mb" and only_zero.budget_bytes == 128 << 20
    with pytest.raises(ConfigError, match="device-proportions"):
        device_budget("device-tier", 0, 1, proportions=(1, 1))
    with pytest.raises(ConfigError, match="memory-profile"):
        device_budget("tiny", 0, 1)


# --- participant selector --------------------------------------------------------------------


def _population() -> list[NodeInfo]:
    """40 nodes in 4 label groups of 25/5/5/5 (dominant classes 0-1, 2-3, 4-5, 6-7)."""
    nodes = []
    for i in range(40):
        group = 0 if i < 25 else 1 + (i - 25) // 5
        hist = [1.0] * 10
        hist[2 * group] = hist[2 * group + 1] = 50.0 + i
        nodes.append(NodeInfo(i, 1000 + 10 * i, tuple(hist)))
    return nodes


def test_label_groups_recover_the_construction():
    groups = label_groups(_population(), similarity=0.8)
    expected = [0 if i < 25 else 1 + (i - 25) // 5 for i in range(40)]
    assert [groups[i] for i in range(40)] == expected


def test_nodes_below_need_are_never_selected():
    nodes = _population()
    need, margin = 1200, 0.1  # fits budgets >= 1320: node ids >= 32
    for policy in ("random-eligible", "heterogeneity-aware"):
        selector = Selector(policy, run_seed=3, margin=margin)
        for r in range(1, 30):
            picks = selector.select(nodes, need, 4, r)
            assert len(picks) == 4 and len(set(picks)) == 4 and min(picks) >= 32
        assert selector.select(nodes, 10**9, 4, 1) == []


def test_random_eligible_is_reproducible():
    nodes = _population()
    a = [Selector(run_seed=9).select(nodes, 0, 5, r) for r in range(1, 6)]
    b = [Selector(run_seed=9).select(nodes, 0, 5, r) for r in range(1, 6)]
    c = [Selector(run_seed=10).select(nodes, 0, 5, r) for r in range(1, 6)]
    assert a == b and a != c and len({tuple(p) for p in a}) == 5


def test_heterogeneity_aware_covers_more_groups():
    nodes = _population()
    groups = label_groups(nodes)
    covered = {}
    for policy in ("random-eligible", "heterogeneity-aware"):
        selector = Selector(policy, run_seed=0)
        covered[policy] = [
            len({groups[i] for i in selector.select(nodes, 0, 4, r)}) for r in range(1, 51)
        ]
    print({k: float(np.mean(v)) for k, v in covered.items()})
    assert covered["heterogeneity-aware"] == [4] * 50
    assert np.mean(covered["random-eligible"]) < 3.5


def test_heterogeneity_aware_prefers_fast_nodes():
    nodes = [NodeInfo(i, None, (1.0, 0.0)) for i in range(10)]  # one group
    speeds = SpeedTracker(factor=0.5)
    for i in range(10):
        assert speeds.update(i, 1.0 if i < 5 else 100.0)
    assert not speeds.update(0, float("nan")) and not speeds.update(0, -1.0)
    assert speeds.update(9, 50.0) and speeds.seconds[9] == 75.0
    selector = Selector("heterogeneity-aware", run_seed=1)
    picks = [i for r in range(1, 101) for i in selector.select(nodes, 0, 2, r, speeds)]
    assert np.mean([i < 5 for i in picks]) > 0.9
    restored = SpeedTracker()
    restored.load_state_dict(speeds.state_dict())
    assert restored.seconds == speeds.seconds


def test_eligibility_report_lists_never_eligible_nodes():
    nodes = [NodeInfo(i, b, ()) for i, b in enumerate([50, 100, 150, 300, None])]
    report = eligibility_report(nodes, stage_needs=[100, 200, 140], full_need=250, margin=0.0)
    assert report.per_stage == ((1, 2, 3, 4), (3, 4), (2, 3, 4))
    assert report.full_model == (3, 4) and report.never_eligible == (0,)
    assert report.fractions()["stage 0"] == 0.8


def test_profl_uniform_population_fits_stages_better_than_the_full_model():
    staged = build_staged("resnet20")
    plan = memory_plan(staged, 16)
    full = plan.full.total_bytes
    nodes = [
        NodeInfo(i, device_budget("profl-uniform", i, full, seed=0).budget_bytes)
        for i in range(100)
    ]
    report = eligibility_report(nodes, plan.needs, full, margin=0.0)
    fractions = report.fractions()
    print("resnet20, batch 16, needs vs full:", [round(n / full, 3) for n in plan.needs])
    print("fraction of 100 profl-uniform nodes that fit:", fractions)
    for t in range(staged.num_stages):
        assert fractions[f"stage {t}"] > fractions["full model"]
    assert fractions["stage 2"] >= fractions["stage 1"] >= fractions["stage 0"]
