"""Run outputs: ``results.json`` (rewritten atomically after every round), plot, checkpoint.

``results.json`` records, besides the config and the rounds, the ``environment`` it was made in
(machine, library versions, lock-file hash: :func:`fedzo_flwr.environment.environment`), because
a run is bit-exact only on one machine and one set of library versions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedzo_flwr.environment import environment
from fedzo_flwr.files import atomic_write_bytes

SCHEMA_VERSION = 1


def per_client_summary(values: Mapping[int, float]) -> dict[str, Any]:
    """``{"per_client": {id: v}, "total": Σ, "mean": ..., "max": ...}`` of one per-client metric."""
    numbers = list(values.values())
    return {
        "per_client": {str(k): v for k, v in sorted(values.items())},
        "total": sum(numbers),
        "mean": sum(numbers) / len(numbers) if numbers else 0,
        "max": max(numbers) if numbers else 0,
    }


class RunRecorder:
    """Collects a run's setup and per-round metrics and keeps ``results.json`` current.

    Parameters
    ----------
    run_dir : Path
        ``<output-dir>/<run-name>``; created if needed.
    config : dict
        The validated run config (kebab-case keys).
    """

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "run_name": run_dir.name,
            "config": config,
            "environment": environment(),
            "setup": {},
            "rounds": [],
            "final": {},
        }

    @property
    def results_path(self) -> Path:
        """Where ``results.json`` lives."""
        return self.run_dir / "results.json"

    def set_setup(self, **fields: Any) -> None:
        """Record facts fixed before round 1 (mask size, density, FLOPs...)."""
        self.data["setup"].update(fields)
        self.write()

    def round_entry(self, server_round: int) -> dict[str, Any]:
        """The entry of ``server_round``, created on first use (rounds stay in order)."""
        rounds = self.data["rounds"]
        for entry in reversed(rounds):
            if entry["round"] == server_round:
                found: dict[str, Any] = entry
                return found
        entry = {"round": server_round}
        rounds.append(entry)
        rounds.sort(key=lambda e: e["round"])
        return entry

    def update_round(self, server_round: int, **fields: Any) -> None:
        """Merge ``fields`` into the entry of ``server_round`` and rewrite the file."""
        self.round_entry(server_round).update(fields)
        self.write()

    def set_final(self, **fields: Any) -> None:
        """Record the end-of-run summary."""
        self.data["final"].update(fields)
        self.write()

    def finish(self, **fields: Any) -> dict[str, Any]:
        """Record the end of the run: the last evaluated accuracy and loss, plus ``fields``."""
        evaluated = [r for r in self.data["rounds"] if "accuracy" in r]
        last = evaluated[-1] if evaluated else {}
        self.set_final(accuracy=last.get("accuracy"), loss=last.get("loss"), **fields)
        final: dict[str, Any] = self.data["final"]
        return final

    def write(self) -> None:
        """Rewrite ``results.json`` atomically."""
        text = json.dumps(self.data, indent=2, sort_keys=False, allow_nan=False)
        atomic_write_bytes(self.results_path, text.encode())

    def plot(self) -> Path:
        """Accuracy and bytes per round as ``results.png`` next to ``results.json``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = self.data["rounds"]
        evaluated = [r for r in rounds if "accuracy" in r]
        trained = [r for r in rounds if "uplink_bytes" in r]
        fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
        ax_acc.plot(
            [r["round"] for r in evaluated],
            [100 * r["accuracy"] for r in evaluated],
            marker="o",
            markersize=3,
        )
        ax_acc.set_xlabel("round")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_title(
            f"{self.data['config'].get('method')} {self.data['config'].get('model')}"
            f" density {self.data['setup'].get('density', '?')}"
        )
        ax_acc.grid(alpha=0.3)
        for key, label in (("uplink_bytes", "uplink"), ("downlink_bytes", "downlink")):
            ax_bytes.plot(
                [r["round"] for r in trained],
                [r[key]["total"] for r in trained],
                label=f"{label} (all clients)",
            )
        ax_bytes.set_yscale("log")
        ax_bytes.set_xlabel("round")
        ax_bytes.set_ylabel("bytes per round (measured payloads)")
        ax_bytes.legend()
        ax_bytes.grid(alpha=0.3)
        fig.tight_layout()
        path = self.run_dir / "results.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
