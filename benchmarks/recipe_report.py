"""docs/recipe.md from the recipe sweep's JSON: every number and verdict computed from it.

``write_report(path, summary, json_path)`` with the summary ``benchmarks/recipe_sweep.py``
writes. Accuracies are fractions in the JSON and percentages here; a *gain* is a difference of
scores (the mean accuracy of a run's last evaluations) in percentage points.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_ACC = 0.40
ADOPT_GAIN = 0.02
"""A recipe replaces the default when it reaches the target or beats it by this much."""
DENSE_MARGIN = 0.005
"""A change "hurts zo-dense" when its zo-dense twin scores this much below the dense baseline."""


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal."""
    return f"{100 * x:.1f} %"


def pp(x: float) -> str:
    """A difference of fractions in signed percentage points."""
    return f"{100 * x:+.1f} pp"


def keys_text(keys: dict[str, Any]) -> str:
    """Run-config overrides as they would be typed (``k=v`` pairs), or *(defaults)*."""
    if not keys:
        return "(defaults)"
    return " ".join(f"`{k}={v}`" for k, v in keys.items())


def acc_at(curve: list[list[float]], rounds: float) -> tuple[int, float] | None:
    """The last evaluation at or before ``rounds``: ``(round, accuracy)``."""
    done = [(int(r), a) for r, a in curve if r <= rounds]
    return done[-1] if done else None


def budget_rounds(summary: dict[str, Any], cand: dict[str, Any]) -> tuple[int, str]:
    """Rounds of ``cand`` that fit the time budget end to end, and how that was found.

    Measured when the candidate ran end to end (``e2e``); otherwise extrapolated from the
    reference end-to-end run of the default (``info.reference``), scaled by the candidate's
    in-process time per round over the baseline's in the same stage. The budget keeps
    ``info.time_spare`` (a fraction) spare for the machine's drift between runs.
    """
    info = summary["info"]
    budget = info["time_budget_s"] * (1.0 - info.get("time_spare", 0.0))
    for e2e in summary.get("e2e", []):
        if e2e["name"] == cand["name"]:
            per_round = (e2e["wall_seconds"] - e2e["startup_seconds"]) / e2e["rounds"]
            return int((budget - e2e["startup_seconds"]) / per_round), "measured end to end"
    ref = info["reference"]
    startup = ref["wall_seconds"] - ref["strategy_seconds"]
    per_round = ref["strategy_seconds"] / ref["rounds"]
    return int((budget - startup) / (per_round * cost_ratio(summary, cand))), "extrapolated"


def cost_ratio(summary: dict[str, Any], cand: dict[str, Any]) -> float:
    """A candidate's time per round over the default's.

    1 when it runs the default's model and K (the same forward passes per round: the other
    keys change only the server's step); otherwise the ratio of the median seconds per round
    of its timing run and of the baseline's run beside it (the timing stage: both at once,
    under the same load).
    """
    changed = {"k", "model"} & set(cand["keys"])
    if not changed:
        return 1.0
    timing = {r["name"]: r for r in summary["stages"].get("timing", [])}
    # The timing run of the screen candidate with the same work per round.
    same = [
        r
        for r in timing.values()
        if r.get("timing_of") != "baseline"
        and all(r["keys"].get(k) == cand["keys"].get(k) for k in changed)
    ]
    if not same or f"baseline-vs-{same[0]['name']}" not in timing:
        raise ValueError(f"no timing run for {cand['name']} ({', '.join(sorted(changed))})")
    base = timing[f"baseline-vs-{same[0]['name']}"]
    return float(same[0]["round_seconds_median"] / base["round_seconds_median"])


def beating(
    screen: list[dict[str, Any]], base: dict[str, Any], margin: float
) -> list[dict[str, Any]]:
    """Single changes at the screen's scale that beat ``base``'s score by more than ``margin``."""
    return [
        r
        for r in screen
        if r is not base and "fixed_rounds" not in r and r["score"] > base["score"] + margin
    ]


def hurts_dense(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Changes whose zo-dense twin (the dense stage) scores :data:`DENSE_MARGIN` or more below
    the dense baseline: ``{"name", "keys", "gain"}`` with the keys other than ``method``."""
    dense = summary["stages"].get("dense", [])
    base = next((r for r in dense if r["dense_of"] == "baseline"), None)
    if base is None:
        return []
    return [
        {
            "name": r["dense_of"],
            "keys": {k: v for k, v in r["keys"].items() if k != "method"},
            "gain": r["score"] - base["score"],
        }
        for r in dense
        if r is not base and r["score"] <= base["score"] - DENSE_MARGIN
    ]


def _contains(keys: dict[str, Any], change: dict[str, Any]) -> bool:
    return all(k in keys and keys[k] == v for k, v in change.items())


def full_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The full stage's runs, and the end-to-end runs of a full candidate at another length
    (``e2e_of``: the default run at the length the budget allows)."""
    extra = [e for e in summary.get("e2e", []) if e.get("e2e_of")]
    return [*summary["stages"].get("full", []), *extra]


def decide(summary: dict[str, Any]) -> dict[str, Any] | None:
    """Whether the best full-length recipe replaces the default, and why.

    The default recipe is the recipe of zo-dense and zo-pruned alike, so a candidate holding a
    change that hurts zo-dense (:func:`hurts_dense`) is not eligible. Of the others, the best
    within the budget is adopted when it reaches :data:`TARGET_ACC`, or beats the baseline
    within the budget by :data:`ADOPT_GAIN`. Needs the baseline and a candidate at full length.
    """
    full = full_rows(summary)
    harmful = hurts_dense(summary)
    excluded = [
        (r["name"], h)
        for r in full
        for h in harmful
        if h["keys"] and _contains(r["keys"], h["keys"])
    ]
    banned = {name for name, _ in excluded}
    rows = []
    for row in full:
        if row["name"] in banned:
            continue
        fit, how = budget_rounds(summary, row)
        within = acc_at(row["curve"], fit)
        if within is not None:
            rows.append((row, within, how))
    base = next((w for r, w, _ in rows if r["name"] == "baseline"), None)
    others = [(r, w, h) for r, w, h in rows if "baseline" not in (r["name"], r.get("e2e_of"))]
    if base is None or not others:
        return None
    row, within, how = max(others, key=lambda rwh: rwh[1][1])
    gain = within[1] - base[1]
    reached = within[1] >= TARGET_ACC
    adopted = reached or gain >= ADOPT_GAIN
    why_not = "".join(
        f"; not eligible, as {h['name']} ({keys_text(h['keys'])}) scores {pp(h['gain'])} on "
        "zo-dense and the default is zo-dense's recipe too: "
        + ", ".join(name for name, hit in excluded if hit is h)
        for h in harmful
        if any(hit is h for _, hit in excluded)
    )
    reason = (
        f"within the budget (rounds {how}) it reaches {pct(within[1])} at round {within[0]} "
        "against the "
        f"baseline's {pct(base[1])} at round {base[0]} ({pp(gain)}; the rule: the target "
        f"{pct(TARGET_ACC)}, or {100 * ADOPT_GAIN:.0f} pp over the baseline){why_not}"
    )
    return {
        "name": row["name"],
        "keys": row["keys"],
        "recipe": budget_recipe(row, within[0]),
        "adopted": adopted,
        "reason": reason,
    }


def budget_recipe(row: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The run config that reproduces ``row``'s curve up to ``rounds`` (its in-budget point).

    ``row``'s keys and ``num-server-rounds = rounds``; a cosine schedule keeps ``row``'s own
    horizon (``lr-schedule-rounds`` = its rounds) when it stops early, for a shorter cosine
    decays sooner and follows another curve.
    """
    recipe = dict(row["keys"])
    if rounds < row["rounds"] and recipe.get("lr-schedule") == "cosine":
        recipe.setdefault("lr-schedule-rounds", row["rounds"])
    recipe["num-server-rounds"] = rounds
    return recipe


def _table(rows: list[dict[str, Any]], base: dict[str, Any] | None) -> list[str]:
    lines = [
        "| candidate | keys | rounds | final | best | score | vs baseline | s / round | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        gain = pp(row["score"] - base["score"]) if base is not None and row is not base else ""
        lines.append(
            f"| {row['name']} | {keys_text(row['keys'])} | {row['rounds']} | "
            f"{pct(row['final_acc'])} | {pct(row['best_acc'])} | {pct(row['score'])} | {gain} | "
            f"{row['round_seconds_mean']:.1f} | {row['wall_seconds'] / 60:.1f} min |"
        )
    return lines


def _by_score(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: -r["score"])


def _screen_section(summary: dict[str, Any]) -> list[str]:
    info = summary["info"]
    screen = summary["stages"].get("screen", [])
    if not screen:
        return ["No screen runs yet."]
    base = next((r for r in screen if r["name"] == "baseline"), None)
    out = [
        f"## 1. Screen: one change at a time, {info['screen_rounds']} rounds",
        "",
        f"Each candidate changes the default in the keys shown; a candidate with K directions runs "
        f"200 / K times the rounds (the same forward passes). *Score*: the mean test accuracy of "
        f"the last {info['score_evals']} evaluations (every {info['eval_every']} rounds). "
        "Sorted by score.",
        "",
        *_table(_by_score(screen), base),
        "",
    ]
    if base is None:
        return out
    singles = [r for r in screen if r["name"] != "baseline" and "fixed_rounds" not in r]
    won = beating(singles, base, info["win_margin"])
    lost = [r for r in singles if r["score"] < base["score"] - info["win_margin"]]
    even = [r for r in singles if r not in won and r not in lost]
    margin = f"{100 * info['win_margin']:.1f} pp"
    out.append(
        f"* Baseline score {pct(base['score'])} (final {pct(base['final_acc'])} at round "
        f"{base['rounds']})."
    )
    for label, group in (
        (f"better than the baseline by more than {margin}", won),
        (f"worse by more than {margin}", lost),
        (f"within {margin} of it (not resolved with one seed)", even),
    ):
        names = ", ".join(f"{r['name']} ({pp(r['score'] - base['score'])})" for r in group)
        out.append(f"* {len(group)} of {len(singles)} single changes {label}: {names or 'none'}.")
    for row in screen:
        if "fixed_rounds" in row:
            try:
                ratio = cost_ratio(summary, row)
            except ValueError:
                continue
            fit, _ = budget_rounds(summary, row)
            out.append(
                f"* {row['name']} ran {row['rounds']} rounds only: a round costs {ratio:.1f}x "
                f"the baseline's (timing stage), so in the time the baseline takes for "
                f"{info['screen_rounds']} rounds it would run {int(info['screen_rounds'] / ratio)}"
                f", and about {fit} rounds fit the {info['time_budget_s'] / 60:.0f}-minute "
                "budget end to end; it is not combined or run at full length."
            )
    recipe = info.get("baseline_recipe", {})
    if recipe.get("optimizer") == "adam":
        out.append(
            f"* The baseline's Adam already has beta2 = {recipe.get('adam-beta2')} "
            f"(beta1 {recipe.get('adam-beta1')}); BAFFLE uses 0.99, so that part of its recipe "
            "is not a change here."
        )
    timed = {r["name"] for r in summary["stages"].get("timing", [])}
    ran = {r["name"] for r in screen} | timed
    missing = [n for n in info.get("screen_candidates", []) if n not in ran]
    if missing:
        out.append(f"* Not run for lack of CPU time on the shared machine: {', '.join(missing)}.")
    out.append("")
    return out


def _combos_section(summary: dict[str, Any]) -> list[str]:
    combos = summary["stages"].get("combos", [])
    dense = summary["stages"].get("dense", [])
    screen = summary["stages"].get("screen", [])
    base = next((r for r in screen if r["name"] == "baseline"), None)
    out: list[str] = []
    if combos and base is not None:
        out += ["## 2. The winners combined", "", *_table(_by_score(combos), base), ""]
        for row in combos:
            best_member = max(
                (r for r in screen if r["name"] in row.get("members", [])),
                key=lambda r: r["score"],
            )
            out.append(
                f"* {row['name']}: {pp(row['score'] - base['score'])} over the baseline, "
                f"{pp(row['score'] - best_member['score'])} over its best member "
                f"({best_member['name']})."
            )
        out.append("")
    if dense:
        pruned = {r["name"]: r for r in screen + combos}
        out += ["### The same recipes on zo-dense", "", *_table(dense, None), ""]
        dense_base = next((r for r in dense if r["dense_of"] == "baseline"), None)
        for row in dense:
            if row["dense_of"] == "baseline" or dense_base is None:
                continue
            twin = pruned.get(row["dense_of"])
            gain_dense = row["score"] - dense_base["score"]
            line = f"* On zo-dense, {row['dense_of']} scores {pp(gain_dense)} against the baseline"
            if twin is not None and base is not None:
                line += f" (on zo-pruned: {pp(twin['score'] - base['score'])})"
            verdict = "helps both" if gain_dense > 0 else "does not help zo-dense"
            out.append(f"{line}: the recipe {verdict}.")
        out.append("")
    return out


def _timing_section(summary: dict[str, Any]) -> list[str]:
    timing = summary["stages"].get("timing", [])
    pairs = [r for r in timing if r.get("timing_of") != "baseline"]
    if not pairs:
        return []
    by_name = {r["name"]: r for r in timing}
    out = [
        "## Time per round",
        "",
        f"Candidates that change the work of a round (K, the model) ran "
        f"{summary['info'].get('timing_rounds', '?')} rounds side by side with the baseline, "
        "so both saw the same load; *ratio*: median seconds per round over the baseline's.",
        "",
        "| candidate | keys | its s / round | baseline beside it | ratio |",
        "|---|---|---|---|---|",
    ]
    for row in pairs:
        base = by_name.get(f"baseline-vs-{row['name']}")
        if base is None:
            continue
        ratio = row["round_seconds_median"] / base["round_seconds_median"]
        out.append(
            f"| {row['name']} | {keys_text(row['keys'])} | {row['round_seconds_median']:.2f} | "
            f"{base['round_seconds_median']:.2f} | {ratio:.2f} |"
        )
    out.append("")
    return out


def _full_section(summary: dict[str, Any]) -> list[str]:
    info = summary["info"]
    full = summary["stages"].get("full", [])
    if not full:
        return []
    budget = info["time_budget_s"]
    out = [
        f"## 3. Full length: {info['full_rounds']} rounds",
        "",
        f"Run at full length: the baseline and {info.get('full_choice', '?')} (a candidate with "
        "K directions again runs 200 / K times the rounds).",
        "",
        f"The time budget is {budget / 60:.0f} minutes end to end (`flwr run`, "
        f"{info.get('e2e_clients', 10)} simulated clients, this 2-core machine), of which "
        f"{100 * info.get('time_spare', 0.0):.0f} % is kept spare for the machine's drift "
        "between runs. *Rounds in budget*: how many rounds of the candidate fit in the rest "
        "(see below); *in budget*: the test accuracy of the last evaluation within them.",
        "",
        "| candidate | keys | rounds | acc. round 300 | final | best | rounds in budget | "
        "in budget | how |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for row in _by_score(full_rows(summary)):
        fit, how = budget_rounds(summary, row)
        at300 = acc_at(row["curve"], 300)
        within = acc_at(row["curve"], fit)
        rows.append({**row, "fit": fit, "within": within, "how": how})
        out.append(
            f"| {row['name']} | {keys_text(row['keys'])} | {row['rounds']} | "
            f"{pct(at300[1]) if at300 else '-'} | {pct(row['final_acc'])} | "
            f"{pct(row['best_acc'])} | {fit} | "
            f"{pct(within[1]) + f' (round {within[0]})' if within else '-'} | {how} |"
        )
    out.append("")
    for row in full_rows(summary):
        if row.get("e2e_of"):
            out.append(
                f"* {row['name']} is {row['e2e_of']} run for {row['rounds']} rounds, end to end "
                f"only (`{row['command']}`, from `{row.get('source', '?')}`): "
                f"{row['wall_seconds']:.0f} s, {pct(row['final_acc'])} at the end."
            )
    ref = info["reference"]
    out.append(
        f"* Extrapolated budgets use the reference end-to-end run of the default "
        f"({ref['source']}: {ref['wall_seconds']:.0f} s for {ref['rounds']} rounds, of which "
        f"{ref['strategy_seconds']:.0f} s in the rounds), i.e. "
        f"{ref['wall_seconds'] - ref['strategy_seconds']:.0f} s to start and "
        f"{ref['strategy_seconds'] / ref['rounds']:.2f} s a round, times the candidate's cost "
        "ratio: 1 with the default's model and K (the other keys change only the server's "
        "step), else its in-process time per round over the baseline's in the screen."
    )
    base = next((r for r in rows if r["name"] == "baseline"), None)
    best = max(rows, key=lambda r: r["within"][1] if r["within"] else -1)
    reached = [r for r in rows if r["within"] and r["within"][1] >= TARGET_ACC]
    if reached:
        out.append(
            f"* Target reached: {', '.join(r['name'] for r in reached)} "
            f"(>= {pct(TARGET_ACC)} within the budget)."
        )
    else:
        need = TARGET_ACC - best["within"][1] if best["within"] else TARGET_ACC
        out.append(
            f"* Target not reached: the best accuracy within the budget is "
            f"{pct(best['within'][1]) if best['within'] else '-'} ({best['name']}), "
            f"{100 * need:.1f} pp short of {pct(TARGET_ACC)}; " + _rounds_needed(best)
        )
    if base is not None and base["within"] and best["within"] and best is not base:
        gain = best["within"][1] - base["within"][1]
        out.append(
            f"* Within the budget {best['name']} is {pp(gain)} against the baseline "
            f"({pct(best['within'][1])} against {pct(base['within'][1])})."
        )
    out.append("")
    return out


def _rounds_needed(row: dict[str, Any]) -> str:
    """Sentence on when, if ever, the curve crossed the target."""
    crossed = [(int(r), a) for r, a in row["curve"] if a >= TARGET_ACC]
    if crossed:
        return f"its curve first reaches it at round {crossed[0][0]}, after the budget."
    return f"its curve never reaches it in {row['rounds']} rounds."


def pyproject_defaults() -> dict[str, Any]:
    """The run config's defaults, ``[tool.flwr.app.config]`` of ``pyproject.toml``."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        config: dict[str, Any] = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    return config


def _decision(summary: dict[str, Any]) -> list[str]:
    decision = decide(summary)
    if not decision:
        return []
    lines = ["## Decision", ""]
    if decision["adopted"]:
        defaults = pyproject_defaults()
        unset = sorted(k for k, v in decision["recipe"].items() if defaults.get(k) != v)
        where = (
            "`pyproject.toml`'s run config now sets it"
            if not unset
            else f"`pyproject.toml` does not set it yet ({', '.join(unset)} differ)"
        )
        lines.append(
            f"The sweep adopts **{decision['name']}** for the budget, i.e. the run config "
            f"{keys_text(decision['recipe'])}; "
            f"{where}: {decision['reason']}."
        )
    else:
        lines.append(
            f"The default stays as it was. The best eligible candidate is **{decision['name']}** "
            f"({keys_text(decision['keys'])}): {decision['reason']}."
        )
    lines.append("")
    return lines


def write_report(path: Path, summary: dict[str, Any], json_path: Path) -> None:
    """Write ``docs/recipe.md`` (or ``path``) from ``summary``."""
    info = summary["info"]
    versions = info.get("versions", {})
    load = info.get("load", {})
    loads = "; ".join(
        f"{stage}: {v.get('before')} before, {v.get('after', '-')} after"
        + (f" ({v['seconds'] / 60:.0f} min)" if "seconds" in v else "")
        for stage, v in load.items()
    )
    json_rel = os.path.relpath(json_path.resolve(), ROOT)
    lines = [
        "# A better default recipe: the sweep",
        "",
        f"Generated by `benchmarks/recipe_sweep.py` from `{json_rel}` (last stage run "
        f"{info.get('date', '?')}); every number below comes from that file.",
        "",
        "```bash",
        "# FEDZO_DATA_DIR=../shared/data; the commands that wrote the JSON, in order:",
        *info.get("commands", ["python benchmarks/recipe_sweep.py --stage all"]),
        "python benchmarks/recipe_sweep.py --report-only   # this page, from the JSON",
        "```",
        "",
        f"Setting: the default run config ({info.get('baseline_text', '')}), each candidate "
        f"changing only its keys; {info.get('clients')} clients, one seed. Every run is the real "
        f"ServerApp and ClientApps in one process (`tests/inprocess_grid.py`), one torch thread, "
        f"{info.get('workers')} runs at a time. Machine: {info.get('cpu')}, {info.get('cores')} "
        f"cores, shared with other jobs; load average (1, 5, 15 min) {loads}. Versions: "
        + ", ".join(
            f"{k} {str(v)[:16] if k.endswith('sha256') else v}" for k, v in versions.items()
        )
        + f". Data folder: `{info.get('data_dir_rel')}`. Seconds per round are in-process and "
        "depend on that load: compare them within a stage only.",
        "",
        *_screen_section(summary),
        *_combos_section(summary),
        *_timing_section(summary),
    ]
    lines += _full_section(summary)
    lines += _decision(summary)
    text = "\n".join(lines).rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def recipe_section(summary: dict[str, Any]) -> str:
    """``docs/results.md``'s short account of the recipe sweep (the page is ``docs/recipe.md``)."""
    info, stages = summary["info"], summary["stages"]
    screen, full = stages.get("screen", []), stages.get("full", [])
    lines = ["## The default recipe", ""]
    if not screen:
        lines += ["Not run: `docs/results/recipe_sweep.json` holds no screen.", ""]
        return "\n".join(lines) + "\n"
    base = next((r for r in screen if r["name"] == "baseline"), None)
    margin = info.get("win_margin", 0.0)
    won = _by_score(beating(screen, base, margin)) if base is not None else []
    lines.append(
        f"The recipe sweep ([recipe.md](recipe.md), from `docs/results/recipe_sweep.json`, "
        f"one seed) screened {len(screen) - 1} single changes of the default for "
        f"{info.get('screen_rounds')} rounds; "
        + (
            f"{len(won)} beat it by more than {100 * margin:.1f} pp in score "
            f"({', '.join(w['name'] for w in won)})."
            if won
            else "none beat it."
        )
    )
    if full:
        best = max(full, key=lambda r: r["score"])
        at_base = next((r for r in full if r["name"] == "baseline"), None)
        versus = (
            f", the baseline {pct(at_base['final_acc'])} after {at_base['rounds']}"
            if at_base is not None and best is not at_base
            else ""
        )
        lines.append(
            f"At full length the best is {best['name']} ({keys_text(best['keys'])}): "
            f"{pct(best['final_acc'])} after {best['rounds']} rounds{versus}."
        )
    decision = decide(summary)
    if decision is not None:
        verb = "adopted" if decision["adopted"] else "not adopted"
        lines.append(f"Decision: {decision['name']} {verb}; {decision['reason']}.")
    lines.append("")
    return "\n".join(lines) + "\n"
