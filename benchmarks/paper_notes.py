"""The paper comparison report's sentences that are read off its data (``docs/results.md``).

The device and load sentences, the commands that reproduce the matrix, the observations under
the accuracy table, the client-memory budget note and the caveats section: each is computed from
the summaries, the client-memory JSON and the recorded ``info``, never written for one run.
:mod:`paper_report` lays them out with the tables.
"""

from __future__ import annotations

import re
from typing import Any

from paper_summary import (
    BUSY_LOAD,
    MB,
    NOISE_PP,
    PAPER,
    Summary,
    find,
    gain_over_start,
    label,
    paper_scale,
    paper_scale_days,
    pct,
    seeds_of,
    still_improving,
    training,
)

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
    seeds = info.get("seeds") or [info.get("seed")]
    return [
        "export FEDZO_DATA_DIR=/path/to/folder/with/cifar10.npz MPLCONFIGDIR=/tmp/mpl",
        "python benchmarks/client_memory.py --json docs/results/client_memory.json",
        "python benchmarks/paper_comparison.py"
        + (" --quick" if info["quick"] else "")
        + f" --clients {clients or info['clients']} --rounds {rounds or info['rounds']}"
        f" --k {k or info['k']} --eval-every {info['eval_every']} --workers {info['workers']}"
        + (f" --engine {engine}" if engine else "")
        + (f" --seeds {len(seeds)} --seed {seeds[0]}" if len(seeds) > 1 else ""),
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


def fedavg_steps(info: dict[str, Any]) -> str:
    optimizer = info.get("client_optimizer")
    steps = f"{info['local_batches']} local {optimizer.upper() if optimizer else ''} steps"
    return f"{' '.join(steps.split())} (lr {info['fedavg_lr']:g})" + (
        "" if optimizer else f" (client optimizer {NOT_RECORDED})"
    )


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
            + ", ".join(f"{s['prune_method']} {pct(s)}" for s in ranked)
            + (f" (zo-dense: {pct(dense)})." if dense else "."),
        ]
    fed = [s for s in summaries if s["method"] == "fedavg"]
    if not fed:
        return lines
    text = "FedAvg (backprop) reference: " + ", ".join(
        f"{label(s)} α={s['alpha']} {pct(s)}" for s in fed
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
            f" The whole matrix at the paper's scale is `{command[-1]}`: roughly "
            f"{paper_scale_days(info):.0f} days on this machine (the matrix's wall time scaled "
            "by rounds, forward passes per step and clients); `benchmarks/paper_scale.py` runs "
            "Figure 2's two rows (zo-dense, zo-pruned) at that scale, reported in \"The paper's "
            'scale" below.'
        )
    lines = [
        "## Caveats and what is not done",
        "",
        scale,
        _seeds_note(summaries, info),
        f"* **No tuning per method.** Every ZO run uses the same server optimizer "
        f"({info['optimizer']}, lr {info['lr']:g}), σ = {info['sigma']:g} and batch "
        f"{info['batch']}; FedAvg uses {fedavg_steps(info)}.",
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
        "* **Memory.** For the same reason the weights of a pruned model take the dense space "
        "in the dense engines (`lean`, `fused`, `batched`); pruning only shrinks their "
        "zeroth-order perturbation buffers (saved kept values and one direction). The measured "
        "step memory includes framework workspace (convolution buffers, allocator slack) that "
        "the analytic breakdown leaves out; the *one forward* column shows it.",
    ]
    streamed = [r for r in (memory or {}).get("clientapp", []) if r.get("engine") == "stream"]
    if streamed:
        held = {r["model"]: r["held"] for r in streamed}
        lines[-1] += (
            " The `stream` ClientApp holds them sparse at rest instead (the kept values and a "
            "bitmap per tensor, built from the message; no dense weights, no bool mask): "
            + ", ".join(
                f"{model} {(h['weights'] + h['mask'] + h['index']) / MB:.2f} MiB"
                for model, h in held.items()
            )
            + " between rounds (the ClientApp table above)."
        )
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


def _seeds_note(summaries: list[Summary], info: dict[str, Any]) -> str:
    """How many seeds each row has, and what the verdicts make of the spread."""
    n = max((seeds_of(s) for s in summaries), default=1)
    if n == 1:
        return (
            f"* **One seed per configuration** (seed {info['seed']}). No repetitions, hence no "
            f"error bars; differences below {NOISE_PP:g} points are called inconclusive."
        )
    seeds = info.get("seeds") or sorted({x for s in summaries for x in s.get("seeds", [])})
    fewer = [s["name"] for s in summaries if seeds_of(s) < n]
    return (
        f"* **{n} seeds per configuration** ({', '.join(str(x) for x in seeds)}). Accuracies "
        "are mean ± sample standard deviation; a difference within the spread "
        "√(sd_a² + sd_b²) is not resolved. "
        + (
            f"Rows with fewer seeds (a run failed): {', '.join(fewer)}."
            if fewer
            else "Every row has all its seeds."
        )
    )


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
