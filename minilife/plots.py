"""The plots chapters share: line plots with measured points and reference lines, horizontal bars.

matplotlib on the Agg backend (PNG files, no display needed), imported only when a plot is drawn.
What it leaves out: interactive figures, styles and themes, subplots.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping




def _pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_lines(path: str | os.PathLike, series: Mapping[str, tuple[Iterable[float], Iterable[float]]],
               *, title: str = "", xlabel: str = "", ylabel: str = "", logy: bool = False, logx: bool = False,
               points: Mapping[str, tuple[Iterable[float], Iterable[float]]] | None = None,
               hlines: Mapping[str, float] | None = None) -> Path:
    """Save a line plot as PNG: ``series`` maps a label to (xs, ys); ``points`` are drawn as markers
    (measured values beside a predicted curve); ``hlines`` are labelled horizontal reference lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=label, linewidth=1.6)
    for label, (xs, ys) in (points or {}).items():
        ax.plot(list(xs), list(ys), "o", label=label, markersize=4)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1.0, color="grey")
        ax.annotate(label, xy=(0.01, y), xycoords=("axes fraction", "data"), fontsize=8,
                    va="bottom", color="grey")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xscale("log" if logx else "linear")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series or points:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(path: str | os.PathLike, values: Mapping[str, float], *, title: str = "", xlabel: str = "",
              lines: Mapping[str, float] | None = None) -> Path:
    """Save a horizontal bar chart as PNG (one bar per label, top to bottom in order); ``lines`` are
    labelled vertical reference lines (e.g. a warning threshold)."""
    plt = _pyplot()
    labels = list(values)
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.4 * len(labels)), dpi=110)
    ax.barh(range(len(labels)), [values[k] for k in labels], color="#4c72b0")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    for label, x in (lines or {}).items():
        ax.axvline(x, linestyle="--", linewidth=1.0, color="firebrick")
        ax.annotate(label, xy=(x, 1.0), xycoords=("data", "axes fraction"), fontsize=8, color="firebrick",
                    va="bottom", ha="center")
    ax.set_title(title, pad=14)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)
