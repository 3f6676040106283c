"""The frontier section of ``docs/results.md``, every sentence computed from ``frontier.json``.

:func:`render_frontier` turns the JSON written by ``benchmarks/frontier.py`` into Markdown (or,
without it, a section that says the frontier was not run and how to run it);
``benchmarks/paper_report.py`` appends it to the report (``results_appendix``), and
:func:`refresh_results_md` rewrites just this section of an existing ``docs/results.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEADING = "## The memory/accuracy frontier"
JSON_REL = "docs/results/frontier.json"
FIGURE_REL = "figures/frontier.png"  # relative to docs/
COMMAND = (
    "FEDZO_DATA_DIR=../shared/data PYTHONPATH=.:tests nice -n 10 python benchmarks/frontier.py "
    "--rounds 200 --k 200"
)
LABELS = {
    "fedavg-all": "FedAvg, every device (ignores budgets)",
    "fedavg-fit": "FedAvg, devices that fit",
    "smartfreeze": "SmartFreeze",
    "profl": "ProFL",
    "zo-dense": "ZO dense",
    "zo-pruned": "ZO pruned",
    "zo-progressive": "ZO progressive",
}
UPPER_BOUND = "fedavg-all"
DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


# ------------------------------------------------------------------------------ format


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _bytes(n: float | None) -> str:
    if n is None:
        return "not recorded"
    if n < 2**10:
        return f"{n:.0f} B"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.2f} MiB"


def _pct(f: float) -> str:
    return f"{100 * f:.0f} %"


def _acc(a: float | None) -> str:
    return "not evaluated" if a is None else f"{100 * a:.2f} %"


def _flops(n: float | None) -> str:
    return "not recorded" if n is None else f"{n / 1e9:.3g} GFLOP"


def _seconds(s: float | None) -> str:
    if s is None:
        return "not recorded"
    return f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min"


def label(row: dict[str, Any], profiles: int = 1) -> str:
    """The method's name in the table (ZO pruned with its density; the profile if several)."""
    text = LABELS.get(row["key"], row["key"])
    if row["key"] == "zo-pruned" and row.get("density") is not None:
        text += f" (d = {row['density']:.2g})"
    return text if profiles == 1 else f"{text} [{row['profile']}]"


def _eligible(row: dict[str, Any]) -> str:
    if row["eligible"] is None:
        return "not recorded"
    return f"{row['eligible']}/{row['nodes']} ({_pct(row['eligible_fraction'])})"


def _memory(row: dict[str, Any]) -> str:
    peak = row["peak_memory"]
    return f"{_mib(peak['bytes'])} ({peak['kind']})"


# ------------------------------------------------------------------------------ tables


def table_lines(data: dict[str, Any]) -> list[str]:
    """The frontier table: one row per run."""
    rows = data["runs"]
    profiles = len({r["profile"] for r in rows})
    lines = [
        "| method | final accuracy | devices eligible | took part | peak client memory "
        "| up / client-round | down / client-round | client FLOPs / client-round "
        "| client time / client-round | run wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {label(r, profiles)} | {_acc(r['final_accuracy'])} | {_eligible(r)} "
            f"| {r['took_part']}/{r['nodes']} ({_pct(r['took_part_fraction'])}) | {_memory(r)} "
            f"| {_bytes(r['uplink_per_client_round'])} | {_bytes(r['downlink_per_client_round'])} "
            f"| {_flops(r['flops_per_client_round'])} "
            f"| {_seconds(r['client_seconds_per_client_round'])} | {_seconds(r['wall_seconds'])} |"
        )
    return lines


def curve_lines(data: dict[str, Any]) -> list[str]:
    """Test accuracy of every run at the quarters of the run (accuracy over rounds)."""
    rows = [r for r in data["runs"] if r["curve"]]
    if not rows:
        return []
    rounds = sorted({int(p[0]) for p in rows[0]["curve"]} - {0})
    if not rounds:
        return []
    marks = sorted({rounds[max(0, len(rounds) * i // 4 - 1)] for i in range(1, 5)})
    profiles = len({r["profile"] for r in rows})
    lines = [
        "| method | round 0 | " + " | ".join(f"round {m}" for m in marks) + " |",
        "|---|---|" + "---|" * len(marks),
    ]
    for r in rows:
        at = {int(p[0]): p[1] for p in r["curve"]}
        cells = [f"{100 * at[m]:.1f}" if m in at else "-" for m in [0, *marks]]
        lines.append(f"| {label(r, profiles)} | " + " | ".join(cells) + " |")
    return lines


def admission_lines(report: dict[str, Any]) -> list[str]:
    """Fraction of the devices each method admits (analytic and measured needs)."""
    lines = [
        "| method | need, analytic | admits (analytic) | need, measured | admits (measured) |",
        "|---|---|---|---|---|",
    ]
    for key, m in report["methods"].items():
        analytic = m["needs"]["analytic"] or []
        measured = m["needs"]["measured"]
        stages = " (smallest stage)" if len(analytic) > 1 else ""
        need_m = "no row" if not measured else _mib(min(measured))
        fit_m = "-" if m["measured"] is None else _pct(m["measured"])
        lines.append(
            f"| {LABELS.get(key, key)} | {_mib(min(analytic))}{stages} | {_pct(m['analytic'])} "
            f"| {need_m} | {fit_m} |"
        )
    return lines


# ------------------------------------------------------------------------- sentences


def _respecting(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["key"] != UPPER_BOUND]


def _names(rows: list[dict[str, Any]], profiles: int) -> str:
    return ", ".join(label(r, profiles) for r in rows)


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both peak memory (lower) and final accuracy (higher)."""

    def beats(q: dict[str, Any], p: dict[str, Any]) -> bool:
        qm, pm = q["peak_memory"]["bytes"], p["peak_memory"]["bytes"]
        qa, pa = q["final_accuracy"] or 0.0, p["final_accuracy"] or 0.0
        return qm <= pm and qa >= pa and (qm < pm or qa > pa)

    front = [p for p in rows if not any(beats(q, p) for q in rows if q is not p)]
    return sorted(front, key=lambda r: r["peak_memory"]["bytes"])


def observations(data: dict[str, Any]) -> list[str]:
    """The section's findings, each computed from the runs."""
    rows = data["runs"]
    profiles = len({r["profile"] for r in rows})
    by_key = {r["key"]: r for r in rows if r["profile"] == data["settings"]["profiles"][0]}
    out: list[str] = []
    top, fit = by_key.get(UPPER_BOUND), by_key.get("fedavg-fit")
    if top is not None and fit is not None and fit["eligible"] is not None:
        diff = 100 * ((fit["final_accuracy"] or 0) - (top["final_accuracy"] or 0))
        side = "above" if diff > 0 else "below"
        out.append(
            f"FedAvg on the devices that fit admits {_eligible(fit)} of the devices and ends "
            f"{abs(diff):.2f} points {side} FedAvg on every device, the upper bound that no "
            "budget allows."
        )
    respecting = [r for r in _respecting(rows) if r["eligible"] is not None]
    if respecting:
        most = max(r["eligible"] for r in respecting)
        least = min(r["eligible"] for r in respecting)
        widest = [r for r in respecting if r["eligible"] == most]
        narrowest = [r for r in respecting if r["eligible"] == least]
        if most == least:
            out.append(f"Every method that respects the budgets admits {most} devices.")
        else:
            out.append(
                f"Most devices are eligible with {_names(widest, profiles)} "
                f"({most}/{widest[0]['nodes']}), fewest with {_names(narrowest, profiles)} "
                f"({least}/{narrowest[0]['nodes']})."
            )
        for r in respecting:
            if r["eligible"] == 0:
                out.append(
                    f"{label(r, profiles)} admits no device, so it never trains: its accuracy "
                    "is the initial model's."
                )
    trained = [r for r in _respecting(rows) if r["rounds_trained"] and r["final_accuracy"]]
    if trained:
        best = max(trained, key=lambda r: r["final_accuracy"])
        sentence = (
            f"The most accurate method that respects the budgets is {label(best, profiles)} "
            f"({_acc(best['final_accuracy'])})"
        )
        if top is not None and top["final_accuracy"] is not None:
            gap = 100 * (top["final_accuracy"] - best["final_accuracy"])
            sentence += f", {abs(gap):.2f} points {'below' if gap > 0 else 'above'} the upper bound"
        out.append(sentence + ".")
        front = pareto(trained)
        cells = ", ".join(
            f"{label(r, profiles)} ({_mib(r['peak_memory']['bytes'])}, {_acc(r['final_accuracy'])})"
            for r in front
        )
        dominated = [r for r in trained if r not in front]
        text = (
            f"On the frontier (no other budget-respecting method is both lighter and more "
            f"accurate), from the lightest: {cells}."
        )
        if dominated:
            text += f" Behind it: {_names(dominated, profiles)}."
        out.append(text)
    if fit is not None and fit["eligible"]:
        for key in ("zo-dense", "zo-pruned", "zo-progressive", "smartfreeze", "profl"):
            other = by_key.get(key)
            if other is None or other["eligible"] is None:
                continue
            diff = 100 * ((other["final_accuracy"] or 0) - (fit["final_accuracy"] or 0))
            out.append(
                f"{label(other, profiles)} admits {other['eligible'] / fit['eligible']:.1f}x "
                "as many devices as FedAvg on the devices that fit and ends "
                f"{abs(diff):.2f} points {'above' if diff > 0 else 'below'} it."
            )
    zo = [r for r in rows if r["method"].startswith("zo-") and r["uplink_per_client_round"]]
    if fit is not None and fit["uplink_per_client_round"] and zo:
        light = min(zo, key=lambda r: r["uplink_per_client_round"])
        ratio = fit["uplink_per_client_round"] / light["uplink_per_client_round"]
        out.append(
            f"Uplink per client-round: {label(light, profiles)} sends "
            f"{_bytes(light['uplink_per_client_round'])}, FedAvg "
            f"{_bytes(fit['uplink_per_client_round'])} ({ratio:.0f}x as much); downlink with "
            f"`downlink = {light.get('downlink', data['settings']['downlink'])}`: "
            f"{_bytes(light['downlink_per_client_round'])} against "
            f"{_bytes(fit['downlink_per_client_round'])}."
        )
    measured = [r for r in rows if r["peak_memory"]["kind"] == "measured"]
    analytic = [r for r in rows if r["peak_memory"]["kind"] != "measured"]
    if analytic:
        out.append(
            f"Peak client memory is measured for {_names(measured, profiles) or 'no method'} and "
            f"analytic for {_names(analytic, profiles)} (no measured row for its configuration)."
        )
    else:
        out.append("Peak client memory is measured for every method.")
    seeds = data["settings"]["seeds"]
    if len(seeds) == 1:
        out.append(
            f"One seed ({seeds[0]}): differences are not tested against the spread between seeds."
        )
    return out


def device_tier_lines(data: dict[str, Any]) -> list[str]:
    """Whether device-tier separates the methods on LeNet-5, and if not, ResNet-18's admission."""
    admitted = data["admission"]
    nodes = data["settings"]["clients"]
    if data["device_tier_separates_lenet5"]:
        return [
            "`device-tier` admits different fractions of the devices per method on LeNet-5 "
            "(analytic needs), so its population ran too (rows marked `[device-tier]`)."
        ]
    lenet = admitted["device-tier/lenet5"]
    shares = sorted({m["analytic"] for m in lenet["methods"].values()})
    lines = [
        f"`device-tier` does not separate the methods on LeNet-5: every method admits "
        f"{_pct(shares[0])} of the {nodes} devices (analytic needs against the tiers' usable "
        "memory), so it was not run.",
    ]
    resnet = admitted.get("device-tier/resnet18")
    if resnet is not None:
        lines += [
            f"On ResNet-18 (batch {resnet['batch']}) the same {nodes} devices are admitted as "
            "follows, from the memory model and the measured shares (**no accuracy: not run**):",
            "",
            *admission_lines(resnet),
        ]
        split = separates_measured(resnet)
        if split:
            lines += ["", split]
    return lines


def separates_measured(report: dict[str, Any]) -> str:
    """A sentence on which methods admit the fewest and most devices on the model (analytic)."""
    methods = report["methods"]
    shares = {k: m["analytic"] for k, m in methods.items()}
    low, high = min(shares.values()), max(shares.values())
    if low == high:
        return f"Every method admits {_pct(low)} of them."
    fewest = ", ".join(LABELS.get(k, k) for k, v in shares.items() if v == low)
    most = ", ".join(LABELS.get(k, k) for k, v in shares.items() if v == high)
    return f"Fewest with {fewest} ({_pct(low)}), most with {most} ({_pct(high)}) (analytic)."


# ------------------------------------------------------------------------------ section


def _setup(data: dict[str, Any]) -> str:
    s, m = data["settings"], data["machine"]
    mb = f", micro-batch {s['micro-batch']}" if s["micro-batch"] else ""
    profiles = " and ".join(f"`{p}`" for p in s["profiles"])
    return (
        f"{s['clients']} clients ({s['model']}, {DATASETS.get(s['dataset'], s['dataset'])}, "
        f"{s['partitioner']} "
        f"α = {s['alpha']}), budgets from {profiles} (memory-seed {s['memory-seed']}, "
        f"memory-margin {s.get('memory-margin', 0.0):g}); "
        f"{s['rounds']} rounds per method, every eligible client every round; K = {s['k']} "
        f"for the zeroth-order methods (`{s['engine']}` engine{mb}; downlink: "
        f"{s['downlink']}), {s['local-batches']} local batches of {s['batch-size']} "
        f"(SGD momentum, lr {s['local-lr']}) for the backprop methods; seed {s['seeds'][0]}. "
        f"Every run is the real ServerApp and ClientApps in process, in its own subprocess "
        f"with {s['torch_threads']} torch thread, {s['workers']} at a time, on {m['cpu']} "
        f"({m['cores']} cores; load {m['load_before']} before, {m['load_after']} after; "
        f"torch {data['versions']['torch']}, flwr {data['versions']['flwr']}): "
        f"{_seconds(data['seconds'])} in all."
    )


def render_frontier(data: dict[str, Any] | None) -> str:
    """The Markdown section for one ``frontier.json`` (``None``: not run yet)."""
    if data is None:
        return "\n".join(
            [
                HEADING,
                "",
                f"Not run: `{JSON_REL}` is absent. The full frontier (every method on one "
                "memory-heterogeneous population, `benchmarks/frontier.py`):",
                "",
                "```bash",
                COMMAND,
                "```",
                "",
            ]
        )
    lines = [
        HEADING,
        "",
        "Which method lets which devices train, at what accuracy. " + _setup(data),
        "",
        "```bash",
        *data["commands"],
        "```",
        "",
        *table_lines(data),
        "",
        "Peak client memory is the model's share of the device in one local step (weights, mask "
        "and batch plus the step's peak above an idle client; the Python/torch runtime left "
        "out), measured in isolated processes by `benchmarks/client_memory.py` and "
        "`benchmarks/progressive_memory.py` where they have the configuration, else the "
        "analytic need the server gates on. Bytes are measured per message; FLOPs are the "
        "client's forward (FedAvg and progressive: forward and backward) passes.",
        "",
        f"![accuracy against peak client memory]({FIGURE_REL})",
        "",
    ]
    curves = curve_lines(data)
    if curves:
        lines += ["Test accuracy (%) over rounds:", "", *curves, ""]
    lines += [f"* {o}" for o in observations(data)]
    lines += ["", *device_tier_lines(data), ""]
    if data["failures"]:
        failed = ", ".join(f["name"] for f in data["failures"])
        lines += [f"Runs that failed (not in the table): {failed}.", ""]
    return "\n".join(lines)


def frontier_section(docs: Path) -> str:
    """The section from ``docs/results/frontier.json`` (or the not-run section)."""
    path = docs / "results" / "frontier.json"
    return render_frontier(json.loads(path.read_text()) if path.is_file() else None)


def refresh_results_md(docs: Path) -> None:
    """Replace the frontier section of ``docs/results.md`` (its last section) by a fresh one."""
    path = docs / "results.md"
    text = path.read_text()
    start = text.find("\n" + HEADING + "\n")
    head = text if start < 0 else text[:start]
    path.write_text(head + "\n" + frontier_section(docs))


def print_table(data: dict[str, Any]) -> None:
    """The table and the findings on stdout."""
    print("\n".join(table_lines(data)))
    print()
    for line in observations(data):
        print(f"* {line}")
    print()
    print("\n".join(device_tier_lines(data)))
