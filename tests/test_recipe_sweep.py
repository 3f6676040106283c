"""The recipe sweep's choices and its report, on synthetic results (no runs).

What is checked is the logic the sweep's verdicts rest on: which single changes win and how
they are combined, the rounds of each candidate, the rounds that fit the time budget, and the
adoption rule of the default.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from recipe_report import (  # noqa: E402
    budget_recipe,
    budget_rounds,
    cost_ratio,
    decide,
    recipe_section,
    write_report,
)
from recipe_sweep import (  # noqa: E402
    BASELINE_RECIPE,
    combo_candidates,
    e2e_from_default_run,
    full_candidates,
    merge_summaries,
    reference_from,
    rounds_of,
    score,
    screen_candidates,
    winners,
)


def row(name, keys, acc, round_s=1.0, **extra):
    curve = [[r, acc - 0.01 * (100 - r) / 10] for r in range(0, 101, 10)]
    return {
        "name": name,
        "keys": keys,
        "rounds": 100,
        "curve": curve,
        "final_acc": curve[-1][1],
        "best_acc": max(a for _, a in curve),
        "score": score(curve),
        "round_seconds_mean": round_s,
        "wall_seconds": 100.0,
        **extra,
    }


SCREEN = [
    row("baseline", {}, 0.30),
    row("ema-0.95", {"ema": 0.95}, 0.33),
    row("lr-0.02", {"lr": 0.02}, 0.32),
    row("lr-0.005", {"lr": 0.005}, 0.31),  # wins, but the better lr wins the key
    row("cosine", {"lr-schedule": "cosine"}, 0.302),  # within the margin: not a winner
    row("sigma-1e-4", {"sigma": 1e-4}, 0.25),
    row("k-100", {"k": 100}, 0.34, round_s=0.6),
    row("lenet-gn", {"model": "lenet-gn"}, 0.9, round_s=7.0, fixed_rounds=3),
]


def test_score_is_the_mean_of_the_last_three_evaluations():
    assert score([[0, 0.1], [10, 0.2], [20, 0.3], [30, 0.4]]) == pytest.approx(0.3)


def test_winners_beat_the_margin_keep_one_value_per_key_and_skip_other_scales():
    names = [c["name"] for c in winners(SCREEN)]
    assert names == ["k-100", "ema-0.95", "lr-0.02"]  # best first; lr-0.005 lost its key


def test_combos_join_all_winners_and_the_best_two():
    combos = combo_candidates(SCREEN)
    assert [c["name"] for c in combos] == ["k-100+ema-0.95+lr-0.02", "k-100+ema-0.95"]
    assert combos[0]["keys"] == {"k": 100, "ema": 0.95, "lr": 0.02}
    assert combo_candidates(SCREEN[:2]) == []  # one winner: nothing to combine


def test_rounds_keep_the_forward_passes_of_the_default():
    assert rounds_of({"keys": {}}, 150) == 150
    assert rounds_of({"keys": {"k": 100}}, 150) == 300
    assert rounds_of({"keys": {"k": 400}}, 150) == 75
    assert rounds_of({"keys": {"model": "lenet-gn"}, "fixed_rounds": 3}, 150) == 3


def test_full_length_takes_the_baseline_and_the_best_pruned_recipes():
    ranked = [*SCREEN, row("dense-x", {"method": "zo-dense"}, 0.5)]
    chosen = full_candidates(ranked, top=2)
    # The two best, then cosine alone and on the best: a schedule always runs at full length.
    names = [c["name"] for c in chosen]
    assert names == ["baseline", "k-100", "ema-0.95", "cosine", "k-100+cosine"]
    assert chosen[-1]["keys"] == {"k": 100, "lr-schedule": "cosine"}
    no_schedule = [c for c in SCREEN if c["name"] != "cosine"]
    assert [c["name"] for c in full_candidates(no_schedule, top=2)] == [
        "baseline",
        "k-100",
        "ema-0.95",
    ]


def test_a_schedule_change_runs_at_full_length_whatever_its_screen_score():
    """Cosine over 100 rounds anneals early: the screen cannot rank it, so it always runs."""
    others = [c for c in SCREEN if c["name"] != "cosine"]
    cosine = row("cosine", {"lr-schedule": "cosine"}, 0.01)  # the worst screen score
    combo = {**row("a+cosine", {"k": 100, "lr-schedule": "cosine"}, 0.02), "members": ["a"]}
    chosen = full_candidates([*others, cosine, combo], top=1)
    assert [c["name"] for c in chosen] == ["baseline", "k-100", "cosine", "k-100+cosine"]
    assert chosen[2]["horizon"] is True and chosen[2]["keys"] == {"lr-schedule": "cosine"}
    # Among the top it is not added twice.
    best = row("cosine", {"lr-schedule": "cosine"}, 0.99)
    names = [c["name"] for c in full_candidates([*others, best], top=2)]
    assert names == ["baseline", "cosine", "k-100"]


def test_screen_candidates_change_one_thing_from_a_pinned_baseline():
    cands = screen_candidates(3)
    assert cands[0] == {"name": "baseline", "keys": {}}
    assert len({c["name"] for c in cands}) == len(cands)
    # The baseline is pinned to the pre-sweep default recipe.
    assert BASELINE_RECIPE["lr"] == 0.01 and BASELINE_RECIPE["lr-schedule"] == "constant"


def summary_with_full(base_acc, best_acc):
    info = {
        "time_budget_s": 600.0,
        "reference": {
            "source": "ref",
            "wall_seconds": 360.0,
            "strategy_seconds": 330.0,
            "rounds": 300,
        },
        "screen_rounds": 100,
        "full_rounds": 450,
        "eval_every": 10,
        "score_evals": 3,
        "win_margin": 0.005,
    }

    def full_row(name, keys, acc):
        curve = [[r, acc * r / 450] for r in range(0, 451, 50)]
        return {
            **row(name, keys, acc),
            "rounds": 450,
            "curve": curve,
            "final_acc": acc,
            "best_acc": acc,
            "score": acc,
        }

    return {
        "info": info,
        "stages": {
            "screen": SCREEN,
            "full": [
                full_row("baseline", {}, base_acc),
                full_row("ema-0.95", {"ema": 0.95}, best_acc),
            ],
        },
    }


def test_budget_rounds_from_the_reference_run_and_the_cost_ratio():
    summary = summary_with_full(0.36, 0.39)
    # (600 - 30 s start) / 1.1 s a round = 518 rounds for the default's K.
    assert budget_rounds(summary, {"name": "ema-0.95", "keys": {"ema": 0.95}}) == (
        518,
        "extrapolated",
    )
    with pytest.raises(ValueError, match="no timing run"):
        cost_ratio(summary, {"name": "k-100", "keys": {"k": 100}})
    summary["stages"]["timing"] = [
        {
            "name": "baseline-vs-k-100",
            "keys": {},
            "timing_of": "baseline",
            "round_seconds_median": 2.0,
        },
        {"name": "k-100", "keys": {"k": 100}, "timing_of": "k-100", "round_seconds_median": 1.2},
    ]
    # Another candidate with the same K (a combination) is timed by the k-100 pair.
    combo = {"name": "k-100+ema", "keys": {"k": 100, "ema": 0.9}}
    assert cost_ratio(summary, combo) == pytest.approx(0.6)
    assert budget_rounds(summary, combo) == (863, "extrapolated")  # 570 / (1.1 * 0.6)
    summary["e2e"] = [
        {"name": "ema-0.95", "wall_seconds": 500.0, "startup_seconds": 50.0, "rounds": 450}
    ]
    assert budget_rounds(summary, {"name": "ema-0.95", "keys": {}}) == (550, "measured end to end")


@pytest.mark.parametrize(
    ("base", "best", "adopted"),
    [(0.36, 0.41, True), (0.30, 0.33, True), (0.36, 0.375, False)],
    ids=["target", "plus-2pp", "too-small"],
)
def test_the_default_is_adopted_on_the_target_or_two_points(base, best, adopted, tmp_path):
    summary = summary_with_full(base, best)
    decision = decide(summary)
    assert decision is not None and decision["name"] == "ema-0.95"
    assert decision["adopted"] is adopted
    write_report(tmp_path / "recipe.md", summary, tmp_path / "recipe_sweep.json")
    text = (tmp_path / "recipe.md").read_text()
    assert ("The sweep adopts **ema-0.95**" in text) is adopted
    # The page says whether pyproject.toml carries the recipe (ema is not a default here).
    assert ("`pyproject.toml` does not set it yet (ema, num-server-rounds differ)" in text) is (
        adopted
    )
    # The decision says how its budget was found (here: extrapolated, no end-to-end run).
    assert "within the budget (rounds extrapolated)" in text
    assert ("Target reached: ema-0.95" in text) is (best >= 0.40)


def test_two_sweeps_sharing_one_json_keep_every_row_load_and_command():
    first = {
        "info": {"load": {"all": {"before": 1}}, "commands": ["sweep --stage all"]},
        "stages": {"screen": [row("baseline", {}, 0.3)]},
    }
    second = {
        "info": {"load": {"full": {"before": 2}}, "commands": ["sweep --stage full --top 1"]},
        "stages": {"full": [row("cosine", {"lr-schedule": "cosine"}, 0.4)]},
    }
    merged = merge_summaries(first, second)
    assert merged["info"]["commands"] == ["sweep --stage all", "sweep --stage full --top 1"]
    assert set(merged["info"]["load"]) == {"all", "full"}
    assert [r["name"] for r in merged["stages"]["screen"]] == ["baseline"]
    assert [r["name"] for r in merged["stages"]["full"]] == ["cosine"]
    again = merge_summaries(merged, second)  # the same command twice is listed once
    assert again["info"]["commands"] == merged["info"]["commands"]


@pytest.mark.parametrize(("best", "verb"), [(0.41, "adopted"), (0.365, "not adopted")])
def test_the_results_page_section_follows_the_sweep(best, verb):
    text = recipe_section(summary_with_full(0.36, best))
    assert text.startswith("## The default recipe\n")
    # SCREEN: 7 single changes of which 4 beat the baseline's 0.30 by > 0.5 pp (lenet-gn is
    # at another scale and cosine is within the margin).
    assert "screened 7 single changes of the default for 100 rounds" in text
    assert "4 beat it by more than 0.5 pp in score (k-100, ema-0.95, lr-0.02, lr-0.005)" in text
    assert f"At full length the best is ema-0.95 (`ema=0.95`): {100 * best:.1f} %" in text
    assert f"Decision: ema-0.95 {verb};" in text
    assert "Not run" in recipe_section({"info": {}, "stages": {}})


def test_the_timed_default_run_serves_as_the_candidates_end_to_end_run(tmp_path):
    import json
    import os

    summary = summary_with_full(0.36, 0.41)
    rounds = [
        {"round": 0, "accuracy": 0.1},
        *({"round": r, "round_seconds": 1.0, "accuracy": 0.3} for r in range(1, 451)),
    ]
    results = {
        "config": {"ema": 0.95, "num-server-rounds": 450, "k": 200},
        "rounds": rounds,
        "final": {"rounds": 450},
        "setup": {"kept_coordinates": 6413},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    record = {
        "wall_seconds": 500.0,
        "command": "bash scripts/run.sh",
        "results_json": os.path.relpath(tmp_path / "results.json", ROOT),
        "machine": {"load_before": [0.1, 0.1, 0.1], "load_after": [1.9, 1.5, 1.0]},
    }
    (tmp_path / "default_run.json").write_text(json.dumps(record))
    row = e2e_from_default_run("ema-0.95", tmp_path / "default_run.json", summary)
    assert row["wall_seconds"] == 500.0 and row["startup_seconds"] == 50.0  # 450 x 1 s rounds
    assert row["command"] == "bash scripts/run.sh" and row["rounds"] == 450
    summary["e2e"] = [row]  # what main() records
    assert budget_rounds(summary, {"name": "ema-0.95", "keys": {}}) == (550, "measured end to end")
    results["config"]["ema"] = 0.9  # another recipe ran: refused, naming the key
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="ema"):
        e2e_from_default_run("ema-0.95", tmp_path / "default_run.json", summary)


def test_a_default_run_of_another_length_is_a_candidate_of_its_own(tmp_path):
    import json
    import os

    summary = summary_with_full(0.36, 0.37)
    rounds = [{"round": 0, "accuracy": 0.1}]
    rounds += [{"round": r, "round_seconds": 1.0, "accuracy": 0.39} for r in range(1, 301)]
    results = {
        "config": {"ema": 0.95, "num-server-rounds": 300},
        "rounds": rounds,
        "final": {"rounds": 300},
        "setup": {},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    record = {
        "wall_seconds": 340.0,
        "command": "bash scripts/run.sh",
        "results_json": os.path.relpath(tmp_path / "results.json", ROOT),
        "machine": {},
    }
    (tmp_path / "default_run.json").write_text(json.dumps(record))
    row = e2e_from_default_run("ema-0.95", tmp_path / "default_run.json", summary)
    assert row["name"] == "ema-0.95-300" and row["e2e_of"] == "ema-0.95"
    assert row["rounds"] == 300 and row["keys"] == {"ema": 0.95, "num-server-rounds": 300}
    summary["e2e"] = [row]
    # (600 - 40 s start) / 1 s a round: measured; the full-length ema-0.95 (37 %) loses to it.
    assert budget_rounds(summary, row) == (560, "measured end to end")
    decision = decide(summary)
    assert decision is not None and decision["name"] == "ema-0.95-300" and decision["adopted"]
    write_report(tmp_path / "recipe.md", summary, tmp_path / "recipe_sweep.json")
    assert (
        "* ema-0.95-300 is ema-0.95 run for 300 rounds, end to end only"
        in (tmp_path / "recipe.md").read_text()
    )


def test_a_change_that_hurts_zo_dense_is_not_eligible_as_the_default():
    summary = summary_with_full(0.30, 0.33)  # ema-0.95 beats the baseline by 3 pp
    dense = [
        {**row("dense-baseline", {"method": "zo-dense"}, 0.31), "dense_of": "baseline"},
        {
            **row("dense-ema-0.95", {"method": "zo-dense", "ema": 0.95}, 0.30),
            "dense_of": "ema-0.95",
        },
    ]
    summary["stages"]["dense"] = dense
    # 1 pp worse on zo-dense: ema-0.95 is out, and the baseline alone is left.
    assert decide(summary) is None
    summary["stages"]["full"].append(
        {**summary["stages"]["full"][1], "name": "cosine", "keys": {"lr-schedule": "cosine"}}
    )
    decision = decide(summary)
    assert decision is not None and decision["name"] == "cosine" and decision["adopted"]
    assert (
        "not eligible, as ema-0.95 (`ema=0.95`) scores -1.0 pp on zo-dense" in (decision["reason"])
    )
    assert decision["reason"].endswith(": ema-0.95")
    dense[1] = {**dense[1], **row("x", {}, 0.308), "name": "dense-ema-0.95"}  # -0.2 pp: noise
    assert decide(summary)["name"] == "ema-0.95"


def test_the_reference_run_comes_from_the_timed_default_run(tmp_path):
    import json

    record = {
        "wall_seconds": 601.0,
        "strategy_seconds": 545.0,
        "command": "bash scripts/run.sh",
        "date": "2026-12-02 15:59 UTC",
        "final": {"rounds": 300},
        "machine": {"cpu": "AMD EPYC"},
    }
    (tmp_path / "default_run.json").write_text(json.dumps(record))
    ref = reference_from(tmp_path / "default_run.json")
    assert (ref["wall_seconds"], ref["strategy_seconds"], ref["rounds"]) == (601.0, 545.0, 300)
    assert "AMD EPYC" in ref["source"] and "2026-12-02 15:59 UTC" in ref["source"]
    summary = summary_with_full(0.36, 0.39)
    summary["info"]["reference"] = ref
    # (600 - 56 s start) / (545 / 300 s a round) = 299 rounds of the default's K.
    assert budget_rounds(summary, {"name": "ema-0.95", "keys": {}}) == (299, "extrapolated")


def test_a_cosine_stopped_early_keeps_its_own_horizon():
    cosine = {"name": "cosine", "keys": {"lr-schedule": "cosine"}, "rounds": 450}
    assert budget_recipe(cosine, 340) == {
        "lr-schedule": "cosine",
        "lr-schedule-rounds": 450,
        "num-server-rounds": 340,
    }
    assert budget_recipe(cosine, 450) == {"lr-schedule": "cosine", "num-server-rounds": 450}
    assert budget_recipe({"name": "ema", "keys": {"ema": 0.9}, "rounds": 450}, 300) == {
        "ema": 0.9,
        "num-server-rounds": 300,
    }
