"""The grid's time estimate from one measured cell: the arithmetic, by hand."""

import pytest

from autorank.reporting.estimate import Measurement, PlannedCell, duration, estimate_lines

# A measuring command of 20 s whose run took 12 s: 2 s deciding the ranks, rounds of 3 s and
# 1 s, so 6 s of set-up (data, base model, records) and 8 s of start-up around the run.
MEASURED = Measurement(cell="autorank-rbla-s0", process_s=20, run_s=12, ranking_s=2, round_s=(3, 1))


def test_the_phases_come_out_of_the_measured_times() -> None:
    assert MEASURED.start_up_s == 8
    assert MEASURED.set_up_s == 6
    assert MEASURED.later_round_s == 1


def test_a_cell_pays_its_first_round_once_and_the_warm_up_only_if_it_trains_one() -> None:
    # 6 set-up + 3 first round + 9 later rounds of 1 s (+ 2 s warm-up)
    assert MEASURED.cell_seconds(10, warms_up=False) == 18
    assert MEASURED.cell_seconds(10, warms_up=True) == 20
    assert MEASURED.cell_seconds(1, warms_up=False) == 9


def test_the_lines_give_each_method_and_the_total_with_the_start_up_once() -> None:
    cells = [
        PlannedCell("autorank-rbla-s0", "autorank-rbla", warms_up=True),
        PlannedCell("autorank-product-s0", "autorank-product", warms_up=False),  # reuses it
        PlannedCell("autorank-rbla-s1", "autorank-rbla", warms_up=True),
        PlannedCell("uniform-rbla-s0", "uniform-rbla", warms_up=False),
    ]

    lines = estimate_lines(MEASURED, cells, rounds=10, max_parallel=2)

    assert lines[0].startswith("estimated time, from autorank-rbla-s0 measured for 2 round(s)")
    assert lines[1:4] == [
        "  autorank-rbla     2 run(s), ~20 s each",
        "  autorank-product  1 run(s), ~18 s each",
        "  uniform-rbla      1 run(s), ~18 s each",
    ]
    # 8 s start-up + 20 + 18 + 20 + 18
    assert lines[4] == (
        "total: ~1 min 24 s: the start-up once, then one run after another; "
        "up to 2 at a time may take less"
    )


def test_cells_of_one_method_that_differ_show_a_range() -> None:
    cells = [
        PlannedCell("autorank-rbla-s0", "autorank-rbla", warms_up=True),
        PlannedCell("autorank-rbla-s1", "autorank-rbla", warms_up=False),
    ]

    lines = estimate_lines(MEASURED, cells, rounds=10, max_parallel=1)

    assert lines[1] == "  autorank-rbla  2 run(s), ~18 s to 20 s each"
    assert lines[2] == "total: ~46 s: the start-up once, then one run after another"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.04, "0.04 s"),
        (0.996, "1.0 s"),
        (0.36, "0.36 s"),
        (9.96, "10 s"),
        (45.4, "45 s"),
        (200, "3 min 20 s"),
        (7500, "2 h 05 min"),
    ],
)
def test_durations_read_at_a_glance(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_a_measurement_without_a_round_is_refused() -> None:
    with pytest.raises(ValueError, match="no round was measured"):
        Measurement(cell="c", process_s=1, run_s=1, ranking_s=0, round_s=())
