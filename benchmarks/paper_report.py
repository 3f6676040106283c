"""The paper comparison's report (``docs/results.md``), every sentence computed from its data.

:func:`render_report` turns the summaries, the client-memory JSON and the recorded ``info``
(machine, load, scale, engine) into Markdown; nothing in it is written for one particular run.
This module lays out the sections and tables; the sentences are :mod:`paper_notes`.
``python benchmarks/paper_comparison.py --report-only`` rebuilds the report from the JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clientapp_report import clientapp_lines
from frontier_report import frontier_section
from paper_notes import (
    NOT_RECORDED,
    commands,
    device_sentence,
    fedavg_steps,
    load_sentence,
    memory_budget_note,
    notes,
    observations,
)
from paper_plots import figure_paths
from paper_scale_report import render_paper_scale
from paper_summary import (
    ALPHAS,
    MB,
    NOISE_PP,
    PAPER,
    Summary,
    find,
    fmt_bytes,
    label,
    memory_label,
    pct,
    seeds_of,
)
from paper_verdicts import verdicts
from progressive_report import render_progressive
from recipe_report import recipe_section
from zo_progressive_report import render_zo_progressive


def _dataset(info: dict[str, Any]) -> str:
    name = str(info.get("dataset"))
    return {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(name, NOT_RECORDED)


def _recorded(info: dict[str, Any], key: str, fmt: str = "{}") -> str:
    value = info.get(key)
    return NOT_RECORDED if value is None else fmt.format(value)


def trajectory_table(summaries: list[Summary]) -> list[str]:
    """Pruned (NTK, d=0.1) against dense ZO at a few rounds, per α: when does pruning pay off?"""
    pairs = [
        (alpha, find(summaries, f"zo-dense-a{alpha}"), find(summaries, f"zo-ntk-d0.1-a{alpha}"))
        for alpha in ALPHAS
    ]
    found = [(a, d, p) for a, d, p in pairs if d is not None and p is not None]
    if not found:
        return []
    rounds = [r for r, _ in found[0][1]["curve"] if r]
    marks = sorted({rounds[len(rounds) * i // 4 - 1] for i in range(1, 5)} if rounds else set())
    n = max(seeds_of(s) for _, d, p in found for s in (d, p))
    lines = [
        "",
        "Zeroth-order, pruned (NTK, d = 0.1) against dense, at a few rounds "
        "(test accuracy, difference in points" + (f"; means over {n} seeds):" if n > 1 else "):"),
        "",
        "| α | " + " | ".join(f"round {m}" for m in marks) + " |",
        "|---|" + "---|" * len(marks),
    ]
    for alpha, dense, pruned in found:
        dense_at, pruned_at = dict(dense["curve"]), dict(pruned["curve"])
        cells = [
            f"{100 * pruned_at[m]:.1f} vs {100 * dense_at[m]:.1f} "
            f"({100 * (pruned_at[m] - dense_at[m]):+.1f})"
            if m in dense_at and m in pruned_at
            else "-"
            for m in marks
        ]
        lines.append(f"| {alpha} | " + " | ".join(cells) + " |")
    return lines


def write_report(
    path: Path,
    summaries: list[Summary],
    memory: dict[str, Any] | None,
    figures: list[Path],
    info: dict[str, Any],
) -> None:
    """Write :func:`render_report` to ``path`` (figures linked relative to it)."""
    rel = [os.path.relpath(f, path.parent) for f in figures]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(summaries, memory, rel, info) + results_appendix(path.parent))


def results_appendix(docs: Path) -> str:
    """Sections from other benchmarks' JSON in ``docs/results/`` (each computed from its data):
    the recipe sweep (``recipe_sweep.json``), progressive training (``progressive_run.json``),
    zeroth-order progressive training (``zo_progressive_run.json``), the paper's scale
    (``paper_scale.json``), then the frontier, last (``frontier_report.refresh_results_md``
    replaces it alone; it says it was not run when its JSON is absent)."""
    sections = []
    recipe = docs / "results" / "recipe_sweep.json"
    if recipe.is_file():
        sections.append(recipe_section(json.loads(recipe.read_text())))
    progressive = docs / "results" / "progressive_run.json"
    if progressive.is_file():
        sections.append(render_progressive(json.loads(progressive.read_text())))
    zo_progressive = docs / "results" / "zo_progressive_run.json"
    zo_memory = docs / "results" / "zo_progressive_memory.json"
    if zo_progressive.is_file():
        memory = json.loads(zo_memory.read_text()) if zo_memory.is_file() else None
        sections.append(render_zo_progressive(json.loads(zo_progressive.read_text()), memory))
    scale = docs / "results" / "paper_scale.json"
    if scale.is_file():
        sections.append(render_paper_scale(json.loads(scale.read_text())))
    sections.append(frontier_section(docs))
    return "".join("\n" + section for section in sections)


def rebuild_results_md(path: Path) -> bool:
    """Rewrite ``path`` (``docs/results.md``) from the JSON beside it, without re-plotting.

    Reads ``results/paper_comparison.json`` and ``results/client_memory.json`` next to
    ``path`` and links the figures :func:`paper_plots.plots` wrote under ``figures/``; the
    appended sections come from :func:`results_appendix`. ``False`` (nothing written) when
    there is no comparison summary.
    """
    docs = path.parent
    summary_path = docs / "results" / "paper_comparison.json"
    if not summary_path.is_file():
        return False
    summary = json.loads(summary_path.read_text())
    memory_path = docs / "results" / "client_memory.json"
    memory = json.loads(memory_path.read_text()) if memory_path.is_file() else None
    figures = figure_paths(docs / "figures", memory)
    write_report(path, summary["runs"], memory, figures, summary["info"])
    return True


def render_report(
    summaries: list[Summary],
    memory: dict[str, Any] | None,
    rel: list[str],
    info: dict[str, Any],
) -> str:
    """``docs/results.md``: what ran, the tables, the verdicts (``rel``: figure links)."""
    lines = [
        "# Results: the paper comparison, measured",
        "",
        f"Generated by `benchmarks/paper_comparison.py` on {info['date']} "
        f"({'quick CI mode' if info['quick'] else 'full matrix'}); every number below comes from "
        "this project's runs. Raw per-run `results.json` files were written under "
        f"`{info['out_dir_rel']}`; the summary is `{info['json_rel']}`.",
        "",
        device_sentence(info),
        "",
        "## Machine and commands",
        "",
        f"* CPU: {info['cpu']} ({info['cores']} cores), torch {info['torch']}, Python "
        f"{info['python']}, {_recorded(info, 'torch_threads')} torch thread(s) per run, "
        f"{info['workers']} runs in parallel.",
        load_sentence(info),
        f"* Matrix wall time: {info['seconds'] / 60:.1f} min.",
        "",
        "```bash",
        *commands(info),
        "```",
        "",
        "## Scale (what ran, against the paper's)",
        "",
        "| | this run | paper (Figure 2) |",
        "|---|---|---|",
        f"| model / data | {info['model']} / {_dataset(info)} | LeNet / CIFAR-10 |",
        f"| clients | {info['clients']}, {_per_round(info)} | not stated (BAFFLE: "
        f"{PAPER['clients']}) |",
        f"| rounds | {info['rounds']} | {PAPER['rounds']} |",
        f"| K directions | {info['k']} (forward differences, σ = {info['sigma']:g}) "
        f"| {PAPER['k']} |",
        f"| client batch | {info['batch']}, "
        f"{_recorded(info, 'local_steps', '{} ZO step(s)')} per round | not stated |",
        f"| server optimizer (ZO) | {info['optimizer']} lr {info['lr']:g} | not stated |",
        f"| FedAvg | {fedavg_steps(info)} per round,"
        " server averages weighted by examples | not stated |",
        f"| pruning | NTK-SAP T = {info['prune_iterations']}, R = {info['prune_repeats']} "
        "| not stated |",
        f"| evaluation | full test set (10,000) every {info['eval_every']} rounds; "
        f"{_seeds_cell(info)} per configuration | |",
        "",
        _spread_rule(summaries),
        "",
        "## Verdict per paper claim",
        "",
        "| claim | paper | this project (measured) | verdict |",
        "|---|---|---|---|",
    ]
    for v in verdicts(summaries, memory):
        lines.append(f"| {v['claim']} | {v['paper']} | {v['ours']} | **{v['verdict']}** |")
    lines += [
        "",
        "## Accuracy",
        "",
        f"![accuracy vs round]({rel[0]})",
        "",
        "Final = last evaluation; last-2 = mean of the last two evaluations (used for verdicts).",
        *accuracy_table(summaries),
    ]
    lines += trajectory_table(summaries)
    lines += observations(summaries)
    lines += [
        "",
        "## FLOPs, bytes and client cost per client-round",
        "",
        f"![FLOPs and bytes]({rel[1]})",
        "",
        "FLOPs: `torch.utils.flop_counter` conv/linear FLOPs, each layer scaled by its kept "
        "fraction (masked weights not counted); ZO: (K+1) forward passes of one batch; FedAvg: "
        "forward **and** backward of every example trained (loss and optimizer update not "
        "counted). Bytes: measured serialized Flower messages (`message_nbytes`), mean per "
        "client over rounds 2..end (round 1 also carries the mask bitmap). Client seconds and "
        "the step's peak RSS above its entry RSS are measured inside the ClientApp "
        f"({info['engine_note']}; here all clients and the server share one process, so the "
        "isolated measurements of the next section are the ones to compare).",
        "",
        "| α | method | GFLOPs / client-round | vs zo-dense | uplink | downlink | downlink round 1 "
        "| pruning phase (up + down) | client s / round | client step extra RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        dense = find(summaries, f"zo-dense-a{s['alpha']}")
        rel_flops = (
            f"{100 * (s['flops_per_client_round'] / dense['flops_per_client_round'] - 1):+.0f}%"
            if dense
            else "-"
        )
        lines.append(
            f"| {s['alpha']} | {label(s)} | {s['flops_per_client_round'] / 1e9:.3f} | {rel_flops} "
            f"| {fmt_bytes(s['uplink_per_client_round'])} "
            f"| {fmt_bytes(s['downlink_per_client_round'])} "
            f"| {fmt_bytes(s['downlink_first_round'])} "
            f"| {fmt_bytes(s['pruning_phase_bytes']) if s['pruning_phase_bytes'] else '-'} "
            f"| {s['client_seconds']:.2f} | {s['client_extra_mem_bytes'] / MB:.1f} MiB |"
        )
    lines += ["", "## Client memory (measured in isolated processes)", ""]
    if memory:
        settings = memory["settings"]
        lines += [
            f"![client memory]({rel[2]})" if len(rel) > 2 else "",
            "",
            "`python benchmarks/client_memory.py --json docs/results/client_memory.json` "
            f"(batch {settings['batch']}, K = {settings['k']}, density {settings['density']:g} "
            f"with a random mask, {settings['threads']} thread; machine load "
            f"{memory['machine']['load_before']}): each row is a fresh process; **extra** = "
            "peak RSS of exactly one client step above the idle client (model, mask and batch "
            "loaded, after a warm-up step and `malloc_trim`). Analytic: "
            "`fedzo_flwr.measure.memory_model` (ZO rows: the lean engine)."
            + memory_budget_note(memory),
            "",
            "| model | batch | method | measured extra | one forward (measured) | analytic step "
            "| activations | gradients | optimizer state | perturbation buffers | weights "
            "| idle RSS |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in memory["rows"]:
            a = r["analytic"]
            lines.append(
                f"| {r['model']} | {r['batch']} | {memory_label(r)} | {r['extra'] / MB:.2f} MiB "
                f"| {r.get('forward_extra', 0) / MB:.2f} MiB "
                f"| {a['step_bytes'] / MB:.2f} MiB | {a['activations'] / MB:.2f} "
                f"| {a['gradients'] / MB:.2f} | {a['optimizer_state'] / MB:.2f} "
                f"| {a['perturbation'] / MB:.2f} | {a['weights'] / MB:.2f} "
                f"| {r['rss_idle'] / MB:.0f} MiB |"
            )
        lines += [
            "",
            "Ratios backprop / zeroth-order (paper: 9x). *step*: measured extra memory of the "
            "step; *model share*: weights + mask + batch + measured extra; *process*: whole "
            "peak RSS (Python and torch included); *analytic*: the breakdown's step and total.",
            "",
            "| model | batch | backprop | zeroth-order | step | model share | process "
            "| analytic step | analytic total |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for q in memory["ratios"]:
            lines.append(
                f"| {q['model']} | {q.get('batch')} | {q['backprop']} | {q['zo']} "
                f"| {q['extra_ratio']:.1f}x "
                f"| {q['model_share_ratio']:.1f}x | {q['process_ratio']:.2f}x "
                f"| {q['analytic_step_ratio']:.1f}x | {q['analytic_total_ratio']:.1f}x |"
            )
        lines += clientapp_lines(memory)
    else:
        lines.append("Not measured in this run (run `benchmarks/client_memory.py` first).")
    lines += ["", *notes(summaries, memory, info), ""]
    return "\n".join(lines)


def accuracy_table(summaries: list[Summary]) -> list[str]:
    """The accuracy table: one column per accuracy; with several seeds mean ± sd and ``n``."""
    if max((seeds_of(s) for s in summaries), default=1) == 1:
        lines = [
            "",
            "| α | method | density | final acc. | last-2 acc. | best acc. | run wall (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in summaries:
            lines.append(
                f"| {s['alpha']} | {label(s)} | {s['density']:.3g} "
                f"| {100 * s['final_accuracy']:.2f}% | {100 * s['last2_accuracy']:.2f}% "
                f"| {100 * s['best_accuracy']:.2f}% | {s['wall_seconds']:.0f} |"
            )
        return lines
    lines = [
        "Accuracies: mean ± sample standard deviation over the row's n seeds; run wall: mean "
        "seconds per seed.",
        "",
        "| α | method | density | n | final acc. | last-2 acc. | best acc. | run wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        cells = " | ".join(
            pct(s, key, 2) for key in ("final_accuracy", "last2_accuracy", "best_accuracy")
        )
        lines.append(
            f"| {s['alpha']} | {label(s)} | {s['density']:.3g} | {seeds_of(s)} | {cells} "
            f"| {s['wall_seconds']:.0f} |"
        )
    return ["", *lines]


def _seeds_cell(info: dict[str, Any]) -> str:
    """``one seed (3407)`` or ``3 seeds (3407, 3408, 3409)``."""
    seeds = info.get("seeds") or [info["seed"]]
    if len(seeds) == 1:
        return f"one seed ({seeds[0]})"
    return f"{len(seeds)} seeds ({', '.join(str(s) for s in seeds)})"


def _spread_rule(summaries: list[Summary]) -> str:
    """How the verdicts decide that a difference is real, for the seeds the rows have."""
    counts = sorted({seeds_of(s) for s in summaries})
    if counts[-1:] == [1] or not counts:
        return (
            f"Accuracy differences below {NOISE_PP:g} points between single-seed runs are "
            "treated as run-to-run noise (inconclusive) in the verdicts."
        )
    n = "-".join(str(c) for c in (counts[0], counts[-1])) if len(counts) > 1 else counts[0]
    return (
        f"Each row is the mean over its seeds ({n} per row; each seed changes θ0, the pruning "
        "draws, the partitions, node sampling and every round seed). A difference Δ of two "
        "rows' mean last-2 accuracies is **not resolved** when |Δ| ≤ √(sd_a² + sd_b²), the "
        "sample standard deviations over the seeds combined (the spread of the difference of "
        "one run of each); the verdicts count only differences beyond it."
    )


def _per_round(info: dict[str, Any]) -> str:
    per_round = info.get("clients_per_round")
    if per_round is None:
        return f"clients per round {NOT_RECORDED}"
    return "all every round" if per_round in (0, info["clients"]) else f"{per_round} per round"
