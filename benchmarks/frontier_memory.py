"""The frontier's memory side: each method's peak client memory and who it admits.

**Peak client memory** of a method is the model's share of a device during one local step:
weights + mask + batch + the step's measured peak above an idle client (the *measured share*
of ``benchmarks/client_memory.py`` and ``benchmarks/progressive_memory.py``; the Python/torch
runtime, about 0.7 GB with this torch build, is left out as it is for every method). It is read
from those benchmarks' JSON where they have the row:

* ``fedavg``: client optimizer ``momentum``: ``progressive_memory.json``'s full-backprop row
  (SGD momentum 0.9, the progressive client's optimizer); ``sgd`` / ``adam``:
  ``client_memory.json``'s dense backprop row with that optimizer;
* ``smartfreeze`` / ``profl``: ``progressive_memory.json``'s measured peak over the stages;
* ``zo-dense`` / ``zo-pruned``: ``client_memory.json``'s row of the run's engine, density and
  micro-batch (for ``fused`` / ``batched``, whose chunk grows with K, only at the run's K).

Else it is the analytic need the server gates on, labelled ``analytic``: full backprop
(``full_backprop_memory``), the largest stage need (``stage_memory``), or the zeroth-order
client step of the engine (``zo_client_need``; for ``zo-progressive``, which has no row, the
whole model's step).

**Admission** (:func:`admission`): the fraction of a population's devices whose budget
(``device_budget``, seeded by partition id, ``profl-uniform``'s unit the analytic full-backprop
need) covers each method's need, analytic and measured; a progressive method admits a device
that fits at least one stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLIENT_MEMORY = ROOT / "docs/results/client_memory.json"
PROGRESSIVE_MEMORY = ROOT / "docs/results/progressive_memory.json"
ZO_METHODS = ("zo-dense", "zo-pruned", "zo-progressive")


@dataclass(frozen=True)
class Peak:
    """One method's peak client memory and where the figure comes from."""

    bytes: int
    kind: str  # "measured" or "analytic"
    source: str

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for the JSON."""
        return {"bytes": self.bytes, "kind": self.kind, "source": self.source}


def _share(row: dict[str, Any]) -> int:
    a = row["analytic"]
    return int(a["weights"] + a.get("mask", 0) + a["batch"] + row["extra"])


def _zo_density(cfg: dict[str, Any]) -> float:
    return 1.0 if cfg["method"] == "zo-dense" else float(cfg["density"])


def measured_peak(
    cfg: dict[str, Any], client: dict[str, Any] | None, progressive: dict[str, Any] | None
) -> Peak | None:
    """The measured share for run config ``cfg`` (kebab-case keys), or ``None`` without a row."""
    model, batch, method = cfg["model"], cfg["batch-size"], cfg["method"]
    if method == "fedavg" and cfg["client-optimizer"] == "momentum" and progressive:
        for s in progressive["summaries"]:
            if (s["model"], s["batch"]) == (model, batch):
                return Peak(
                    int(s["full"]["measured_share"]),
                    "measured",
                    "progressive_memory.json: full backprop, SGD momentum",
                )
    if method in ("smartfreeze", "profl") and progressive:
        split = progressive["settings"].get("split")
        for s in progressive["summaries"]:
            if (s["model"], s["batch"]) == (model, batch) and "measured_peak" in s:
                if split == cfg["stage-split"]:
                    return Peak(
                        int(s["measured_peak"]),
                        "measured",
                        "progressive_memory.json: peak over the stages",
                    )
    if client is None:
        return None
    for row in client["rows"]:
        if row.get("sweep") or (row["model"], row["batch"]) != (model, batch):
            continue
        if method == "fedavg" and row["method"] == "backprop":
            if row["density"] == 1.0 and row["optimizer"] == cfg["client-optimizer"]:
                return Peak(
                    _share(row), "measured", f"client_memory.json: backprop ({row['optimizer']})"
                )
        if method in ("zo-dense", "zo-pruned") and row["method"] == "zo":
            engine = cfg["engine"]
            same_k = engine in ("lean", "stream") or row["k"] == cfg["k"]
            if (
                row["engine"] == engine
                and row["density"] == _zo_density(cfg)
                and row.get("micro_batch", 0) == cfg["micro-batch"]
                and same_k
            ):
                mb = f", micro-batch {cfg['micro-batch']}" if cfg["micro-batch"] else ""
                return Peak(
                    _share(row),
                    "measured",
                    f"client_memory.json: ZO {engine}{mb}, density {row['density']:g}",
                )
    return None


def _model(cfg: dict[str, Any]) -> Any:
    from fedzo_flwr.data import NUM_CLASSES
    from fedzo_flwr.models import build_model

    return build_model(cfg["model"], NUM_CLASSES[cfg["dataset"]])


def _staged(cfg: dict[str, Any]) -> Any:
    from fedzo_flwr.data import NUM_CLASSES
    from fedzo_flwr.progressive import build_staged

    return build_staged(
        cfg["model"],
        NUM_CLASSES[cfg["dataset"]],
        split=cfg["stage-split"],
        layers_per_block=cfg["layers-per-block"],
    )


def stage_needs(cfg: dict[str, Any]) -> list[int]:
    """Analytic need of every stage of a progressive run (``stage_memory``)."""
    from fedzo_flwr.progressive.memory import stage_memory

    staged = _staged(cfg)
    return [
        stage_memory(staged, t, cfg["batch-size"]).total_bytes for t in range(staged.num_stages)
    ]


def full_need(cfg: dict[str, Any]) -> int:
    """Analytic full-backprop need (also ``profl-uniform``'s unit)."""
    from fedzo_flwr.progressive.memory import full_backprop_memory

    return full_backprop_memory(_model(cfg), cfg["batch-size"]).total_bytes


def zo_need(cfg: dict[str, Any], mask: Any = None) -> int:
    """Analytic need of a zeroth-order client step of ``cfg``'s engine (``zo_client_need``)."""
    from fedzo_flwr.config import RunConfig
    from fedzo_flwr.zo.client_need import zo_client_need

    keys = ("engine", "batch-size", "micro-batch", "chunk-size", "engine-memory-mb", "k", "fd")
    run = RunConfig.from_run_config({k: cfg[k] for k in keys})
    return zo_client_need(run, _model(cfg), mask).total_bytes


def analytic_peak(cfg: dict[str, Any], recorded: int | None = None) -> Peak:
    """The analytic need of ``cfg``'s method; ``recorded``: the need its run recorded."""
    method = cfg["method"]
    if method == "fedavg":
        return Peak(recorded or full_need(cfg), "analytic", "full_backprop_memory")
    if method in ("smartfreeze", "profl"):
        return Peak(max(stage_needs(cfg)), "analytic", "stage_memory, largest stage")
    if method == "zo-progressive":
        return Peak(zo_need(cfg), "analytic", "zo_client_need of the whole model (not measured)")
    if recorded is not None:
        return Peak(recorded, "analytic", f"zo_client_need ({cfg['engine']}), the run's gate")
    return Peak(zo_need(cfg), "analytic", f"zo_client_need ({cfg['engine']})")


def peak_memory(
    cfg: dict[str, Any],
    client: dict[str, Any] | None,
    progressive: dict[str, Any] | None,
    recorded: int | None = None,
) -> Peak:
    """Measured where a benchmark has the row, else analytic (module docstring)."""
    return measured_peak(cfg, client, progressive) or analytic_peak(cfg, recorded)


def load_json(path: Path) -> dict[str, Any] | None:
    """A benchmark's JSON, or ``None`` when it is absent."""
    import json

    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------- admission


def budgets(profile: str, nodes: int, unit: int, cfg: dict[str, Any]) -> list[int | None]:
    """The simulated budget of partitions ``0..nodes-1`` under ``profile``."""
    from fedzo_flwr.progressive import device_budget

    proportions = tuple(float(v) for v in str(cfg["device-proportions"]).split(","))
    return [
        device_budget(
            profile,
            pid,
            unit,
            seed=cfg["memory-seed"],
            proportions=proportions,
            usable_share=cfg["device-usable-share"],
        ).budget_bytes
        for pid in range(nodes)
    ]


def _fraction(budget: list[int | None], needs: list[int], margin: float) -> float:
    """Devices that fit at least one of ``needs`` (one need: that one), as a fraction."""
    fit = [b is None or any(b >= n * (1 + margin) for n in needs) for b in budget]
    return sum(fit) / len(fit)


def method_needs(
    cfg: dict[str, Any],
    client: dict[str, Any] | None,
    progressive: dict[str, Any] | None,
) -> dict[str, list[int] | None]:
    """``{"analytic": needs, "measured": needs or None}`` of ``cfg``'s method (one per stage)."""
    method = cfg["method"]
    if method in ("smartfreeze", "profl"):
        measured = None
        for s in (progressive or {}).get("summaries", []):
            if (s["model"], s["batch"]) == (cfg["model"], cfg["batch-size"]):
                if len(s["per_stage"]) == s["num_stages"]:
                    measured = [int(p["measured_share"]) for p in s["per_stage"]]
        return {"analytic": stage_needs(cfg), "measured": measured}
    peak = measured_peak(cfg, client, progressive)
    if method == "fedavg":
        analytic = full_need(cfg)
    else:
        mask = None
        if method == "zo-pruned":  # memory depends on the kept counts, not on which are kept
            from fedzo_flwr.pruning import prune

            mask = prune("random", _model(cfg), cfg["model"], float(cfg["density"]), seed=0)
        analytic = zo_need(cfg, mask)
    return {"analytic": [analytic], "measured": None if peak is None else [peak.bytes]}


def admission(
    profile: str,
    nodes: int,
    configs: dict[str, dict[str, Any]],
    client: dict[str, Any] | None,
    progressive: dict[str, Any] | None,
) -> dict[str, Any]:
    """Per method (``configs``: key -> run config), the fraction of devices it admits."""
    first = next(iter(configs.values()))
    unit = full_need(first)
    budget = budgets(profile, nodes, unit, first)
    out: dict[str, Any] = {
        "profile": profile,
        "model": first["model"],
        "batch": first["batch-size"],
        "nodes": nodes,
        "full_need_bytes": unit,
        "budgets": budget,
        "methods": {},
    }
    for key, cfg in configs.items():
        needs = method_needs(cfg, client, progressive)
        margin = float(cfg["memory-margin"])
        measured = needs["measured"]
        out["methods"][key] = {
            "analytic": _fraction(budget, needs["analytic"] or [], margin),
            "measured": None if measured is None else _fraction(budget, measured, margin),
            "needs": needs,
        }
    return out


def separates(report: dict[str, Any]) -> bool:
    """Whether the methods admit different fractions of the devices (analytic)."""
    return len({m["analytic"] for m in report["methods"].values()}) > 1
