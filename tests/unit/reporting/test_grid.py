"""Comparison grids: loading, expansion into cells, and the summary over hand-made histories."""

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from autorank.config import ConfigError, config_digest
from autorank.reporting.cells import (
    SkippedCell,
    expand_grid,
    mean_rank,
    with_budget,
    with_uniform_rank,
)
from autorank.reporting.grid import grid_digest, load_grid, parse_grid
from autorank.reporting.paired import mean_std
from autorank.reporting.summary import (
    CellResult,
    curve_metrics,
    markdown_table,
    mean_curves,
    paired_against,
    rounds_to_target,
    std_curves,
    summarise,
    summary_columns,
    summary_metrics,
    terminal_table,
)

ROOT = Path(__file__).resolve().parents[3]
GRIDS = sorted((ROOT / "configs" / "grids").glob("*.yaml"))


def _grid(**fields: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "assigners": ["uniform", "autorank"],
        "aggregators": ["rbla", "zeropad"],
        "seeds": [0, 1],
        "target_accuracy": 0.8,
    }
    return raw | fields


def _result(assigner: str, seed: int, accuracy: list[float], **kw: Any) -> CellResult:
    values: dict[str, Any] = {
        "personal_accuracy": 0.9,
        "trainable_params": 1000.0,
        "client_params": 500.0,
        "bytes_communicated": 2e6,
        "wall_seconds": 10.0,
    }
    return CellResult(assigner, "rbla", seed, tuple(accuracy), **(values | kw))


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_every_shipped_grid_loads_and_expands(path: Path) -> None:
    cells, skipped = expand_grid(load_grid(path))

    assert cells and not skipped
    assert len({c.run_name for c in cells}) == len(cells)


def test_shipped_grids_have_the_intended_size() -> None:
    small, _ = expand_grid(load_grid(ROOT / "configs/grids/digits_small.yaml"))
    fashion, _ = expand_grid(load_grid(ROOT / "configs/grids/fashion_mnist.yaml"))

    assert [c.run_name for c in small] == [
        "uniform-rbla-s0",
        "uniform-rbla_tiered1@all_labels+rbla_product-s0",
        "autorank-rbla-s0",
        "autorank-rbla_tiered1@all_labels+rbla_product-s0",
    ]
    assert len(fashion) == 5 * 4 * 3
    assert sum(c.waits_for_autorank for c in fashion) == 4 * 3
    assert fashion[0].config.lora.range_of("fc2") == (4, 100)


def test_expansion_sets_method_and_seed_and_shares_the_rest() -> None:
    grid = parse_grid(_grid(base={"partition": {"n_clients": 5}}))

    cells, skipped = expand_grid(grid)

    assert not skipped
    assert [c.run_name for c in cells][:4] == [
        "uniform-rbla-s0",
        "uniform-zeropad-s0",
        "autorank-rbla-s0",
        "autorank-zeropad-s0",
    ]
    assert len(cells) == 8
    for cell in cells:
        assert cell.config.ranking.assigner == cell.spec.assigner
        assert cell.config.aggregation.method == cell.aggregator
        assert cell.config.seed == cell.seed
        assert cell.config.tracking.run_name == cell.run_name
        assert cell.config.partition == grid.base.partition
    assert len({config_digest(c.config) for c in cells}) == 8


@pytest.mark.parametrize(
    ("fields", "same"),
    [
        ({"name": "renamed", "max_parallel": 2}, True),
        ({"base": {"tracking": {"uri": "sqlite:///elsewhere.db"}}}, True),
        ({"base": {"runtime": {"checkpoint_dir": "/elsewhere"}}}, True),
        ({"reference": "autorank-zeropad"}, True),  # the summary only: a resume may change it
        ({"seeds": [0, 1, 2]}, False),
        ({"seeds": [1, 0]}, False),
        ({"assigners": ["uniform", "manual"]}, False),
        ({"aggregators": ["rbla"]}, False),
        ({"target_accuracy": 0.9}, False),
        ({"base": {"partition": {"alpha": 0.1}}}, False),
    ],
)
def test_grid_digest_changes_only_with_what_decides_results(
    fields: dict[str, Any], same: bool
) -> None:
    before = grid_digest(parse_grid(_grid()))

    after = grid_digest(parse_grid(_grid(**fields)))

    assert (after == before) is same


def test_an_assigner_may_run_with_its_own_aggregators_only() -> None:
    # Prepare: AutoRank with two merges, uniform at rank 8 with FedAvg alone
    raw = _grid(
        assigners=[
            "autorank",
            {"assigner": "uniform", "uniform_rank": 8, "aggregators": ["fedavg"]},
        ],
        aggregators=["rbla", "fedex"],
        seeds=[0, 1],
    )

    # Execute
    grid = parse_grid(raw)
    cells, skipped = expand_grid(grid)

    # Assert
    assert not skipped
    assert grid.methods == ["autorank-rbla", "autorank-fedex", "uniform-r8-fedavg"]
    assert [c.run_name for c in cells][:3] == [
        "autorank-rbla-s0",
        "autorank-fedex-s0",
        "uniform-r8-fedavg-s0",
    ]
    assert len(cells) == 6
    assert grid_digest(grid) != grid_digest(parse_grid(raw | {"aggregators": ["rbla"]}))
    with pytest.raises(ConfigError, match="max_cells: the grid expands to 6 runs"):
        parse_grid(raw | {"max_cells": 5})


def test_invalid_combinations_are_skipped_with_a_note(caplog: pytest.LogCaptureFixture) -> None:
    grid = parse_grid(_grid(aggregators=["fedavg", "rbla"], seeds=[0]))

    with caplog.at_level(logging.WARNING, logger="autorank.reporting.cells"):
        cells, skipped = expand_grid(grid)

    names = [c.run_name for c in cells]
    assert names == ["uniform-fedavg-s0", "uniform-rbla-s0", "autorank-rbla-s0"]
    assert [s.run_name for s in skipped] == ["autorank-fedavg-s0"]
    assert "fedavg" in skipped[0].reason
    assert "skipping autorank-fedavg-s0" in caplog.text


def test_uniform_rank_variants_and_mean_autorank_placeholder() -> None:
    grid = parse_grid(
        _grid(
            assigners=[
                "uniform",
                {"assigner": "uniform", "uniform_rank": 4},
                {"assigner": "uniform", "uniform_rank": "mean_autorank"},
                {"assigner": "manual", "label": "by-labels"},
            ],
            aggregators=["rbla"],
            seeds=[3],
        )
    )

    cells, _ = expand_grid(grid)
    mean_cell = cells[2]
    resolved = with_uniform_rank(mean_cell, 7)

    assert [c.run_name for c in cells] == [
        "uniform-rbla-s3",
        "uniform-r4-rbla-s3",
        "uniform-mean_autorank-rbla-s3",
        "by-labels-rbla-s3",
    ]
    assert cells[1].config.ranking.uniform_rank == 4
    assert mean_cell.waits_for_autorank and mean_cell.config.ranking.uniform_rank is None
    assert resolved.config.ranking.uniform_rank == 7
    assert resolved.run_name == mean_cell.run_name
    assert config_digest(resolved.config) != config_digest(mean_cell.config)


def test_budget_autorank_waits_for_autorank_then_takes_its_parameters_as_the_budget() -> None:
    # Prepare
    grid = parse_grid(
        _grid(
            assigners=["autorank", {"assigner": "uniform", "uniform_rank": "budget_autorank"}],
            aggregators=["rbla"],
            seeds=[2],
        )
    )
    cells, _ = expand_grid(grid)

    # Execute
    resolved = with_budget(cells[1], 12_345)

    # Assert
    assert [c.run_name for c in cells] == ["autorank-rbla-s2", "uniform-budget_autorank-rbla-s2"]
    assert [c.waits_for_autorank for c in cells] == [False, True]
    assert cells[1].config.ranking.budget_params is None
    assert resolved.config.ranking.budget_params == 12_345
    assert resolved.config.ranking.uniform_rank is None  # every layer's r_max, scaled to fit
    assert resolved.run_name == cells[1].run_name


def test_autorank_with_and_without_re_ranking_are_two_methods() -> None:
    base = {"training": {"local_epochs": 2}, "ranking": {"rerank_every": 3}}
    grid = parse_grid(
        _grid(
            base=base,
            assigners=["autorank", {"assigner": "autorank", "rerank_every": 5}, "uniform"],
            aggregators=["rbla"],
            seeds=[0],
        )
    )

    cells, skipped = expand_grid(grid)

    assert [(c.run_name, c.config.ranking.rerank_every) for c in cells] == [
        ("autorank-rbla-s0", 3),  # the base's setting
        ("autorank-rerank5-rbla-s0", 5),
        ("uniform-rbla-s0", 0),  # a baseline keeps its ranks instead of being skipped
    ]
    assert skipped == []


def test_autorank_from_the_warm_up_and_from_first_participation_are_two_methods() -> None:
    grid = parse_grid(
        _grid(
            assigners=[
                "autorank",
                {"assigner": "autorank", "difficulty_from": "first_participation"},
            ],
            aggregators=["rbla"],
            seeds=[0],
        )
    )

    cells, _ = expand_grid(grid)

    assert [(c.run_name, c.config.difficulty_mode()) for c in cells] == [
        ("autorank-rbla-s0", "warmup"),
        ("autorank-first-rbla-s0", "first_participation"),
    ]


def test_an_early_merge_may_wait_for_the_labels_in_a_grid() -> None:
    # Prepare: the base waits for the labels; a name of its own says when it runs
    early = {"early_method": "rbla_tiered", "early_rounds": 1, "early_when": "all_labels"}
    grid = parse_grid(
        _grid(
            base={"aggregation": early},
            assigners=["autorank"],
            aggregators=[
                "rbla_product",
                "rbla_tiered1+rbla_product",
                "rbla_tiered5@all_labels+rbla",
            ],
            seeds=[0],
        )
    )

    # Execute
    cells, _ = expand_grid(grid)

    # Assert: every cell runs what its name says
    assert [(c.run_name, c.config.aggregation.early_when) for c in cells] == [
        ("autorank-rbla_tiered1@all_labels+rbla_product-s0", "all_labels"),
        ("autorank-rbla_tiered1+rbla_product-s0", "always"),
        ("autorank-rbla_tiered5@all_labels+rbla-s0", "all_labels"),
    ]
    assert [c.config.aggregation.label for c in cells] == [c.aggregator for c in cells]


def test_an_early_merge_is_an_aggregator_of_the_grid_or_of_its_base() -> None:
    # Prepare: one aggregator with its own early merge; the base's applies to plain names
    base = {"aggregation": {"early_method": "rbla_svd", "early_rounds": 3}}
    grid = parse_grid(
        _grid(
            base=base,
            assigners=["autorank"],
            aggregators=["rbla_product", "rbla_tiered5+rbla_product"],
            seeds=[0],
        )
    )

    # Execute
    cells, _ = expand_grid(grid)

    # Assert
    got = [
        (c.run_name, c.config.aggregation.early_method, c.config.aggregation.early_rounds)
        for c in cells
    ]
    assert got == [
        ("autorank-rbla_svd3+rbla_product-s0", "rbla_svd", 3),
        ("autorank-rbla_tiered5+rbla_product-s0", "rbla_tiered", 5),
    ]
    assert [c.config.aggregation.label for c in cells] == [c.aggregator for c in cells]
    assert grid.methods == [c.method for c in cells]


def test_mean_rank_rounds_half_up_and_clamps() -> None:
    assert mean_rank([2, 5, 8, 8], 2, 8) == 6  # 5.75
    assert mean_rank([2, 3], 2, 8) == 3  # 2.5 goes up
    assert mean_rank([1, 1], 2, 8) == 2
    with pytest.raises(ValueError, match="empty"):
        mean_rank([], 2, 8)


def test_overrides_apply_to_the_grid_mapping(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text("assigners: [autorank]\naggregators: [rbla]\ntarget_accuracy: 0.5\n")

    grid = load_grid(path, ["base.training.rounds=3", "seeds=[0,1]", "max_parallel=2"])

    assert grid.base.training.rounds == 3
    assert grid.seeds == (0, 1)
    assert grid.max_parallel == 2


def _with_mean(**fields: Any) -> dict[str, Any]:
    mean = {"assigner": "uniform", "uniform_rank": "mean_autorank", "label": "same-budget"}
    return _grid(assigners=["autorank", mean], **fields)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_grid(), None),
        (_with_mean(), "same-budget-rbla"),
        (_with_mean(aggregators=["zeropad", "rbla"]), "same-budget-zeropad"),
        (_with_mean(reference="autorank-zeropad"), "autorank-zeropad"),
        (_grid(reference="uniform-zeropad"), "uniform-zeropad"),
    ],
)
def test_reference_defaults_to_uniform_at_the_mean_rank(
    raw: dict[str, Any], expected: str | None
) -> None:
    grid = parse_grid(raw)

    assert grid.reference_method == expected
    assert expected is None or expected in grid.methods


def test_every_cell_knows_its_method() -> None:
    cells, _ = expand_grid(parse_grid(_with_mean(seeds=[0])))

    assert [c.method for c in cells] == parse_grid(_with_mean()).methods


BAD = [
    ({"assigners": ["wizard"]}, "wizard"),
    ({"assigners": [{"assigner": "wizard"}]}, "wizard"),
    ({"aggregators": ["rbla", "nope"]}, "nope"),
    ({"aggregators": ["rbla_tiered5+nope"]}, "unknown aggregator 'rbla_tiered5+nope'"),
    ({"aggregators": ["nope5+rbla"]}, "<early><rounds>[@all_labels]+<aggregator>"),
    (
        {"aggregators": ["rbla_tiered5@always+rbla"]},
        "an early merge runs always by default; write 'rbla_tiered5+rbla'",
    ),
    (
        {"aggregators": ["rbla_tiered5@sometimes+rbla"]},
        "aggregation.early_when: Input should be 'always' or 'all_labels'",
    ),
    ({"aggregators": ["rbla_tiered2+flora"]}, "from flora"),
    ({"aggregators": ["rbla_tiered05+rbla"]}, "unknown aggregator 'rbla_tiered05+rbla'"),
    (
        {
            "base": {"aggregation": {"early_method": "rbla_tiered", "early_rounds": 5}},
            "aggregators": ["rbla_product", "rbla_tiered5+rbla_product"],
        },
        "['rbla_tiered5+rbla_product'] appear twice once base.aggregation's early merge applies",
    ),
    ({"assigners": [{"assigner": "autorank", "uniform_rank": 4}]}, "uniform_rank"),
    ({"assigners": [{"assigner": "uniform", "uniform_rank": 99}]}, "outside"),
    ({"assigners": [{"assigner": "uniform", "uniform_rank": "mean"}]}, "uniform_rank"),
    (
        {"assigners": [{"assigner": "autorank", "uniform_rank": "budget_autorank"}]},
        "uniform_rank is for the uniform assigner",
    ),
    ({"assigners": ["uniform", "uniform"]}, "appear twice"),
    ({"aggregators": ["rbla", "rbla"]}, "duplicates"),
    ({"assigners": []}, "assigners"),
    ({"seeds": [0, 0]}, "seeds"),
    ({"seeds": [-1]}, "seeds"),
    ({"target_accuracy": 1.5}, "target_accuracy"),
    ({"max_parallel": 0}, "max_parallel"),
    (
        {"assigners": [{"assigner": "uniform", "rerank_every": 2}]},
        "rerank_every is for the autorank assigner, not 'uniform'",
    ),
    (
        {"assigners": [{"assigner": "size", "difficulty_from": "warmup"}]},
        "difficulty_from is for the autorank assigner, not 'size'",
    ),
    (
        {"reference": "uniform"},
        "reference: not a method of this grid; expected one of uniform-rbla, uniform-zeropad, "
        "autorank-rbla, autorank-zeropad (got 'uniform')",
    ),
    ({"base": {"partition": {"n_clients": 0}}}, "base.partition.n_clients"),
    ({"base": {"trainig": {}}}, "base.trainig: unknown setting"),
    ({"colour": "red"}, "colour: unknown setting"),
]


@pytest.mark.parametrize(("fields", "expected"), BAD, ids=[e for _, e in BAD])
def test_bad_grid_is_a_one_line_config_error(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_grid(_grid(**fields))

    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_target_accuracy_is_named() -> None:
    raw = _grid()
    del raw["target_accuracy"]

    with pytest.raises(ConfigError, match="target_accuracy"):
        parse_grid(raw)


def test_rounds_to_target_and_mean_std() -> None:
    assert rounds_to_target([0.5, 0.8, 0.9], 0.8) == 2
    assert rounds_to_target([0.5, 0.6], 0.8) is None
    assert mean_std([0.7]) == (0.7, 0.0)
    mean, std = mean_std([0.7, 0.9])
    assert math.isclose(mean, 0.8) and math.isclose(std, math.sqrt(0.02))


def test_summary_over_seeds_by_hand() -> None:
    results = [
        _result("autorank", 0, [0.5, 0.7, 0.6], personal_accuracy=0.8, wall_seconds=4.0),
        _result("autorank", 1, [0.6, 0.8, 0.9], personal_accuracy=0.9, wall_seconds=6.0),
        _result("uniform", 0, [0.4, 0.5], personal_accuracy=float("nan"), client_params=None),
    ]

    auto, uni = summarise(results, target=0.75)

    assert (auto.assigner, auto.aggregator, auto.seeds) == ("autorank", "rbla", 2)
    assert math.isclose(auto.best[0], 0.8) and math.isclose(auto.best[1], math.sqrt(0.02))
    assert math.isclose(auto.final[0], 0.75) and math.isclose(auto.final[1], math.sqrt(0.045))
    assert (auto.rounds_to_target, auto.reached) == (2.0, 1)
    assert math.isclose(auto.personal_accuracy or 0.0, 0.85)
    assert auto.wall_seconds == 5.0 and auto.bytes_communicated == 2e6
    assert (uni.rounds_to_target, uni.reached) == (None, 0)
    assert uni.personal_accuracy is None and uni.client_params is None


def test_mean_curves_average_seeds_up_to_the_shortest_run() -> None:
    results = [_result("autorank", 0, [0.2, 0.4, 0.6]), _result("autorank", 1, [0.4, 0.6])]

    curves = mean_curves(results)

    assert list(curves) == ["autorank-rbla"]
    assert [round(v, 6) for v in curves["autorank-rbla"]] == [0.3, 0.5]
    assert [round(v, 6) for v in std_curves(results)["autorank-rbla"]] == [0.141421, 0.141421]


def test_markdown_table_formatting() -> None:
    results = [
        _result("autorank", 0, [0.5, 0.7, 0.6]),
        _result("autorank", 1, [0.6, 0.8, 0.9]),
        _result("uniform", 0, [0.4, 0.5], personal_accuracy=None, client_params=None),
    ]
    skipped = [SkippedCell("autorank-fedavg-s0", "fedavg needs equal ranks")]

    table = markdown_table(summarise(results, 0.75), 0.75, skipped)

    lines = table.splitlines()
    assert lines[0].startswith("| assigner | aggregator | best accuracy | final accuracy |")
    assert "| rounds to 0.75 |" in lines[0]
    assert lines[1] == "|" + "---|" * 11
    assert lines[2] == (
        "| autorank | rbla | 0.8000 ± 0.1414 | 0.7500 ± 0.2121 | 2.0 (1/2) | 0.9000 | 2 "
        "| 1,000 | 500 | 2.00 | 10.0 |"
    )
    assert lines[3].split(" | ")[4:9] == ["-", "-", "1", "1,000", "-"]
    assert lines[-1] == "- skipped `autorank-fedavg-s0`: fedavg needs equal ranks"
    assert all(line.count("|") == 12 for line in lines[:4])


def test_summary_columns_are_one_value_per_method() -> None:
    summaries = summarise([_result("a", 0, [0.5]), _result("b", 0, [0.6])], 0.55)

    columns = summary_columns(summaries)

    assert {len(v) for v in columns.values()} == {2}
    assert columns["assigner"] == ["a", "b"]
    assert columns["rounds_to_target"] == [None, 1.0]
    assert columns["best_accuracy_mean"] == [0.5, 0.6]
    assert list(columns)[:6] == [
        "assigner",
        "aggregator",
        "best_accuracy_mean",
        "best_accuracy_std",
        "final_accuracy_mean",
        "final_accuracy_std",
    ]


def test_summary_metrics_are_one_key_per_statistic_and_method() -> None:
    results = [
        _result("autorank", 0, [0.5, 0.7, 0.6]),
        _result("autorank", 1, [0.6, 0.8, 0.9]),
        _result("my label", 0, [0.4, 0.5], personal_accuracy=None),
    ]

    metrics = summary_metrics(summarise(results, 0.75))

    assert metrics["best_accuracy/autorank-rbla"] == pytest.approx(0.8)
    assert metrics["final_accuracy/autorank-rbla"] == pytest.approx(0.75)
    assert metrics["final_accuracy_std/autorank-rbla"] == pytest.approx(0.2121320)
    assert metrics["rounds_to_target/autorank-rbla"] == 2.0
    assert metrics["communicated_mb/autorank-rbla"] == pytest.approx(2.0)
    assert metrics["final_accuracy/my_label-rbla"] == pytest.approx(0.5)
    assert "rounds_to_target/my_label-rbla" not in metrics  # never reached 0.75
    assert "personal_accuracy/my_label-rbla" not in metrics


def test_curve_metrics_are_each_method_s_mean_accuracy_by_round() -> None:
    results = [
        _result("autorank", 0, [0.5, 0.7, 0.6]),
        _result("autorank", 1, [0.6, 0.8, 0.9]),
        _result("my label", 0, [0.4, 0.5]),
    ]

    by_round = curve_metrics(mean_curves(results))

    assert sorted(by_round) == [1, 2, 3]
    assert by_round[1] == pytest.approx(
        {"accuracy_per_round/autorank-rbla": 0.55, "accuracy_per_round/my_label-rbla": 0.4}
    )
    assert by_round[3] == pytest.approx({"accuracy_per_round/autorank-rbla": 0.75})


def test_terminal_table_is_aligned_and_narrow() -> None:
    results = [
        _result("autorank", 0, [0.5, 0.7, 0.6]),
        _result("uniform-mean_autorank", 0, [0.4, 0.5], client_params=None),
    ]

    lines = terminal_table(summarise(results, 0.75), 0.75).splitlines()

    assert lines[0].split() == ["method", "best", "final", "reach", "0.75", "params", "MB", "seeds"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == [
        "autorank-rbla",
        "0.7000",
        "±",
        "0.0000",
        "0.6000",
        "±",
        "0.0000",
        "-",
        "500",
        "2.00",
        "1",
    ]
    assert lines[3].split()[0] == "uniform-mean_autorank-rbla" and lines[3].split()[-4] == "-"
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule as wide
    assert max(map(len, lines)) <= 100


def test_a_cell_without_rounds_is_refused() -> None:
    with pytest.raises(ValueError, match="no rounds"):
        summarise([_result("a", 0, [])], 0.5)


def _three_seeds() -> list[CellResult]:
    """uniform is the reference; autorank's differences per seed are 0.01, 0.03, 0.02 in best
    accuracy and -0.05, 0.01, 0.02 in final accuracy; "solo" shares no seed with uniform."""
    return [
        _result("uniform", 0, [0.7, 0.80, 0.75]),
        _result("uniform", 1, [0.6, 0.70, 0.70]),
        _result("uniform", 2, [0.8, 0.90]),
        _result("autorank", 0, [0.81, 0.70]),
        _result("autorank", 1, [0.73, 0.71]),
        _result("autorank", 2, [0.92]),
        _result("solo", 5, [0.5]),
    ]


def test_methods_are_paired_with_the_reference_seed_by_seed() -> None:
    results = _three_seeds()[:-1]
    results[5] = _result("autorank", 3, [0.92])  # seed 2 missing: two seeds pair up

    paired = paired_against(_three_seeds(), "uniform-rbla")
    partial = paired_against(results, "uniform-rbla").rows[0]

    assert paired.reference == "uniform-rbla" and [r.method for r in paired.rows] == [
        "autorank-rbla"
    ]
    (row,) = paired.rows
    assert (row.best.mean, row.best.std) == (pytest.approx(0.02), pytest.approx(0.01))
    assert row.best.p == pytest.approx(1 - math.sqrt(6 / 7))  # t = 2 sqrt(3), df = 2
    assert (row.best.wins, row.seeds) == (3, 3)
    assert row.final.mean == pytest.approx((-0.05 + 0.01 + 0.02) / 3) and row.final.wins == 2
    assert (partial.seeds, partial.best.mean) == (2, pytest.approx(0.02))
    assert paired.of("uniform-rbla") is None and paired.of("solo-rbla") is None
    assert paired_against(_three_seeds(), "absent-rbla").rows == ()


def test_paired_table_follows_the_summary_in_markdown() -> None:
    results = _three_seeds()
    one_seed = [r for r in results if r.seed == 0]
    skipped = [SkippedCell("autorank-fedavg-s0", "fedavg needs equal ranks")]

    lines = markdown_table(
        summarise(results, 0.75), 0.75, skipped, paired_against(results, "uniform-rbla")
    ).splitlines()
    single = markdown_table(
        summarise(one_seed, 0.75), 0.75, (), paired_against(one_seed, "uniform-rbla")
    )
    none = markdown_table(summarise(one_seed, 0.75), 0.75, (), paired_against([], "uniform-rbla"))

    assert lines[6].startswith("Paired against `uniform-rbla` (best accuracy, final accuracy:")
    assert lines[8:10] == [
        "| method | Δ best | p | wins | Δ final | p | wins |",
        "|" + "---|" * 7,
    ]
    assert lines[10] == (
        "| autorank-rbla | +0.0200 ± 0.0100 | 0.074 | 3/3 | -0.0067 ± 0.0379 | 0.789 | 2/3 |"
    )
    assert lines[11:] == ["", "- skipped `autorank-fedavg-s0`: fedavg needs equal ranks"]
    assert "| autorank-rbla | +0.0100 ± 0.0000 | - | 1/1 | -0.0500 ± 0.0000 | - | 0/1 |" in single
    assert "No paired statistics: the reference `uniform-rbla` has no seed to pair with." in none


def test_paired_columns_and_metrics() -> None:
    results = _three_seeds()
    summaries = summarise(results, 0.75)
    paired = paired_against(results, "uniform-rbla")

    columns = summary_columns(summaries, paired)
    metrics = summary_metrics(summaries, paired)

    assert list(columns)[-9:] == [
        "best_diff_mean",
        "best_diff_std",
        "best_diff_p",
        "best_diff_wins",
        "final_diff_mean",
        "final_diff_std",
        "final_diff_p",
        "final_diff_wins",
        "paired_seeds",
    ]
    assert columns["best_diff_mean"] == [None, pytest.approx(0.02), None]  # reference, -, solo
    assert columns["best_diff_p"][1] == pytest.approx(0.0741799)
    assert columns["paired_seeds"] == [None, 3, None]
    assert columns["final_diff_wins"] == [None, 2, None]
    assert metrics["best_accuracy_diff/autorank-rbla"] == pytest.approx(0.02)
    assert metrics["final_accuracy_diff/autorank-rbla"] == pytest.approx(-0.02 / 3)
    assert [k for k in metrics if "diff/" in k] == [
        "best_accuracy_diff/autorank-rbla",
        "final_accuracy_diff/autorank-rbla",
    ]
    assert not any("diff/" in k for k in summary_metrics(summaries))


def test_terminal_table_puts_long_names_on_their_own_lines() -> None:
    # Prepare: the longest name a shipped grid makes with an early merge
    longest = "uniform-mean_autorank"
    merge = "rbla_tiered5@all_labels+rbla_product"
    results = [replace(_result(longest, 0, [0.5, 0.7]), aggregator=merge)]
    short = [replace(r, aggregator="rbla") for r in results]

    # Execute
    lines = terminal_table(summarise(results, 0.75), 0.75).splitlines()
    one_line = terminal_table(summarise(short, 0.75), 0.75).splitlines()

    # Assert: name, then the figures a short name has on its line, under the header's columns
    assert lines[0] == "method"
    assert lines[1].split() == one_line[0].split()[1:]
    assert set(lines[2]) == {"-", " "}
    assert lines[3] == f"{longest}-{merge}"
    assert lines[4].split() == one_line[2].split()[1:]
    assert lines[4].split()[:3] == ["0.7000", "±", "0.0000"]
    assert lines[4].index("0.7000") == lines[2].index("-")  # figures start under the rule
    assert max(map(len, lines)) <= 100


def test_terminal_table_shows_the_difference_to_the_reference() -> None:
    longest = "uniform-mean_autorank"  # with flexlora: the longest name of the shipped grids
    wide = {"client_params": 197_123.0, "bytes_communicated": 1.3e9}
    results = [
        *_three_seeds(),
        *(
            replace(_result(longest, s, [0.5, 0.81], **wide), aggregator="flexlora")
            for s in (0, 1, 2)
        ),
    ]

    lines = terminal_table(
        summarise(results, 0.8), 0.8, paired_against(results, "uniform-rbla")
    ).splitlines()

    assert lines[0].split()[-4:] == ["seeds", "Δbest", "vs", "ref"]
    assert lines[2].split() == [
        "uniform-rbla",
        "0.8000",
        "0.7833",
        "1.5",
        "(2/3)",
        "500",
        "2.00",
        "3",
        "ref",
    ]
    assert lines[3].split()[1:3] == ["0.8200", "0.7767"] and lines[3].split()[-1] == "+0.0200"
    assert lines[4].split()[-1] == "-"  # solo shares no seed
    assert lines[5].split()[-1] == "+0.0100"
    legend = " ".join(lines[7:])
    assert "mean over seeds;" in legend
    assert "Δbest vs ref: mean per-seed difference in best accuracy to uniform-rbla" in legend
    assert max(map(len, lines)) <= 100
