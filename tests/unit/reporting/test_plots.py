"""Figures render headless, keep their legends off the data, and count rounds in whole numbers."""

import io

import numpy as np
import pytest
from matplotlib.figure import Figure

from autorank.reporting.plots import (
    accuracy_curves,
    closeness_vs_rank,
    label_distribution,
    ranks_per_client,
)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _legend_right_of_axes(fig: Figure) -> bool:
    _png(fig)  # lay the figure out
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    return bool(legend.x0 >= ax.get_window_extent(renderer).x1)


def test_rank_bars_keep_the_legend_beside_the_bars() -> None:
    ranks = {
        "uniform": [160] * 10,
        "heavy_tail": [4] * 9 + [64],
        "autorank": list(range(10, 110, 10)),
    }

    fig = ranks_per_client(ranks)

    assert _png(fig)[:4] == b"\x89PNG"
    assert _legend_right_of_axes(fig)
    assert len(fig.axes[0].patches) == 30


def test_accuracy_curves_use_whole_rounds_and_an_outside_legend() -> None:
    curves = {"uniform-rbla": [0.5 + 0.01 * i for i in range(20)], "autorank-rbla": [0.6] * 12}

    fig = accuracy_curves(curves, title="global accuracy")

    assert _legend_right_of_axes(fig)
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 20]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [20, 12]


def test_std_bands_and_coinciding_curves_stay_visible() -> None:
    same = [0.5, 0.6, 0.7]
    curves = {"a": same, "b": same}

    fig = accuracy_curves(curves, title="t", spread={"a": [0.1, 0.1, 0.1], "b": [0.0] * 3})

    ax = fig.axes[0]
    lines = ax.get_lines()
    assert lines[0].get_linestyle() != lines[1].get_linestyle()
    assert lines[0].get_marker() != lines[1].get_marker()
    (band,) = ax.collections  # only "a" has a non-zero spread
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert low == pytest.approx(0.4) and high == pytest.approx(0.8)


def test_label_and_closeness_figures_render() -> None:
    histogram = np.array([[5, 0, 1], [0, 7, 2]])

    assert _png(label_distribution(histogram))[:4] == b"\x89PNG"
    assert _png(closeness_vs_rank([0.2, 0.9], [4, 32], [0, 1]))[:4] == b"\x89PNG"
    assert _png(closeness_vs_rank([None, None], [8, 8], [0, 1]))[:4] == b"\x89PNG"


def test_beyond_a_hundred_clients_the_figures_summarise_instead_of_one_mark_each() -> None:
    # Prepare: 150 clients, the last class held by a third of them
    rng = np.random.default_rng(0)
    histogram = rng.integers(1, 9, size=(150, 3))
    histogram[50:, 2] = 0

    # Execute
    labels = label_distribution(histogram)
    ranks = closeness_vs_rank(
        list(rng.random(150)), list(rng.integers(2, 9, 150)), list(range(150))
    )

    # Assert
    sizes, holding = labels.axes
    (curve,) = sizes.get_lines()
    assert list(curve.get_ydata()) == sorted(histogram.sum(axis=1), reverse=True)
    shares = [bar.get_height() for bar in holding.patches]
    assert shares == pytest.approx([1.0, 1.0, 1 / 3])
    assert not ranks.axes[0].texts  # no label per client
    assert _png(labels)[:4] == b"\x89PNG" and _png(ranks)[:4] == b"\x89PNG"
