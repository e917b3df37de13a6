"""The per-run plots at a population of clients: the label distribution and the
closeness-vs-rank scatter as rendered now, against the same figures drawn with one mark and
label per client (the code before plots were bounded, kept here as the baseline).

Prints measured figures only (nothing asserted):

    .venv/bin/python benchmarks/plot_population.py [--clients 2000] [--classes 10]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from matplotlib.figure import Figure

from autorank.reporting import plots


def per_client_labels(histogram: np.ndarray) -> Figure:
    """The baseline: one stacked bar and one x tick per client."""
    fig = plots._figure()
    ax = fig.add_subplot()
    n_clients, n_classes = histogram.shape
    bottom = np.zeros(n_clients)
    for c in range(n_classes):
        ax.bar(np.arange(n_clients), histogram[:, c], bottom=bottom, color=f"C{c % 10}")
        bottom += histogram[:, c]
    ax.set_xticks(np.arange(n_clients))
    return fig


def per_client_ranks(closeness: list[float], ranks: list[int]) -> Figure:
    """The baseline: a labelled point per client."""
    fig = plots._figure(6.0, 4.0)
    ax = fig.add_subplot()
    ax.scatter(closeness, ranks, s=40)
    for client, (x, r) in enumerate(zip(closeness, ranks, strict=True)):
        ax.annotate(str(client), (x, r), textcoords="offset points", xytext=(4, 4), fontsize=8)
    return fig


def seconds(make: object) -> float:
    start = time.perf_counter()
    fig = make()  # type: ignore[operator]
    fig.savefig(io.BytesIO(), format="png")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    histogram = rng.integers(0, 20, size=(args.clients, args.classes))
    closeness = list(rng.random(args.clients))
    ranks = [int(r) for r in rng.integers(2, 33, args.clients)]
    clients = list(range(args.clients))
    rows = [
        ("label distribution", lambda: plots.label_distribution(histogram),
         lambda: per_client_labels(histogram)),
        ("closeness vs rank", lambda: plots.closeness_vs_rank(closeness, ranks, clients),
         lambda: per_client_ranks(closeness, ranks)),
    ]  # fmt: skip
    print(f"{args.clients} clients, {args.classes} classes, rendered to PNG")
    for name, bounded, baseline in rows:
        new, old = seconds(bounded), seconds(baseline)
        print(
            f"{name:>20}: {new:6.2f} s bounded, {old:7.2f} s one mark per client, {new / old:.3f}x"
        )


if __name__ == "__main__":
    main()
