"""The results report's figures (GON-SPEC 8, 9): a table's cells as curves, an ablation's settings as curves."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gonjax.plots import plt  # matplotlib with the Agg backend (no display)


def save_table_curves(path: Path, results: Sequence, title: str, titles: dict | None = None) -> None:
    """A results table as curves (`experiments.suite.CellResult`s): one panel per dataset, test metric against
    epoch for every row (each seed a line of the row's colour), J's final test value marked at its epoch."""
    datasets = list(dict.fromkeys(r.cell.dataset for r in results))
    titles = titles or {}
    rows = list(dict.fromkeys(r.cell.row.name for r in results))
    colours = {name: f"C{i % 10}" for i, name in enumerate(rows)}
    fig, axes = plt.subplots(1, len(datasets), squeeze=False, figsize=(max(7.0, 4.2 * len(datasets)), 4.2), dpi=100)
    for ax, dataset in zip(axes[0], datasets):
        labelled = set()
        for result in (r for r in results if r.cell.dataset == dataset):
            row = result.cell.row
            points = [p for p in result.curve if p[0] >= 1]
            label = None if row.name in labelled else row.label
            labelled.add(row.name)
            if points:
                ax.plot([p[0] for p in points], [p[2] for p in points], color=colours[row.name], lw=1, label=label,
                        marker="o" if len(points) == 1 else None, ms=4)  # one point: a cell's last value only
            j = result.cell.j
            if j is not None:
                ax.plot([result.cell.schedule_epochs], [j[1]], marker="*", ms=9, color=colours[row.name], ls="")
                ax.axhline(j[1], color=colours[row.name], lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_title(titles.get(dataset, dataset), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"test {results[0].cell.row.metric}")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:  # a panel whose cells are all at epoch 0 has no curve yet
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}\nstar and dotted line: J's final test value", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_ablation_curves(path: Path, results: Sequence, title: str) -> None:
    """An ablation as the seed draws it: per-epoch train loss, epochs 1-50, one line per setting (log scale)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for result in results:
        points = [p for p in result.curve if p[0] >= 1]
        seed = f" (seed {result.cell.seed})" if result.cell.seed else ""
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, label=result.cell.row.label + seed,
                marker="o" if len(points) == 1 else None, ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (per pixel, GON-SPEC 4.1)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
