"""Figures for the tracked artifacts; each returns a matplotlib Figure, saving is the caller's.

Uses the non-interactive Agg canvas so it works on headless machines and in threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend_outside(ax: Axes) -> None:
    """A legend to the right of the axes, so that it never covers a bar or a line."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


# Beyond this many clients a figure summarises them (sizes as a sorted curve, labels as the share
# of clients holding each) instead of drawing one bar or label per client: at 10,000 clients the
# per-client drawing took minutes and showed nothing readable.
PER_CLIENT_MAX = 100


def label_distribution(histogram: np.ndarray) -> Figure:
    """Stacked bars of samples per class for each client (a summary beyond ``PER_CLIENT_MAX``).

    Args:
        histogram: label counts, ``[n_clients, n_classes]``.
    """
    n_clients, n_classes = histogram.shape
    if n_clients > PER_CLIENT_MAX:
        return _population_labels(histogram)
    fig = _figure()
    ax = fig.add_subplot()
    bottom = np.zeros(n_clients)
    colours = [f"C{c % 10}" for c in range(n_classes)]
    for c in range(n_classes):
        ax.bar(np.arange(n_clients), histogram[:, c], bottom=bottom, color=colours[c], label=str(c))
        bottom += histogram[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("training samples")
    ax.set_title("Label distribution per client")
    ax.set_xticks(np.arange(n_clients))
    ax.legend(title="class", fontsize="small", ncols=2 if n_classes > 10 else 1, loc="upper left")
    return fig


def _population_labels(histogram: np.ndarray) -> Figure:
    """Many clients at once: their sizes, largest first, and the share holding each class."""
    n_clients, n_classes = histogram.shape
    fig = _figure(9.0, 3.6)
    sizes_ax, labels_ax = fig.subplots(1, 2)
    sizes = np.sort(histogram.sum(axis=1))[::-1]
    sizes_ax.plot(np.arange(1, n_clients + 1), sizes, lw=1.2)
    sizes_ax.set_xscale("log")
    sizes_ax.set_xlabel("clients, largest first")
    sizes_ax.set_ylabel("training samples")
    sizes_ax.set_title(f"Client sizes ({n_clients:,} clients)")
    sizes_ax.grid(alpha=0.3)
    holding = (histogram > 0).mean(axis=0)
    labels_ax.bar(np.arange(n_classes), holding, color=[f"C{c % 10}" for c in range(n_classes)])
    labels_ax.set_ylim(0, 1)
    labels_ax.set_xlabel("class")
    labels_ax.set_ylabel("share of clients holding it")
    labels_ax.set_title(f"Labels: {np.mean((histogram > 0).sum(axis=1)):.1f} per client on average")
    labels_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def closeness_vs_rank(
    closeness: Sequence[float | None], ranks: Sequence[int], clients: Sequence[int]
) -> Figure:
    """Scatter of each client's TOPSIS closeness against its assigned rank.

    Assigners without a closeness score are drawn at their client index instead.
    """
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    have_scores = all(c is not None for c in closeness)
    xs = [float(c or 0.0) for c in closeness] if have_scores else [float(c) for c in clients]
    if len(xs) > PER_CLIENT_MAX:  # points only: a label per client is unreadable and slow
        ax.scatter(xs, ranks, s=6, alpha=0.4, linewidths=0)
    else:
        ax.scatter(xs, ranks, s=40)
        for x, r, client in zip(xs, ranks, clients, strict=True):
            ax.annotate(str(client), (x, r), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("TOPSIS closeness" if have_scores else "client")
    ax.set_ylabel("assigned rank")
    ax.set_title("Closeness vs assigned rank" if have_scores else "Assigned rank per client")
    ax.grid(alpha=0.3)
    return fig


# Line styles and markers cycle separately from colours, so that curves that coincide (two
# methods with the same history) stay distinguishable instead of hiding one another.
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "x", "P", "*")


def accuracy_curves(
    curves: Mapping[str, Sequence[float]],
    *,
    title: str,
    spread: Mapping[str, Sequence[float]] | None = None,
) -> Figure:
    """One line per series of accuracy over rounds (rounds start at 1).

    ``spread``: per series, a standard deviation per round (over seeds), drawn as a band of
    ``mean ± std`` in the line's colour.
    """
    fig = _figure(8.5, 4.0)
    ax = fig.add_subplot()
    longest = max((len(v) for v in curves.values()), default=0)
    markers = longest <= 40  # markers would merge into a band on long runs
    for i, (name, values) in enumerate(curves.items()):
        x = np.arange(1, len(values) + 1)
        (line,) = ax.plot(
            x,
            values,
            linestyle=_STYLES[i % len(_STYLES)],
            marker=_MARKERS[i % len(_MARKERS)] if markers else None,
            markersize=3,
            label=name,
        )
        std = (spread or {}).get(name)
        if std is not None and any(std):
            mean, band = np.asarray(values), np.asarray(std[: len(values)])
            ax.fill_between(x, mean - band, mean + band, color=line.get_color(), alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def ranks_per_client(ranks: Mapping[str, Sequence[int]]) -> Figure:
    """Grouped bars: the rank each method gives each client."""
    fig = _figure(8.5, 4.0)
    ax = fig.add_subplot()
    n_methods = max(len(ranks), 1)
    width = 0.8 / n_methods
    n_clients = 0
    for m, (name, values) in enumerate(ranks.items()):
        xs = np.arange(len(values)) + (m - (n_methods - 1) / 2) * width  # groups centred on ticks
        ax.bar(xs, values, width=width, label=name)
        n_clients = max(n_clients, len(values))
    ax.set_xticks(np.arange(n_clients))
    ax.set_xlabel("client")
    ax.set_ylabel("rank")
    ax.set_title("Rank per client per method")
    _legend_outside(ax)
    return fig
