"""The paper comparison's report (``docs/results.md``), every sentence computed from its data.

:func:`render_report` turns the summaries, the client-memory JSON and the recorded ``info``
(machine, load, scale, engine) into Markdown; nothing in it is written for one particular run.
``python benchmarks/paper_comparison.py --report-only`` rebuilds the report from the JSON.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from paper_summary import (
    ALPHAS,
    BUSY_LOAD,
    MB,
    NOISE_PP,
    PAPER,
    Summary,
    find,
    fmt_bytes,
    gain_over_start,
    label,
    memory_label,
    paper_scale,
    paper_scale_days,
    still_improving,
    training,
)
from paper_verdicts import verdicts

NOT_RECORDED = "not recorded"


def commands(
    info: dict[str, Any],
    *,
    k: int | None = None,
    rounds: int | None = None,
    clients: int | None = None,
) -> list[str]:
    """The exact commands that produce the report (from the recorded scale)."""
    engine = _engine(info)
    return [
        "export FEDZO_DATA_DIR=/path/to/folder/with/cifar10.npz MPLCONFIGDIR=/tmp/mpl",
        "python benchmarks/client_memory.py --json docs/results/client_memory.json",
        "python benchmarks/paper_comparison.py"
        + (" --quick" if info["quick"] else "")
        + f" --clients {clients or info['clients']} --rounds {rounds or info['rounds']}"
        f" --k {k or info['k']} --eval-every {info['eval_every']} --workers {info['workers']}"
        + (f" --engine {engine}" if engine else ""),
    ]


def device_sentence(info: dict[str, Any]) -> str:
    """Whether a GPU was visible, and the scale against the paper's."""
    gpus = info.get("gpus")
    if gpus is None:
        device = "Whether a GPU was visible to these runs is not recorded in the summary."
    elif not gpus:
        device = (
            "**No GPU was visible to these runs** (`torch.cuda.device_count()` = 0); "
            "everything ran on the CPU machine below."
        )
    else:
        device = f"A GPU was visible to these runs ({', '.join(gpus)})."
    if paper_scale(info):
        scale = f"This run is at the paper's scale (K = {info['k']}, {info['rounds']} rounds)."
    else:
        scale = (
            f"The scale is reduced from the paper's LeNet-5 run: K = {info['k']} instead of "
            f"{PAPER['k']}, {info['rounds']} rounds instead of {PAPER['rounds']}."
        )
    return f"{device} {scale}"


def load_sentence(info: dict[str, Any]) -> str:
    """What the load average says about other jobs on the machine."""
    before, after = info["load_before"], info["load_after"]
    if before[0] >= BUSY_LOAD:
        return (
            f"* Shared machine: other jobs were running (load average {tuple(before)} before "
            f"the matrix started, {tuple(after)} after, on {info['cores']} cores); wall times "
            "are noisy, FLOPs and bytes are not."
        )
    return (
        f"* The machine was idle when the matrix started (load average {tuple(before)}; "
        f"{tuple(after)} after); FLOPs and bytes do not depend on load."
    )


def _engine(info: dict[str, Any]) -> str:
    """The ZO engine of the matrix (summaries before ``engine`` was recorded: its note)."""
    if "engine" in info:
        return str(info["engine"])
    found = re.search(r"`(\w+)` engine", info.get("engine_note", ""))
    return found.group(1) if found else ""


def _dataset(info: dict[str, Any]) -> str:
    name = str(info.get("dataset"))
    return {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(name, NOT_RECORDED)


def _fedavg_steps(info: dict[str, Any]) -> str:
    optimizer = info.get("client_optimizer")
    steps = f"{info['local_batches']} local {optimizer.upper() if optimizer else ''} steps"
    return f"{' '.join(steps.split())} (lr {info['fedavg_lr']:g})" + (
        "" if optimizer else f" (client optimizer {NOT_RECORDED})"
    )


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
    lines = [
        "",
        "Zeroth-order, pruned (NTK, d = 0.1) against dense, at a few rounds "
        "(test accuracy, difference in points):",
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


def observations(summaries: list[Summary]) -> list[str]:
    """Data-derived remarks: pruner ranking and the FedAvg reference."""
    lines = []
    pruned = [
        s
        for s in summaries
        if s["method"] == "zo-pruned" and s["group"] in ("pruners", "core") and s["alpha"] == "0.1"
    ]
    pruned = [s for s in pruned if abs(s["density"] - 0.1) < 0.01]
    if len(pruned) > 1:
        ranked = sorted(pruned, key=lambda s: -s["last2_accuracy"])
        dense = find(summaries, "zo-dense-a0.1")
        lines += [
            "",
            "Pruners for zeroth-order training at α = 0.1, d = 0.1, ranked by last-2 accuracy: "
            + ", ".join(f"{s['prune_method']} {100 * s['last2_accuracy']:.1f}%" for s in ranked)
            + (f" (zo-dense: {100 * dense['last2_accuracy']:.1f}%)." if dense else "."),
        ]
    fed = [s for s in summaries if s["method"] == "fedavg"]
    if not fed:
        return lines
    text = "FedAvg (backprop) reference: " + ", ".join(
        f"{label(s)} α={s['alpha']} {100 * s['last2_accuracy']:.1f}%" for s in fed
    )
    zo = [s for s in summaries if s["method"] != "fedavg"]
    fed_dense = [s for s in fed if s["density"] >= 1]
    if zo and fed_dense:
        margin = 100 * (
            min(s["last2_accuracy"] for s in fed_dense) - max(s["last2_accuracy"] for s in zo)
        )
        if margin >= NOISE_PP:
            text += (
                f". Every dense FedAvg run is ahead of every zeroth-order run (by at least "
                f"{margin:.1f} pp)"
            )
        else:
            text += f". Dense FedAvg and the zeroth-order runs overlap ({margin:+.1f} pp)"
    for masked in (s for s in fed if s["density"] < 1):
        twin = next(
            (
                s
                for s in zo
                if s["alpha"] == masked["alpha"]
                and s["prune_method"] == masked["prune_method"]
                and s["density"] == masked["density"]
            ),
            None,
        )
        text += (
            f"; FedAvg on the {masked['prune_method']}-masked model (d = "
            f"{masked['density']:.2g}, α = {masked['alpha']}) {training(masked)} in these "
            f"rounds ({gain_over_start(masked):+.1f} pp over round 0)"
        )
        if twin:
            text += (
                f", the zeroth-order run on the same mask {training(twin)} "
                f"({gain_over_start(twin):+.1f} pp)"
            )
    return [*lines, "", text + "."]


def notes(
    summaries: list[Summary], memory: dict[str, Any] | None, info: dict[str, Any]
) -> list[str]:
    """The caveats section, from the recorded scale and the numbers."""
    improving, late = still_improving(summaries)
    scale = (
        f"* **Scale.** The paper's Figure 2 is LeNet on CIFAR-10 with K = {PAPER['k']} for "
        f"{PAPER['rounds']} rounds; this matrix is K = {info['k']} and {info['rounds']} rounds "
        f"on {info['cores']} CPU cores."
    )
    if late:
        scale += (
            f" Over the last quarter of the rounds the zeroth-order runs moved by "
            f"{min(late):+.1f} to {max(late):+.1f} pp (median "
            f"{sorted(late)[len(late) // 2]:+.1f}): "
            + (
                "still improving, so the accuracy gaps are early-training gaps."
                if improving
                else "roughly flat at this scale."
            )
        )
    if not paper_scale(info):
        command = commands(
            info, k=int(PAPER["k"]), rounds=int(PAPER["rounds"]), clients=int(PAPER["clients"])
        )
        scale += (
            f" The paper-scale run is `{command[-1]}`: roughly "
            f"{paper_scale_days(info):.0f} days on this machine (the matrix's wall time scaled "
            "by rounds, forward passes per step and clients)."
        )
    names = [s["name"] for s in summaries]
    seeds = "one seed per configuration" if len(set(names)) == len(names) else "repeated runs"
    lines = [
        "## Caveats and what is not done",
        "",
        scale,
        f"* **{seeds.capitalize()}** (seed {info['seed']}). No repetitions, hence no error "
        f"bars; differences below {NOISE_PP:g} points are called inconclusive.",
        f"* **No tuning per method.** Every ZO run uses the same server optimizer "
        f"({info['optimizer']}, lr {info['lr']:g}), σ = {info['sigma']:g} and batch "
        f"{info['batch']}; FedAvg uses {_fedavg_steps(info)}.",
    ]
    dense = next((s for s in summaries if s["method"] == "zo-dense"), None)
    pruned = next((s for s in summaries if s["method"] == "zo-pruned"), None)
    if dense and pruned and dense["last2_accuracy"] < pruned["last2_accuracy"]:
        lines[-1] += (
            f" A learning rate tuned for the dense estimate ({dense['kept_coordinates']:,} "
            f"coordinates against {pruned['kept_coordinates']:,}, noisier) could narrow the "
            "pruned/dense gap."
        )
    lines += [
        "* **FLOPs are counted, not realised.** Pruned weights are stored as zeros in dense "
        "tensors, so the pruned runs do the dense arithmetic (compare client seconds); the FLOPs "
        "column is what a sparse kernel would execute.",
        "* **Memory.** For the same reason the weights of a pruned model take the dense space; "
        "pruning only shrinks the zeroth-order perturbation buffers (saved kept values and one "
        "direction). The measured step memory includes framework workspace (convolution "
        "buffers, allocator slack) that the analytic breakdown leaves out; the *one forward* "
        "column shows it.",
    ]
    if info.get("engine_note"):
        lines.append(
            f"* **Engine.** {info['engine_note']}; client memory is measured per engine separately."
        )
    phased = [s for s in summaries if s["pruning_phase_bytes"]]
    if phased:
        pruners = sorted({s["prune_method"] for s in phased})
        lines.append(
            f"* **Data-dependent pruners** ({', '.join(f'`{p}`' for p in pruners)}) run as a "
            "federated phase before round 1 over Flower `query.prune` messages; their traffic "
            "is in the pruning-phase column."
        )
    backfilled = info.get("backfilled")
    if backfilled:
        lines.append(
            f"* **Recorded afterwards.** {', '.join(f'`{k}`' for k in backfilled['keys'])} "
            f"were added to the summary later, from {backfilled['source']}."
        )
    return lines


def memory_budget_note(memory: dict[str, Any]) -> str:
    """How the fused rows' memory budget compares with the engine's current default."""
    from fedzo_flwr.zo.engines.fused import DEFAULT_MEMORY_BUDGET_MB

    budget = memory["settings"].get("engine_memory_mb")
    if budget is None:
        return (
            " The memory JSON does not record the fused engine's memory budget (now "
            f"{DEFAULT_MEMORY_BUDGET_MB:g} MB by default)."
        )
    if budget == DEFAULT_MEMORY_BUDGET_MB:
        return ""
    k = memory["settings"]["k"]
    return (
        f" The `fused` rows were measured with the engine's memory budget at {budget:g} MB "
        f"(now {DEFAULT_MEMORY_BUDGET_MB:g} MB by default, see [performance.md](performance.md));"
        f" a chunk holds at most K = {k} directions, so fused rows measured now may read up to "
        f"{abs(DEFAULT_MEMORY_BUDGET_MB - budget):g} MB "
        f"{'higher' if DEFAULT_MEMORY_BUDGET_MB > budget else 'lower'}."
    )


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
    path.write_text(render_report(summaries, memory, rel, info))


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
        f"| FedAvg | {_fedavg_steps(info)} per round,"
        " server averages weighted by examples | not stated |",
        f"| pruning | NTK-SAP T = {info['prune_iterations']}, R = {info['prune_repeats']} "
        "| not stated |",
        f"| evaluation | full test set (10,000) every {info['eval_every']} rounds; one seed "
        f"({info['seed']}) per configuration | |",
        "",
        f"Accuracy differences below {NOISE_PP:g} points between single-seed runs are treated "
        "as run-to-run noise (inconclusive) in the verdicts.",
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
        "",
        "| α | method | density | final acc. | last-2 acc. | best acc. | run wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['alpha']} | {label(s)} | {s['density']:.3g} | {100 * s['final_accuracy']:.2f}% "
            f"| {100 * s['last2_accuracy']:.2f}% | {100 * s['best_accuracy']:.2f}% "
            f"| {s['wall_seconds']:.0f} |"
        )
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
    else:
        lines.append("Not measured in this run (run `benchmarks/client_memory.py` first).")
    lines += ["", *notes(summaries, memory, info), ""]
    return "\n".join(lines)


def _per_round(info: dict[str, Any]) -> str:
    per_round = info.get("clients_per_round")
    if per_round is None:
        return f"clients per round {NOT_RECORDED}"
    return "all every round" if per_round in (0, info["clients"]) else f"{per_round} per round"


# -------------------------------------------------------------------------------- main
