"""The paper-scale section of ``docs/results.md`` and its figure, computed from their JSON.

``docs/results/paper_scale.json`` (written by ``benchmarks/paper_scale.py --report``) holds the
settings, the machine and, per run, its accuracy curve, state and wall time. Every sentence
below is computed from that file; an unfinished run is reported as "in progress: round r of
3000" (whatever its target), never as a result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from paper_summary import NOISE_PP, PAPER, crossover

LABELS = {"zo-dense": "zo-dense (BAFFLE)", "zo-pruned": "zo-pruned (NTK, d = 0.1)"}
FIGURE = "figures/paper_scale.png"
"""Where the figure is linked from ``docs/results.md``."""


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _state(run: dict[str, Any]) -> str:
    if run["complete"]:
        return "complete"
    return f"in progress: round {run['rounds_done']} of {run['target_rounds']}"


def _scale(info: dict[str, Any]) -> str:
    paper = info["paper"]
    if info["k"] == paper["k"] and info["rounds"] == paper["rounds"]:
        return (
            f"This is the paper's scale (Figure 2: K = {paper['k']}, {paper['rounds']} rounds; "
            f"{info['clients']} clients as in BAFFLE)."
        )
    reduced = [
        f"{name} {info[key]} instead of {paper[key]}"
        for name, key in (("K =", "k"), ("rounds:", "rounds"), ("clients:", "clients"))
        if info[key] != paper[key]
    ]
    return f"The scale differs from the paper's: {', '.join(reduced)}."


def _recipe(info: dict[str, Any]) -> str:
    r = info["recipe"]
    overrides = info.get("overrides") or {}
    changed = (
        " with " + ", ".join(f"`{k} = {v!r}`" for k, v in overrides.items()) + " set for both"
        if overrides
        else ""
    )
    return (
        f"Both rows use the same recipe, the run-config defaults of `pyproject.toml`{changed}: "
        f"`{r['model']}` on {r['dataset']}, server optimizer {r['optimizer']} "
        f"(lr {r['lr']:g}, {_schedule(r)}, weight decay {r['weight-decay']:g}), "
        f"σ = {r['sigma']:g} ({r['fd']} differences, {r['directions']} directions), "
        f"batch {r['batch-size']}, {r['local-steps']} ZO step(s) per round, "
        f"inf-norm clip {r['clip']:g}, EMA {r['ema']:g}, engine `{r['engine']}`, "
        f"seed {r['seed']} (one seed per run); zo-pruned prunes θ0 once with NTK-SAP "
        f"(T = {r['prune-iterations']}, R = {r['prune-repeats']}) to density 0.1. "
        f"Each run is the real ServerApp and ClientApps in one background process with "
        f"{info['machine']['threads']} torch thread, evaluated on the full test set every "
        f"{info['eval_every']} rounds and checkpointed every {info['checkpoint_every']} rounds."
    )


def _schedule(recipe: dict[str, Any]) -> str:
    name = recipe.get("lr-schedule", "constant")
    if name == "constant":
        return "constant over the run"
    horizon = recipe.get("lr-schedule-rounds", 0) or "the run's rounds"
    return f"{name} schedule over {horizon}"


def _best(curve: list[list[float]]) -> tuple[int, float]:
    """The first evaluation of the highest accuracy: (round, accuracy)."""
    round_, acc = max(curve, key=lambda point: (point[1], -point[0]))
    return int(round_), float(acc)


def _peaks(dense: dict[str, Any], pruned: dict[str, Any]) -> tuple[str, float]:
    """Best against best, and how far each run ends below its own best; and the best-vs-best
    gain in points."""
    (dr, da), (pr, pa) = _best(dense["curve"]), _best(pruned["curve"])
    text = (
        f" Best against best: zo-pruned {100 * pa:.2f} % (round {pr}), zo-dense "
        f"{100 * da:.2f} % (round {dr}), {100 * (pa - da):+.2f} pp."
    )
    falls = []
    for name, run, best in (("zo-dense", dense, da), ("zo-pruned", pruned, pa)):
        drop = 100 * (best - float(run["curve"][-1][1]))
        if drop > NOISE_PP:
            falls.append(f"{name} ends {drop:.2f} pp below its best")
    if falls:
        subject = (
            "past their peaks both runs lose" if len(falls) == 2 else "past its peak the run loses"
        )
        text += (
            f" {' and '.join(falls)}: {subject} accuracy under this recipe, so the end-of-run gap"
            " holds that decline as well as the pruning's effect."
        )
    return text, 100 * (pa - da)


def _pace(run: dict[str, Any]) -> str:
    """Seconds per round of each process of a run, in order."""
    paces = [
        f"{seg['seconds'] / (seg['round'] - seg['start_round']):.2f}"
        for seg in run.get("segments", [])
        if seg["round"] > seg["start_round"]
    ]
    return ", ".join(paces) or "-"


def _at(curve: list[list[float]], round_: int) -> float:
    return dict((int(r), float(a)) for r, a in curve)[round_]


def _observations(runs: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    out = []
    for alpha in info["alphas"]:
        dense = next((r for r in runs if r["alpha"] == alpha and r["method"] == "zo-dense"), None)
        pruned = next((r for r in runs if r["alpha"] == alpha and r["method"] == "zo-pruned"), None)
        if not dense or not pruned or not dense["curve"] or not pruned["curve"]:
            continue
        common = sorted({int(r) for r, _ in dense["curve"]} & {int(r) for r, _ in pruned["curve"]})
        last = common[-1]
        p, d = _at(pruned["curve"], last), _at(dense["curve"], last)
        gain = 100 * (p - d)
        both_done = dense["complete"] and pruned["complete"]
        when = "at the end" if both_done else "so far"
        text = (
            f"* α = {alpha}, {when} (round {last}): zo-pruned {100 * p:.2f} %, zo-dense "
            f"{100 * d:.2f} % ({gain:+.2f} pp; one seed each, so differences below "
            f"{NOISE_PP:g} points are within run-to-run noise)."
        )
        ahead = crossover(dense, pruned)
        text += (
            f" zo-pruned is at or above zo-dense at every evaluation from round {ahead} on."
            if ahead
            else f" zo-pruned is below zo-dense at round {last}."
        )
        peaks, best_gain = _peaks(dense, pruned)
        text += peaks
        if both_done:
            target = PAPER["accuracy_gain_pp"]
            text += (
                f" The paper reports up to +{target:g} pp (K = {PAPER['k']}, "
                f"{PAPER['rounds']} rounds); "
                + (
                    "the end-of-run gain reaches it."
                    if gain >= target
                    else f"the end-of-run gain is {target - gain:.2f} pp short of it."
                    if gain > 0
                    else "here zo-pruned is not ahead at all."
                )
            )
            text += " Best against best, the gain " + (
                "reaches it too."
                if best_gain >= target
                else f"is {target - best_gain:.2f} pp short of it."
            )
        out.append(text)
    return out


def _machine(info: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    env = info["machine"]["environment"]
    versions = env["versions"]
    lock = env["lock_sha256"]
    text = (
        f"Report made on {info['machine']['cpu']} ({info['machine']['cores']} cores), "
        f"{env['machine']['os']}, Python {env['machine']['python']}, torch {env['torch_build']}, "
        f"flwr {versions['flwr']}, numpy {versions['numpy']}; lock file "
        + (f"SHA-256 `{lock[:16]}…`" if lock else "not found (installed wheel)")
        + "."
    )
    mixed = [r["name"] for r in runs if not r["same_environment_throughout"]]
    resumed = [r["name"] for r in runs if r["processes"] > 1]
    if mixed:
        text += f" Runs resumed in another environment (not bit-exact): {', '.join(mixed)}."
    elif resumed:
        text += (
            f" Resumed after an interruption: {', '.join(resumed)}; every process of a run ran "
            "in one environment (machine, versions, lock), so they continued bit-exactly."
        )
    else:
        text += " Each run ran in one process, uninterrupted."
    return text


def render_paper_scale(data: dict[str, Any], figure: str = FIGURE) -> str:
    """The Markdown section for one ``paper_scale.json``."""
    info, runs = data["info"], data["runs"]
    done = [r for r in runs if r["complete"]]
    if len(done) == len(runs):
        status = f"All {len(runs)} runs are complete." if len(runs) > 1 else "The run is complete."
    else:
        status = "Not finished: " + "; ".join(f"{r['name']} {_state(r)}" for r in runs) + "."
    lines = [
        "## The paper's scale: dense against pruned zeroth-order training",
        "",
        f"{_scale(info)} {_recipe(info)}",
        "",
        "```bash",
        f"FEDZO_DATA_DIR={info['data_dir_rel']} {info['command']}   # re-run to resume",
        f"{info['command']} --report",
        "```",
        "",
        f"{status} Report of {info['date']}; runs under `{info['out_dir_rel']}`.",
        "",
        f"![paper scale: accuracy against round]({figure})",
        "",
        "| α | method | state | final acc. (round) | best acc. | wall time | processes "
        "| s / round, per process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        final = f"{100 * r['curve'][-1][1]:.2f} % ({r['curve'][-1][0]})" if r["curve"] else "-"
        best = f"{100 * max(a for _, a in r['curve']):.2f} %" if r["curve"] else "-"
        lines.append(
            f"| {r['alpha']} | {LABELS[r['method']]} | {_state(r)} | {final} | {best} "
            f"| {_duration(r['wall_seconds'])} | {r['processes']} | {_pace(r)} |"
        )
    lines += [
        "",
        "Wall time is the running time of a run's processes, summed; a process paused (SIGSTOP) "
        "for other timed work on the machine keeps counting, so its seconds per round are an "
        "upper bound, and the lowest figure is the pace with the rows sharing the machine.",
        "",
        *_observations(runs, info),
        "",
        _machine(info, runs),
    ]
    return "\n".join(lines) + "\n"


def plot_paper_scale(data: dict[str, Any], path: Path) -> Path:
    """Both curves per α (PNG, dpi 80): test accuracy against round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info, runs = data["info"], data["runs"]
    alphas = info["alphas"]
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.2 * len(alphas), 3.6), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        for r in (r for r in runs if r["alpha"] == alpha and r["curve"]):
            xs, ys = zip(*r["curve"])
            suffix = "" if r["complete"] else f" (round {r['rounds_done']} of {r['target_rounds']})"
            ax.plot(xs, [100 * y for y in ys], label=LABELS[r["method"]] + suffix, linewidth=1.2)
        ax.set_title(
            f"{info['recipe']['model']}, {info['recipe']['dataset']}, α = {alpha}, "
            f"K = {info['k']}, {info['clients']} clients",
            fontsize=9,
        )
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xlim(0, info["rounds"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
