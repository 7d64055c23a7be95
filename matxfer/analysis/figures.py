"""The analysis figures as PNG bytes: MI heatmap (Fig. 2a), drift bars (Fig. 2b), Fig. 1 panels."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

VARIANT_COLORS = {"random-init": "C0", "no-reg": "C1", "main": "C2"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()


def mi_heatmap(table: pd.DataFrame) -> bytes:
    """Normalised TransRate, tasks × layers, one panel per init (pretrained, random)."""
    plt = _plt()
    inits = list(dict.fromkeys(table["init"]))
    height = 0.6 * table["task"].nunique() + 2.2
    fig, axes = plt.subplots(1, len(inits), figsize=(4.5 * len(inits) + 1, height),
                             squeeze=False, layout="constrained")
    for ax, init in zip(axes[0], inits):
        grid = table[table["init"] == init].pivot(index="task", columns="layer",
                                                  values="normalized")
        image = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right")
        ax.set_yticks(range(grid.shape[0]), [t.removeprefix("matbench_") for t in grid.index])
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(f"I(Z;Y)/H(Z), {init}")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    return _png(fig)


def drift_bars(groups: dict[str, float], per_element: dict[str, float], title: str) -> bytes:
    """Relative drift per module group: all weights, and per-element rows of present elements."""
    plt = _plt()
    names = list(groups)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.5), layout="constrained")
    ax.bar(x - 0.2, [groups[n] for n in names], 0.4, label="all weights")
    ax.bar(x + 0.2, [per_element.get(n, np.nan) for n in names], 0.4,
           label="per-element rows, elements in task")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("‖θ − θ0‖ / ‖θ0‖")
    ax.set_title(title)
    ax.legend()
    return _png(fig)


def curves_by_task(curves: pd.DataFrame, columns: list[str], ylabel: str) -> bytes:
    """Per task, one line per (variant, fold) of each column of `curves` against epoch.
    curves: rows (task, variant, fold, epoch, *columns)."""
    plt = _plt()
    tasks = sorted(curves["task"].unique()) or ["-"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False,
                             layout="constrained")
    styles = ["-", "--", ":"]
    for ax, task in zip(axes[0], tasks):
        part = curves[curves["task"] == task]
        for (variant, fold), run in part.groupby(["variant", "fold"]):
            for style, column in zip(styles, columns):
                label = f"{variant} {column}" if fold == part["fold"].min() else None
                ax.plot(run["epoch"], run[column], style, alpha=0.7, label=label,
                        color=VARIANT_COLORS.get(variant, "C3"))
        ax.set_title(task.removeprefix("matbench_"))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if len(part):
            ax.legend(fontsize=7)
    return _png(fig)


def fold_metrics(runs: pd.DataFrame, metric_label: str) -> bytes:
    """Per task, the test metric of every fold, grouped bars per variant."""
    plt = _plt()
    tasks = sorted(runs["task"].unique()) or ["-"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False,
                             layout="constrained")
    for ax, task in zip(axes[0], tasks):
        part = runs[runs["task"] == task]
        variants = [v for v in VARIANT_COLORS if v in set(part["variant"])]
        for k, variant in enumerate(variants):
            rows = part[part["variant"] == variant].sort_values("fold")
            ax.bar(rows["fold"] + (k - (len(variants) - 1) / 2) * 0.25, rows["test"], 0.25,
                   label=variant, color=VARIANT_COLORS[variant])
        ax.set_title(task.removeprefix("matbench_"))
        ax.set_xlabel("fold")
        ax.set_ylabel(metric_label)
        if variants:
            ax.legend(fontsize=7)
    return _png(fig)
