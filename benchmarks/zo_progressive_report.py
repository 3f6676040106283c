"""The zo-progressive section of ``docs/results.md``, computed from its JSON.

``docs/results/zo_progressive_run.json`` (written by ``benchmarks/zo_progressive_run.py``) holds
a ``zo-progressive`` run and a ``zo-pruned`` run at equal rounds on one federation (and a
SmartFreeze run for reference). Every sentence below is computed from that file, the verdict
included: **better** or **worse** when the difference of the final accuracies is beyond the
noise margin (:func:`verdict`), else **not resolved**.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

LABELS = {
    "zo-progressive": "zo-progressive",
    "zo-pruned": "zo-pruned",
    "smartfreeze": "SmartFreeze (backprop, reference)",
}
#: Evaluations whose trend and scatter enter the verdict (the last ones of each run).
LAST = 4
_MIB = 2**20


def _curve(run: dict[str, Any]) -> list[tuple[int, float]]:
    return sorted((int(r), float(a)) for r, a in run["accuracy"].items())


def final_accuracy(run: dict[str, Any]) -> float:
    """Test accuracy at the last evaluation (the last round: equal rounds for every run)."""
    return _curve(run)[-1][1]


def tail_fit(run: dict[str, Any]) -> tuple[float, float]:
    """``(slope per evaluation, residual std)`` of a least-squares line through the tail.

    The tail is the last :data:`LAST` evaluations; the residual standard deviation (``LAST - 2``
    degrees of freedom) is the evaluation-to-evaluation scatter once the trend is removed.
    """
    tail = [a for _, a in _curve(run)[-LAST:]]
    xs = list(range(len(tail)))
    fit = statistics.linear_regression(xs, tail)
    residuals = [a - (fit.intercept + fit.slope * x) for x, a in zip(xs, tail)]
    scatter = math.sqrt(sum(r * r for r in residuals) / max(1, len(tail) - 2))
    return fit.slope, scatter


def verdict(data: dict[str, Any]) -> tuple[str, float, float]:
    """``(word, difference, margin)``: zo-progressive against zo-pruned, in accuracy units.

    ``difference`` = final accuracy of zo-progressive minus zo-pruned's (the same round);
    ``margin`` = 2 x the standard deviation of that difference: the test-set standard errors
    (``√(p(1-p)/n)`` of each run) and the tails' residual scatters (:func:`tail_fit`), combined
    in quadrature. Beyond it: **better** / **worse**; within it: **not resolved**.
    """
    runs = data["runs"]
    a, b = final_accuracy(runs["zo-progressive"]), final_accuracy(runs["zo-pruned"])
    n = data["settings"]["test-examples"]
    scatter_a = tail_fit(runs["zo-progressive"])[1]
    scatter_b = tail_fit(runs["zo-pruned"])[1]
    variance = a * (1 - a) / n + b * (1 - b) / n + scatter_a**2 + scatter_b**2
    margin = 2 * math.sqrt(variance)
    diff = a - b
    word = "better" if diff > margin else "worse" if diff < -margin else "not resolved"
    return word, diff, margin


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _per_stage(run: dict[str, Any], key: str) -> list[float]:
    return [v for _, v in sorted(run["per_stage"][key].items(), key=lambda kv: int(kv[0]))]


def render_zo_progressive(data: dict[str, Any], memory: dict[str, Any] | None = None) -> str:
    """The Markdown section for one ``zo_progressive_run.json`` (and ``zo_progressive_memory``)."""
    s, m = data["settings"], data["machine"]
    runs = {name: data["runs"][name] for name in LABELS if name in data["runs"]}
    optimizer = runs["zo-progressive"]["config"]
    lines = [
        "## Zeroth-order progressive training against zo-pruned (CIFAR-10, equal rounds)",
        "",
        f"{s['nodes']} clients ({s['model']}, CIFAR-10, {s['partitioner']} α = {s['alpha']}), "
        f"every client every round, {s['rounds']} rounds, seed {s['seed']}, batch "
        f"{s['batch-size']}. `zo-progressive` and `zo-pruned`: K = {s['k']}, σ = {s['sigma']:g}, "
        f"{s['fd']} differences, {s['local-steps']} local step(s) per round, the server optimizer "
        f"{optimizer['optimizer']} (lr {optimizer['lr']:g}) and the same data-free NTK-SAP mask "
        "of the model; "
        f"zo-progressive changes stage every {s['stage-rounds']} rounds (`pace = fixed`). "
        + (
            "SmartFreeze (backprop, the same stages and rounds) is a reference. "
            if "smartfreeze" in runs
            else ""
        )
        + f"All through the real ServerApp and ClientApps in one process, on {m['cpu']} "
        f"({m['cores']} cores, torch {m['torch']}, {m['threads']} thread, nice {m['nice']}), load "
        f"average {tuple(m['load_before'])} before and {tuple(m['load_after'])} after:",
        "",
        "```bash",
        f"FEDZO_DATA_DIR={s['data-dir']} {data['command']}",
        "```",
        "",
    ]
    lines += _accuracy_table(runs)
    lines += ["", *_verdict_lines(data, runs), ""]
    lines += _cost_table(data, runs)
    lines += ["", *_cost_lines(data, runs), ""]
    if memory is not None:
        lines += [*_memory_lines(memory), ""]
    lines.append(
        "Method, choices and per-step FLOPs: [progressive.md](progressive.md), section "
        '"Zeroth-order progressive training (ours)".'
    )
    return "\n".join(lines) + "\n"


def _accuracy_table(runs: dict[str, Any]) -> list[str]:
    marks = sorted({r for run in runs.values() for r, _ in _curve(run)})
    lines = [
        "| test accuracy at round | " + " | ".join(str(r) for r in marks) + " | wall time |",
        "|---|" + "---|" * (len(marks) + 1),
    ]
    for name, run in runs.items():
        acc = dict(_curve(run))
        cells = [f"{100 * acc[r]:.1f}" if r in acc else "-" for r in marks]
        lines.append(
            f"| {LABELS[name]} | " + " | ".join(cells) + f" | {run['seconds'] / 60:.1f} min |"
        )
    return lines


def _verdict_lines(data: dict[str, Any], runs: dict[str, Any]) -> list[str]:
    word, diff, margin = verdict(data)
    zp, base = runs["zo-progressive"], runs["zo-pruned"]
    head = {
        "better": "at equal rounds zo-progressive is **better** than zo-pruned",
        "worse": "at equal rounds zo-progressive is **worse** than zo-pruned",
        "not resolved": "**not resolved** at equal rounds: zo-progressive and zo-pruned are "
        "within the noise margin",
    }[word]
    slope_a, slope_b = tail_fit(zp)[0], tail_fit(base)[0]
    faster = (
        "still rising faster when the run ended, so more rounds may change the comparison"
        if slope_a > slope_b
        else "not rising faster than zo-pruned when the run ended"
    )
    out = [
        f"* Verdict: {head}: {_pct(final_accuracy(zp))} against {_pct(final_accuracy(base))} at "
        f"round {_curve(zp)[-1][0]} (difference {100 * diff:+.2f} pp, noise margin "
        f"{100 * margin:.2f} pp = 2 x the standard deviation of the difference: test-set "
        f"standard errors and the scatter of each curve's last {LAST} evaluations about their "
        "trend line). One seed: the spread between seeds is not measured.",
        f"* Over the last {LAST} evaluations zo-progressive gained {100 * slope_a:+.2f} pp per "
        f"evaluation, zo-pruned {100 * slope_b:+.2f} pp: zo-progressive was {faster}.",
    ]
    changes = zp["stage_changes"]
    if changes:
        rounds = ", ".join(str(c["round"]) for c in changes)
        out.append(
            f"* zo-progressive's stage changes came at rounds {rounds}; before the last stage its "
            "accuracy is that of blocks 0..t with output module t (the model as trained so far)."
        )
    if "smartfreeze" in runs:
        sf = runs["smartfreeze"]
        cfg = sf["config"]
        gain = final_accuracy(sf) - _curve(sf)[0][1]
        trains = "barely trains" if gain < 0.05 else "trains"
        out.append(
            f"* SmartFreeze on the same stages and rounds ({cfg['local-batches']} local "
            f"mini-batch(es) of {cfg['batch-size']} per round, SGD lr {cfg['local-lr']:g}, "
            f"momentum {cfg['momentum']:g}) {trains} in these rounds: "
            f"{_pct(final_accuracy(sf))} at the end, {100 * gain:+.2f} pp over round 0 "
            f"(zo-progressive {_pct(final_accuracy(zp))}, zo-pruned {_pct(final_accuracy(base))})."
        )
    rejected = sum(run["rejected_replies"] for run in runs.values())
    out.append(f"* Rejected replies over all runs: {rejected}.")
    return out


def _cost_table(data: dict[str, Any], runs: dict[str, Any]) -> list[str]:
    lines = [
        "| method | stage | rounds | perturbed coordinates | client GFLOP / round | "
        "client s / round | analytic need (MiB) | measured extra memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = runs["zo-pruned"]
    lines.append(
        f"| zo-pruned | all | {data['settings']['rounds']} | {base['kept_coordinates']:,} | "
        f"{base['client_flops_per_round'] / 1e9:.2f} | {base['client_seconds_per_round']:.3f} | "
        f"{data['zo_pruned_memory']['total_bytes'] / _MIB:.2f} | "
        f"{base['client_extra_mem_bytes'] / _MIB:.1f} |"
    )
    for name in ("zo-progressive", "smartfreeze"):
        if name not in runs:
            continue
        run = runs[name]
        flops = _per_stage(run, "client_flops")
        seconds = _per_stage(run, "client_seconds")
        extra = _per_stage(run, "client_extra_mem_bytes")
        counts = _per_stage(run, "rounds")
        dims = run.get("stage_dims")
        for t, need in enumerate(run["stage_need_bytes"]):
            dim = f"{dims[t]:,}" if dims else "(backprop)"
            lines.append(
                f"| {LABELS[name]} | {t} | {int(counts[t])} | {dim} | {flops[t] / 1e9:.2f} | "
                f"{seconds[t]:.3f} | {need / _MIB:.2f} | {extra[t] / _MIB:.1f} |"
            )
    return lines


def _cost_lines(data: dict[str, Any], runs: dict[str, Any]) -> list[str]:
    zp, base = runs["zo-progressive"], runs["zo-pruned"]
    flops = zp["client_flops_per_round"] / base["client_flops_per_round"]
    seconds = zp["client_seconds_per_round"] / base["client_seconds_per_round"]
    needs = zp["stage_need_bytes"]
    pruned = data["zo_pruned_memory"]
    relation = (
        "below"
        if max(needs) < pruned["total_bytes"]
        else "above"
        if min(needs) > pruned["total_bytes"]
        else "around"
    )
    largest = [_largest_item(m) for m in zp["stage_memory"]]
    return [
        f"* Averaged over the run, a zo-progressive client spends {flops:.2f}x the FLOPs and "
        f"{seconds:.2f}x the time of a zo-pruned client per round "
        f"({zp['client_seconds_per_round']:.3f} s against {base['client_seconds_per_round']:.3f} "
        "s); the uplink is the same K scalars "
        f"({zp['uplink_bytes_per_client_round']:.0f} B against "
        f"{base['uplink_bytes_per_client_round']:.0f} B per client-round).",
        "* Analytic forward-only need per stage: "
        + ", ".join(f"{n / _MIB:.2f}" for n in needs)
        + f" MiB, {relation} a zo-pruned client's {pruned['total_bytes'] / _MIB:.2f} MiB (both "
        "the lean engine's floor). Its largest item per stage: "
        + "; ".join(f"stage {t}: {item} {b / _MIB:.2f} MiB" for t, (item, b) in enumerate(largest))
        + f"; for zo-pruned: {_largest_item(pruned)[0]} {_largest_item(pruned)[1] / _MIB:.2f} MiB; "
        f"the perturbation buffers are {_items(zp, 'perturbation')} MiB per stage against "
        f"{pruned['perturbation'] / _MIB:.3f} MiB."
        + (" SmartFreeze's need is its backprop stage need." if "smartfreeze" in runs else ""),
        "* Measured extra memory is the clients' peak RSS above the round's baseline, in one "
        "process that runs every client in turn (allocator reuse blurs it); the zeroth-order "
        f"clients ran engine `{zp['config']['engine']}`, whose working set is bounded by "
        f"`engine-memory-mb` = {zp['config']['engine-memory-mb']:g} MiB, not by the model.",
    ]


#: The items of a memory breakdown that can dominate it (totals and bookkeeping excluded).
_ITEMS = ("weights", "mask", "batch", "prefix", "features", "activations", "perturbation")


def _largest_item(memory: dict[str, Any]) -> tuple[str, int]:
    return max(((k, int(memory[k])) for k in _ITEMS if k in memory), key=lambda kv: kv[1])


def _items(run: dict[str, Any], key: str) -> str:
    return ", ".join(f"{m[key] / _MIB:.3f}" for m in run["stage_memory"])


def _memory_lines(memory: dict[str, Any]) -> list[str]:
    """The isolated-process measurement of one client step per stage (and zo-pruned)."""
    s, m = memory["settings"], memory["machine"]
    rows = memory["rows"]
    lines = [
        f"Client memory of one step, each in a fresh process ({s['model']}, K = {s['k']}, batch "
        f"{s['batch']}, density {s['density']} with a mask of its own: NTK-SAP with "
        f"{s['ntk_iterations']} iterations, seed 0; the protocol of `benchmarks/isolated.py`: the "
        "step's peak RSS above the idle client holding model, mask and batch; load average "
        f"{tuple(m['load_before'])} before, {tuple(m['load_after'])} after):",
        "",
        "```bash",
        f"FEDZO_DATA_DIR={s['data-dir']} {memory['command']}",
        "```",
        "",
        "| variant | engine | perturbed coordinates | measured extra (MiB) | analytic step (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['engine']} | {r['dim']:,} | {r['extra'] / _MIB:.2f} | "
            f"{r['analytic']['step_bytes'] / _MIB:.2f} |"
        )
    lines.append("")
    for engine in sorted({r["engine"] for r in rows}):
        of = {r["variant"]: r["extra"] for r in rows if r["engine"] == engine}
        base = of.get("zo-pruned")
        stages = [v for k, v in sorted(of.items()) if k.startswith("stage-")]
        if not base or not stages:
            continue
        ratios = [v / base for v in stages]
        lines.append(
            f"* `{engine}`: a stage step's measured extra is {min(ratios):.2f}-{max(ratios):.2f}x "
            f"a zo-pruned step's ({base / _MIB:.2f} MiB)."
        )
    return lines
