"""The paper comparison's numbers: one summary per run, and what the report derives from them.

A *summary* (:func:`summarize`) is the handful of numbers the report needs from one run's
``results.json``; ``docs/results/paper_comparison.json`` holds one per comparison row plus
``info`` (the machine and the scale). With several seeds (``paper_comparison.py --seeds N``) a
row is the :func:`aggregate` of its per-seed summaries (kept under ``seed_runs``): the mean of
every number, the sample standard deviation of the final, last-2 and best accuracies, and ``n``.
Everything here is a pure function of those dictionaries.

When is a difference resolved? Two rows ``a`` and ``b`` with ``n >= 2`` seeds each differ by
``Δ = mean_a - mean_b`` (last-2 accuracy); their *spread* is ``sqrt(sd_a² + sd_b²)``, the
standard deviation of the difference between one run of each. ``|Δ| <= spread`` is **not
resolved** (:func:`compare`). With one seed per row there is no spread, and a difference below
:data:`NOISE_PP` points is called inconclusive instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import mean, median, stdev
from typing import Any

Summary = dict[str, Any]
"""One run's numbers (see :func:`summarize`)."""

ALPHAS = ("0.1", "0.5", "iid")
PAPER = {
    "accuracy_gain_pp": 6.35,
    "flops_reduction": 0.57,
    "memory_ratio": 9.0,
    "k": 200,
    "rounds": 3000,
    "clients": 10,
}
"""The paper's numbers (Figure 2: LeNet on CIFAR-10; BAFFLE's 10 clients)."""
MB = 2**20

NOISE_PP = 2.0
"""Accuracy differences below this many points are called inconclusive (one seed per run)."""
TRAINS_PP = 5.0
"""A run that gains less than this many points over its round-0 accuracy "barely trains"."""
IMPROVING_PP = 1.0
"""A median last-quarter gain of at least this many points: the runs are still improving."""
BUSY_LOAD = 0.5
"""A 1-minute load average at least this high before the matrix: other jobs were running."""
WALL_SAVING = 0.8
"""Pruned client seconds below this fraction of the dense ones: a wall-time saving."""


ACCURACY_KEYS = ("final_accuracy", "last2_accuracy", "best_accuracy")
"""The accuracies a multi-seed row reports as mean ± sample standard deviation."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(run: dict[str, Any], results: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The numbers the report needs from one ``results.json``."""
    rounds = [r for r in results["rounds"] if r["round"] > 0 and "uplink_bytes" in r]
    evaluated = [r for r in results["rounds"] if "accuracy" in r]
    curve = [[r["round"], r["accuracy"]] for r in evaluated]
    last = [acc for _, acc in curve[-2:]]
    setup = results["setup"]
    phase = setup.get("pruning_phase") or {}
    cfg = results["config"]
    return {
        "name": run["name"],
        "group": run["group"],
        "alpha": run["alpha"],
        "method": cfg["method"],
        "prune_method": cfg["prune-method"] if setup["density"] < 1 else "none",
        "density": setup["density"],
        "kept_coordinates": setup["kept_coordinates"],
        "curve": curve,
        "final_accuracy": curve[-1][1],
        "last2_accuracy": _mean(last),
        "best_accuracy": max(acc for _, acc in curve),
        "flops_per_client_round": _mean([r["forward_flops"]["mean"] for r in rounds]),
        "uplink_per_client_round": _mean([r["uplink_bytes"]["mean"] for r in rounds[1:]])
        if len(rounds) > 1
        else rounds[0]["uplink_bytes"]["mean"],
        "downlink_per_client_round": _mean([r["downlink_bytes"]["mean"] for r in rounds[1:]])
        if len(rounds) > 1
        else rounds[0]["downlink_bytes"]["mean"],
        "downlink_first_round": rounds[0]["downlink_bytes"]["mean"],
        "pruning_phase_bytes": phase.get("uplink_bytes", 0) + phase.get("downlink_bytes", 0),
        "pruning_phase_uplink": phase.get("uplink_bytes", 0),
        "pruning_phase_downlink": phase.get("downlink_bytes", 0),
        "prune_seconds": setup.get("prune_seconds", 0.0),
        "client_seconds": _mean([r["client_seconds"]["mean"] for r in rounds]),
        "client_peak_mem_bytes": max(r["client_peak_mem_bytes"]["max"] for r in rounds),
        "client_extra_mem_bytes": max(
            r.get("client_extra_mem_bytes", {}).get("max", 0) for r in rounds
        ),
        "wall_seconds": seconds,
        "results_json": results.get("run_name"),
        "seed": cfg["seed"],
    }


# ------------------------------------------------------------------------------ seeds


def seeds_of(s: Summary) -> int:
    """How many seeds a row's numbers come from (summaries before ``n`` was recorded: 1)."""
    return int(s.get("n", 1))


def aggregate(per_seed: list[Summary]) -> Summary:
    """One row from the summaries of its seeds (same configuration, different ``seed``).

    One summary is returned as it is, with ``n = 1`` and ``seeds``. Several give: the mean of
    every number (an integer that all seeds share stays that integer); for each of
    :data:`ACCURACY_KEYS` the mean and ``<key>_sd``, the sample standard deviation; ``curve``
    the mean accuracy per evaluated round (rounds every seed evaluated) and ``curve_sd``;
    ``n``, ``seeds`` and ``per_seed`` (each seed's accuracies, wall time and run name).
    """
    if not per_seed:
        raise ValueError("aggregate needs at least one summary")
    first = per_seed[0]
    if len(per_seed) == 1:
        return {**first, "n": 1, "seeds": [first.get("seed")]}
    row: Summary = {}
    for key, value in first.items():
        values = [s[key] for s in per_seed]
        if isinstance(value, bool) or not isinstance(value, int | float):
            row[key] = value
        elif isinstance(value, int) and len(set(values)) == 1:
            row[key] = value
        else:
            row[key] = mean(float(v) for v in values)
    for key in ACCURACY_KEYS:
        row[f"{key}_sd"] = stdev(float(s[key]) for s in per_seed)
    curves = [dict((int(r), float(a)) for r, a in s["curve"]) for s in per_seed]
    rounds = sorted(set.intersection(*(set(c) for c in curves)))
    row["curve"] = [[r, mean(c[r] for c in curves)] for r in rounds]
    row["curve_sd"] = [[r, stdev(c[r] for c in curves)] for r in rounds]
    row.pop("seed", None)
    row["n"] = len(per_seed)
    row["seeds"] = [s.get("seed") for s in per_seed]
    row["results_json"] = [s.get("results_json") for s in per_seed]
    row["per_seed"] = [
        {
            "seed": s.get("seed"),
            "wall_seconds": s["wall_seconds"],
            **{k: s[k] for k in ACCURACY_KEYS},
        }
        for s in per_seed
    ]
    return row


@dataclass(frozen=True)
class Comparison:
    """Row ``a`` against row ``b`` on one accuracy (points).

    Attributes
    ----------
    diff_pp : float
        ``100 * (mean_a - mean_b)``.
    spread_pp : float or None
        ``100 * sqrt(sd_a² + sd_b²)`` when both rows have at least two seeds, else ``None``.
    n : int
        The smaller number of seeds of the two rows.
    """

    diff_pp: float
    spread_pp: float | None
    n: int

    @property
    def multi_seed(self) -> bool:
        """Whether a spread was measured (both rows with two seeds or more)."""
        return self.spread_pp is not None

    @property
    def ahead(self) -> bool:
        """``a`` is resolved ahead: beyond the spread, or (one seed) at least NOISE_PP."""
        if self.spread_pp is not None:
            return self.diff_pp > self.spread_pp
        return self.diff_pp >= NOISE_PP

    @property
    def behind(self) -> bool:
        """``a`` is resolved behind (the mirror of :attr:`ahead`)."""
        if self.spread_pp is not None:
            return self.diff_pp < -self.spread_pp
        return self.diff_pp <= -NOISE_PP

    @property
    def unresolved(self) -> bool:
        """Neither ahead nor behind: within the spread (or, one seed, below NOISE_PP)."""
        return not (self.ahead or self.behind)


def compare(a: Summary, b: Summary, key: str = "last2_accuracy") -> Comparison:
    """``a`` against ``b`` on ``key`` (see the module docstring for the rule)."""
    diff = 100 * (float(a[key]) - float(b[key]))
    n = min(seeds_of(a), seeds_of(b))
    if n < 2:
        return Comparison(diff, None, n)
    spread = 100 * math.sqrt(float(a[f"{key}_sd"]) ** 2 + float(b[f"{key}_sd"]) ** 2)
    return Comparison(diff, spread, n)


def pct(s: Summary, key: str = "last2_accuracy", digits: int = 1) -> str:
    """An accuracy in percent: ``26.4%``, or ``26.4 ± 0.5%`` for a multi-seed row."""
    sd = s.get(f"{key}_sd") if seeds_of(s) > 1 else None
    if sd is None:
        return f"{100 * s[key]:.{digits}f}%"
    return f"{100 * s[key]:.{digits}f} ± {100 * sd:.{digits}f}%"


def seeds_phrase(n: int) -> str:
    """``"one seed"`` or ``"3 seeds"``."""
    return "one seed" if n == 1 else f"{n} seeds"


# ----------------------------------------------------------------------------- report


def label(s: Summary) -> str:
    """A run's method, density and pruner, as the tables and plots name it."""
    if s["method"] == "zo-pruned":
        return f"zo-pruned {s['prune_method']} d={s['density']:.2g}"
    if s["method"] == "fedavg":
        return (
            "fedavg dense"
            if s["density"] >= 1
            else f"fedavg {s['prune_method']} d={s['density']:.2g}"
        )
    return "zo-dense (BAFFLE)"


def memory_label(r: dict[str, Any]) -> str:
    """A client-memory row's method, density and optimizer or engine."""
    if r["method"] == "backprop":
        kind = "backprop" + (" dense" if r["density"] >= 1 else f" d={r['density']:g}")
        return f"{kind} {r['optimizer']}"
    kind = "ZO dense" if r["density"] >= 1 else f"ZO d={r['density']:g}"
    return f"{kind} {r['engine']}"


def find(summaries: list[Summary], name: str) -> Summary | None:
    """The summary of the run called ``name``, if it ran."""
    return next((s for s in summaries if s["name"] == name), None)


def fmt_bytes(n: float) -> str:
    """``n`` bytes in KiB below 1 MiB, else in MiB."""
    return f"{n / 1024:.1f} KiB" if n < MB else f"{n / MB:.2f} MiB"


def crossover(dense: Summary, pruned: Summary) -> int | None:
    """First evaluated round from which ``pruned`` stays at or above ``dense`` to the end."""
    d, p = dict(dense["curve"]), dict(pruned["curve"])
    rounds = sorted(r for r in p if r in d and r > 0)
    first = None
    for r in rounds:
        if p[r] >= d[r]:
            first = r if first is None else first
        else:
            first = None
    return first


def gain_over_start(s: Summary) -> float:
    """Points gained from the first evaluation (round 0) to the last-2 accuracy."""
    return 100 * (float(s["last2_accuracy"]) - float(s["curve"][0][1]))


def late_gain(s: Summary) -> float:
    """Points gained over the last quarter of the rounds (last-2 accuracy against the
    evaluation nearest to 3/4 of the last evaluated round)."""
    curve = s["curve"]
    target = 0.75 * curve[-1][0]
    _, acc = min(curve, key=lambda point: abs(point[0] - target))
    return 100 * (float(s["last2_accuracy"]) - float(acc))


def still_improving(summaries: list[Summary]) -> tuple[bool, list[float]]:
    """Whether the zeroth-order runs were still improving at the end, and their late gains."""
    gains = [late_gain(s) for s in summaries if s["method"] != "fedavg"]
    return bool(gains) and median(gains) >= IMPROVING_PP, gains


def training(s: Summary) -> str:
    """``"trains"``, ``"barely trains"`` or ``"does not train"`` (gain over round 0)."""
    gain = gain_over_start(s)
    if gain < NOISE_PP:
        return "does not train"
    return "barely trains" if gain < TRAINS_PP else "trains"


def paper_scale(info: dict[str, Any]) -> bool:
    """Whether the run had at least the paper's K and rounds."""
    return bool(info["k"] >= PAPER["k"] and info["rounds"] >= PAPER["rounds"])


def paper_scale_days(info: dict[str, Any]) -> float:
    """Rough time of the paper-scale matrix (one seed) on this machine, in days: the matrix's
    wall time per seed scaled by rounds, forward passes per ZO step (K + 1) and clients."""
    scale = (PAPER["rounds"] / info["rounds"]) * ((PAPER["k"] + 1) / (info["k"] + 1))
    seconds = info["seconds"] / len(info.get("seeds") or [info.get("seed")])
    return float(seconds * scale * PAPER["clients"] / info["clients"] / 86400)
