"""The progressive-training section of ``docs/results.md``, computed from its JSON.

``docs/results/progressive_run.json`` (written by ``benchmarks/progressive_run.py``) holds a
SmartFreeze run and a FedAvg-on-the-devices-that-fit run on one memory-heterogeneous
population. Every sentence below is computed from that file.
"""

from __future__ import annotations

from typing import Any

COMMAND = "python benchmarks/progressive_run.py --json docs/results/progressive_run.json"
LABELS = {"smartfreeze": "SmartFreeze", "fedavg": "FedAvg on the devices that fit"}


def render_progressive(data: dict[str, Any]) -> str:
    """The Markdown section for one ``progressive_run.json``."""
    settings = data["settings"]
    runs = {name: data[name] for name in LABELS if name in data}
    lines = [
        "## Progressive block training on a memory-heterogeneous population",
        "",
        f"{settings['nodes']} clients ({settings['model']}, CIFAR-10, {settings['partitioner']} "
        f"α = {settings['alpha']}), budgets from the `{settings['memory-profile']}` profile, "
        f"{settings['rounds']} rounds of {settings['local-batches']} local batches of "
        f"{settings['batch-size']}, seed {settings['seed']}; both methods through the real "
        f"ServerApp and ClientApps (torch {data['machine']['torch']}):",
        "",
        "```bash",
        f"FEDZO_DATA_DIR=../shared/data PYTHONPATH=.:tests {COMMAND}",
        "```",
        "",
        "| method | final accuracy | clients that took part | wall time |",
        "|---|---|---|---|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {LABELS[name]} | {100 * run['final_accuracy']:.2f} % | "
            f"{100 * run['fraction_took_part']:.0f} % | {run['seconds'] / 60:.1f} min |"
        )
    lines.append("")
    lines.extend(_observations(runs))
    lines.append("")
    lines.append("Method, knobs and per-stage memory: [progressive.md](progressive.md).")
    return "\n".join(lines) + "\n"


def _observations(runs: dict[str, Any]) -> list[str]:
    out = []
    if {"smartfreeze", "fedavg"} <= runs.keys():
        sf, fa = runs["smartfreeze"], runs["fedavg"]
        diff = 100 * (sf["final_accuracy"] - fa["final_accuracy"])
        better = "above" if diff > 0 else "below"
        out.append(
            f"* SmartFreeze ends {abs(diff):.2f} points {better} FedAvg on the devices that fit, "
            f"with {sf['fraction_took_part'] / max(fa['fraction_took_part'], 1e-9):.0f}x as many "
            "clients taking part (one seed: the spread between seeds is not measured)."
        )
    sf = runs.get("smartfreeze")
    if sf is not None:
        changes = sf["stage_changes"]
        reasons = sorted({c["reason"] for c in changes})
        rounds = ", ".join(str(c["round"]) for c in changes) or "none"
        out.append(
            f"* Stage changes at rounds {rounds}, triggered by: {', '.join(reasons) or 'none'}."
        )
        metric = [m for m in sf["pace_metric"] if m is not None]
        if metric:
            out.append(
                f"* The pace metric ranged {min(metric):.2f}-{max(metric):.2f} over the run."
            )
        fractions = sf["eligibility"]["fractions"]
        never = len(sf["eligibility"]["never_eligible"])
        fits = ", ".join(f"{k} {100 * v:.0f} %" for k, v in fractions.items())
        out.append(
            f"* Fraction of the population whose budget fits: {fits}; {never} of "
            f"{sf['eligibility']['nodes']} clients fit no stage and never trained."
        )
    return out
