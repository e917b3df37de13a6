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


def label_distribution(histogram: np.ndarray) -> Figure:
    """Stacked bars of samples per class for each client.

    Args:
        histogram: label counts, ``[n_clients, n_classes]``.
    """
    fig = _figure()
    ax = fig.add_subplot()
    n_clients, n_classes = histogram.shape
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
