"""The report's whole-ClientApp-process section, computed from ``client_memory.json``.

``benchmarks/client_memory.py --clientapp`` measures, per model and engine, a fresh process that
imports the real ClientApp and handles one first-contact train message. This module turns its
``clientapp`` rows and ``clientapp_ratios`` into the table and the sentences of
``docs/results.md`` (every number from the JSON).
"""

from __future__ import annotations

from typing import Any

MB = 2**20

__all__ = ["clientapp_label", "clientapp_lines", "least_memory_stream_rows"]


def clientapp_label(row: dict[str, Any]) -> str:
    """A ClientApp row's client: ``backprop dense (sgd)``, ``stream, micro-batch 4``, ``lean``."""
    if row["method"] == "fedavg":
        density = "dense" if row["density"] >= 1 else f"d={row['density']:g}"
        return f"backprop {density} (sgd)"
    name = str(row["engine"])
    if row.get("micro_batch"):
        name += f", micro-batch {row['micro_batch']}"
    return name


def _zo_label(row: dict[str, Any]) -> str:
    """The label ``client_memory.py`` gives the row in ``clientapp_ratios``."""
    kind = f"ZO pruned d={row['density']:g}" if row["density"] < 1 else "ZO dense"
    return f"{kind} ({clientapp_label(row)})"


def _mib(n: float) -> str:
    return f"{n / MB:,.1f} MiB"


def least_memory_stream_rows(memory: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model, the ``stream`` ClientApp row (any micro-batch) with the smallest process peak."""
    out: dict[str, dict[str, Any]] = {}
    for row in memory.get("clientapp", []):
        if row.get("engine") != "stream":
            continue
        best = out.get(row["model"])
        if best is None or row["process_peak"] < best["process_peak"]:
            out[row["model"]] = row
    return out


def clientapp_lines(memory: dict[str, Any]) -> list[str]:
    """The section's lines; a sentence saying it was not measured when the JSON lacks it."""
    rows = memory.get("clientapp")
    head = ["", "### The whole ClientApp process, one train message per fresh process", ""]
    if not rows:
        return [
            *head,
            "Not measured (run `benchmarks/client_memory.py --clientapp-only --merge` first).",
        ]
    settings = memory["clientapp_settings"]
    machine = memory.get("machine_clientapp", {})
    command = next((c for c in memory.get("commands", []) if "--clientapp" in c), None)
    ratios = {(q["model"], q["zo"]): q for q in memory.get("clientapp_ratios", [])}
    lines = [
        *head,
        (f"`{command}` " if command else "")
        + f"(batch {settings['batch']}, K = {settings['k']}, density {settings['density']:g}, "
        f"{settings['threads']} thread; machine load {machine.get('load_before')} to "
        f"{machine.get('load_after')}): each row is a fresh process that imports the real "
        f"ClientApp and handles one {settings['message']}; partition {settings['partition']}. "
        "**Process peak**: kernel VmHWM over the process's whole life; **above imports**: that "
        "peak minus the RSS after the imports (what the round adds: message, partition, model, "
        "step); **before the step**: the peak up to the train step (imports, message, "
        "partition, the node's model); **held**: what the node keeps between rounds (weights + "
        f"mask + index tables). Backprop: {settings['backprop']}.",
        "",
        "| model | client | process peak | above imports | before the step | held (weights + "
        "mask + index) | backprop / this | fused / this | lean / this |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        q = ratios.get((row["model"], _zo_label(row)), {})
        held = row["held"]

        def ratio(name: str, q: dict[str, Any] = q) -> str:
            key = f"process_vs_{name}"
            return f"{q[key]:.2f}x" if key in q else "-"

        lines.append(
            f"| {row['model']} | {clientapp_label(row)} | {_mib(row['process_peak'])} "
            f"| {_mib(row['process_peak'] - row['rss_after_imports'])} "
            f"| {_mib(row['hwm_before_step'])} "
            f"| {held['weights'] / MB:.2f} + {held['mask'] / MB:.2f} + {held['index'] / MB:.2f} "
            f"MiB | {ratio('backprop')} | {ratio('fused')} | {ratio('lean')} |"
        )
    lines.append("")
    for model, best in least_memory_stream_rows(memory).items():
        mine = [r for r in rows if r["model"] == model]
        others = {clientapp_label(r): r for r in mine if r is not best}
        q = ratios.get((model, _zo_label(best)), {})
        parts = [
            f"{name} {_mib(r['process_peak'])} ({_mib(r['process_peak'] - r['rss_after_imports'])}"
            " above the imports)"
            for name, r in others.items()
            if r["method"] == "fedavg" or r["engine"] in ("lean", "fused")
        ]
        above = best["process_peak"] - best["rss_after_imports"]
        vs = ", ".join(
            f"{q[f'above_imports_vs_{n}']:.1f}x vs {n}"
            for n in ("backprop", "fused", "lean")
            if f"above_imports_vs_{n}" in q
        )
        lines.append(
            f"* {model}: the least-memory `stream` ClientApp is `{clientapp_label(best)}` at "
            f"{_mib(best['process_peak'])} ({_mib(above)} above the imports), against "
            + "; ".join(parts)
            + (f". Above the imports: {vs}." if vs else ".")
            + _setup_sentence(best, mine)
            + _first_step_sentence(best, memory.get("rows", []))
        )
    return lines


def _setup_sentence(best: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What holding the model dense costs before the step: the lean node against the stream's."""
    lean = next((r for r in rows if r.get("engine") == "lean"), None)
    if lean is None:
        return ""
    return (
        f" Before the step the stream node peaks at {_mib(best['hwm_before_step'])}, the lean "
        f"node at {_mib(lean['hwm_before_step'])} (it builds the dense model, decodes the bool "
        "mask and the KeptSpace's index tables)."
    )


def _first_step_sentence(best: dict[str, Any], step_rows: list[dict[str, Any]]) -> str:
    """The ClientApp's step (first of a fresh process) against the isolated warm step."""
    same = next(
        (
            r
            for r in step_rows
            if r.get("engine") == "stream"
            and not r.get("sweep")
            and (r["model"], r["batch"], r["density"], r.get("micro_batch"))
            == (best["model"], best["batch"], best["density"], best.get("micro_batch"))
        ),
        None,
    )
    if same is None:
        return ""
    return (
        f" Its step adds {_mib(best['step_extra'])} in the ClientApp, the first step of a fresh "
        f"process, against {_mib(same['extra'])} in the isolated rows above, which measure a "
        "step after a warm-up step (one-off kernel and thread-pool set-up excluded)."
    )
