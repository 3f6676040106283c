"""The paper comparison's figures (PNG, dpi 80): accuracy per α, FLOPs and bytes, memory.

With several seeds a row's accuracy curve is the mean over its seeds, shaded ± one sample
standard deviation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from paper_summary import MB, Summary, label, memory_label

FIGURES = ("accuracy_vs_round.png", "flops_and_bytes.png", "client_memory.png")
"""The figures' file names, in the order the report links them (the last one needs memory)."""


def figure_paths(fig_dir: Path, memory: dict[str, Any] | None) -> list[Path]:
    """The paths :func:`plots` writes (without plotting): for rebuilding the report's links."""
    return [fig_dir / name for name in FIGURES[: 3 if memory else 2]]


def plots(summaries: list[Summary], memory: dict[str, Any] | None, fig_dir: Path) -> list[Path]:
    """PNG plots (small, dpi 80): accuracy per α, FLOPs, bytes, memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    out = []
    alphas = list(dict.fromkeys(s["alpha"] for s in summaries))
    panels = [
        (
            f"α = {a}" if a != "iid" else "IID",
            [s for s in summaries if s["alpha"] == a and s["group"] == "core"],
        )
        for a in alphas
    ]
    extra = [s for s in summaries if s["group"] != "core"]
    if extra:
        alpha = extra[0]["alpha"]
        base = [s for s in summaries if s["alpha"] == alpha and s["method"] == "zo-dense"]
        panels.append((f"α = {alpha}: pruners, densities, masked FedAvg", base + extra))
    colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, members) in zip(axes[0], panels):
        for i, s in enumerate(members):
            xs, ys = zip(*s["curve"])
            style = "--" if s["method"] == "fedavg" else "-"
            color = colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
            ax.plot(
                xs,
                [100 * y for y in ys],
                style,
                label=label(s) + (f" (n={s['n']})" if s.get("n", 1) > 1 else ""),
                linewidth=1.2,
                color=color,
            )
            if s.get("curve_sd"):  # several seeds: mean ± one sample standard deviation
                sd = [100 * v for _, v in s["curve_sd"]]
                ax.fill_between(
                    xs,
                    [100 * y - e for y, e in zip(ys, sd)],
                    [100 * y + e for y, e in zip(ys, sd)],
                    color=color,
                    alpha=0.15,
                    linewidth=0,
                )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = fig_dir / FIGURES[0]
    fig.savefig(path, dpi=80)
    plt.close(fig)
    out.append(path)

    unique: dict[str, dict[str, Any]] = {}
    for s in summaries:
        unique.setdefault(label(s), s)
    labels = list(unique)
    fig, (ax_f, ax_b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_f.barh(labels, [unique[k]["flops_per_client_round"] / 1e9 for k in labels])
    ax_f.set_xlabel("GFLOPs per client-round (forward + backward, kept weights only)")
    ax_f.tick_params(axis="y", labelsize=7)
    ax_b.barh([f"{k} up" for k in labels], [unique[k]["uplink_per_client_round"] for k in labels])
    ax_b.barh(
        [f"{k} down" for k in labels], [unique[k]["downlink_per_client_round"] for k in labels]
    )
    ax_b.set_xscale("log")
    ax_b.set_xlabel("bytes per client-round (measured)")
    ax_b.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    path = fig_dir / FIGURES[1]
    fig.savefig(path, dpi=80)
    plt.close(fig)
    out.append(path)

    if memory:
        rows = memory["rows"]
        groups = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
        fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.6), squeeze=False)
        for ax, (model, batch) in zip(axes[0], groups):
            mine = [r for r in rows if r["model"] == model and r["batch"] == batch]
            names = [memory_label(r) for r in mine]
            ax.barh(names, [r["extra"] / MB for r in mine], label="measured (peak RSS - idle)")
            ax.barh(
                names,
                [r["analytic"]["step_bytes"] / MB for r in mine],
                height=0.35,
                label="analytic (lean for ZO)",
            )
            ax.set_xscale("log")
            ax.set_title(f"{model}, batch {batch}: one client step", fontsize=9)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("MB above the idle client")
            ax.tick_params(axis="y", labelsize=7)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = fig_dir / FIGURES[2]
        fig.savefig(path, dpi=80)
        plt.close(fig)
        out.append(path)
    return out
