"""The results report's figures (GON-SPEC 8, 9): each table's cells as train and test curves, each ablation's
settings as curves, and the run's pictures titled with what they show.

Conventions: the y axis says its unit; test is a solid line, train a dashed one; the seeds of a cell are thin
lines of the row's colour with their mean drawn thick; a run short of its schedule ends in a cross labelled with
how far it got ("147/500"); J's final values are stars at the schedule's end (filled: test, hollow: train); the
legend sits outside the data.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.lines import Line2D

from experiments.suite import UNITS

COINCIDE = 0.01  # two ablation curves within 1% of each other at every epoch are said to coincide


def plain_axis(ax) -> None:
    """A y axis with few, plainly written ticks: log with 1, 2, 5 per decade (every digit on a range narrower than
    a decade), or linear on a range within a factor of 3; no minor labels."""
    low, high = ax.dataLim.y0, ax.dataLim.y1  # the data's range, not the padded view's (which may reach below 0)
    if low <= 0 or high / low < 3:
        ax.yaxis.set_major_locator(ticker.MaxNLocator(6))
    else:
        ax.set_yscale("log")
        subs = (1.0, 2.0, 5.0) if high / low > 10 else tuple(float(d) for d in range(1, 10))
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=subs))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.grid(alpha=0.3, which="major")


def _mean_curve(curves: Sequence[Sequence[tuple]], index: int) -> tuple[list, list]:
    """Epochs every seed reached and the seeds' mean of value `index` (1 train, 2 test) there."""
    common = sorted(set.intersection(*(set(p[0] for p in curve) for curve in curves)))
    by_seed = [{p[0]: p[index] for p in curve} for curve in curves]
    return common, [statistics.fmean(seed[epoch] for seed in by_seed) for epoch in common]


def save_table_curves(path: Path, results: Sequence, title: str, titles: dict | None = None) -> None:
    """A results table (`experiments.suite.CellResult`s) as one panel per dataset: test and train metric
    against epoch for every row and seed, unfinished runs marked where they stop, J's final values starred."""
    datasets = list(dict.fromkeys(r.cell.dataset for r in results))
    rows = list(dict.fromkeys(r.cell.row.name for r in results))
    colours = {name: f"C{i % 10}" for i, name in enumerate(rows)}
    labels = {r.cell.row.name: r.cell.row.label for r in results}
    unit = UNITS[results[0].cell.row.metric]
    fig = Figure(figsize=(4.6 * len(datasets) + 2.6, 4.4), dpi=100)
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for name in rows:
            mine = [r for r in results if r.cell.dataset == dataset and r.cell.row.name == name]
            curves = [[p for p in r.curve if p[0] >= 1] for r in mine]
            curves = [c for c in curves if c]
            if not mine:
                continue
            colour = colours[name]
            several = len(curves) > 1
            for curve in curves:  # each seed; thin when several
                epochs = [p[0] for p in curve]
                marker = "o" if len(curve) == 1 else None  # a cell known by its last value only
                ax.plot(epochs, [p[2] for p in curve], color=colour, lw=0.6 if several else 1.3, marker=marker,
                        ms=4, alpha=0.6 if several else 1.0)
                ax.plot(epochs, [p[1] for p in curve], color=colour, lw=0.6 if several else 1.0, ls="--",
                        marker=marker, mfc="none", ms=4, alpha=0.6 if several else 1.0)
            if several:  # the seeds' mean, where they all are
                for index, style in ((2, "-"), (1, "--")):
                    epochs, means = _mean_curve(curves, index)
                    ax.plot(epochs, means, color=colour, lw=1.8, ls=style)
            for r, curve in zip(mine, curves):
                if r.epoch is not None and r.epoch < r.cell.schedule_epochs:  # unfinished: where it stops
                    ax.plot([curve[-1][0]], [curve[-1][2]], marker="x", ms=8, mew=2, color=colour, ls="")
                    ax.annotate(f"{r.epoch}/{r.cell.schedule_epochs}", (curve[-1][0], curve[-1][2]),
                                textcoords="offset points", xytext=(4, 6), fontsize=7, color=colour)
            j = mine[0].cell.j
            if j is not None:
                schedule = mine[0].cell.schedule_epochs
                ax.plot([schedule], [j[1]], marker="*", ms=11, color=colour, ls="")
                ax.plot([schedule], [j[0]], marker="*", ms=11, mfc="none", color=colour, ls="")
        plain_axis(ax)
        ax.set_title((titles or {}).get(dataset, dataset), fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
    handles = [Line2D([], [], color=colours[name], lw=1.6, label=labels[name]) for name in rows]
    handles += [Line2D([], [], color="0.3", lw=1.3, label="test"),
                Line2D([], [], color="0.3", lw=1.0, ls="--", label="train"),
                Line2D([], [], color="0.3", marker="*", ms=10, ls="", label="J's final test"),
                Line2D([], [], color="0.3", marker="*", ms=10, mfc="none", ls="", label="J's final train"),
                Line2D([], [], color="0.3", marker="x", ms=8, mew=2, ls="", label="unfinished run: its end")]
    if any(len([r for r in results if r.cell.row.name == n and r.cell.dataset == d]) > 1
           for n in rows for d in datasets):
        handles.append(Line2D([], [], color="0.3", lw=1.8, label="mean of seeds (thin: each seed)"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / fig.get_figwidth(), 1))
    fig.savefig(path)


def coinciding(results: Sequence) -> list[tuple[str, str, float]]:
    """Pairs of ablation settings whose train curves agree within COINCIDE at every common epoch:
    (label, label, largest relative difference)."""
    pairs = []
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            first, second = dict((p[0], p[1]) for p in a.curve if p[0] >= 1), dict((p[0], p[1]) for p in b.curve
                                                                                  if p[0] >= 1)
            common = sorted(set(first) & set(second))
            if len(common) < 2:
                continue
            worst = max(abs(first[e] - second[e]) / abs(second[e]) for e in common)
            if worst < COINCIDE:
                pairs.append((a.cell.row.label, b.cell.row.label, worst))
    return pairs


def save_ablation_curves(path: Path, results: Sequence, title: str) -> None:
    """An ablation as the seed draws it: per-epoch train loss, epochs 1-50, one line per setting (log scale);
    settings whose curves coincide are said so under the title (one would hide the other)."""
    fig = Figure(figsize=(7.6, 4.2), dpi=100)
    ax = fig.subplots()
    for index, result in enumerate(results):
        points = [p for p in result.curve if p[0] >= 1]
        seed = f" (seed {result.cell.seed})" if result.cell.seed else ""
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.4, label=result.cell.row.label + seed,
                marker="o" if len(points) == 1 else None, ms=4, ls=("-", "--", "-.", ":")[index % 4])
    plain_axis(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train " + UNITS["loss"])
    notes = [f"{a} and {b} coincide (within {100 * worst:.2g}% at every epoch)" for a, b, worst in coinciding(results)]
    ax.set_title("\n".join([title, *notes]), fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def save_titled_picture(source: Path, target: Path, title: str) -> None:
    """A run's picture (recon_<E>.png, samples_<E>.png) redrawn under a title that says what it shows."""
    image = imread(source)
    height, width = image.shape[:2]
    fig = Figure(figsize=(width / 100, height / 100 + 0.5), dpi=100)
    ax = fig.add_axes((0, 0, 1, height / (height + 50)))
    ax.imshow(image)
    ax.axis("off")
    fig.suptitle(title, fontsize=9, y=0.995, va="top")
    fig.savefig(target)
