"""A grid's cells: one ``ExperimentConfig`` per assigner x aggregator x seed (``expand_grid``),
which of them can run, and the uniform-rank cells that wait for AutoRank's decision."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from autorank.config import (
    ConfigError,
    ExperimentConfig,
    aggregation_fields,
    parse_config,
)
from autorank.ranking.mapping import round_half_up
from autorank.reporting.grid import FROM_AUTORANK, AssignerSpec, GridConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    Attributes:
        spec: the assigner and its settings.
        aggregator: the aggregation method, as ``AggregationConfig.label``.
        seed: the experiment seed.
        config: the complete experiment; for a ``mean_autorank`` cell its ``uniform_rank`` is
            a placeholder until ``with_uniform_rank`` fills it in, for a ``budget_autorank``
            cell its ``budget_params`` until ``with_budget`` does.
    """

    spec: AssignerSpec
    aggregator: str
    seed: int
    config: ExperimentConfig

    @property
    def run_name(self) -> str:
        """The child run's name, unique in the grid (``autorank-rbla-s0``)."""
        return cell_name(self.spec, self.aggregator, self.seed)

    @property
    def method(self) -> str:
        """``<assigner label>-<aggregator>``, the method's name in the summary."""
        return f"{self.spec.method}-{self.aggregator}"

    @property
    def waits_for_autorank(self) -> bool:
        """Whether the uniform ranks wait on AutoRank's decision for this seed."""
        return self.spec.uniform_rank in FROM_AUTORANK


@dataclass(frozen=True)
class SkippedCell:
    """A combination the grid names but that cannot run (e.g. fedavg with unequal ranks)."""

    run_name: str
    reason: str


def cell_name(spec: AssignerSpec, aggregator: str, seed: int) -> str:
    """``<assigner>-<aggregator>-s<seed>``: a cell's name in MLflow and in Prefect."""
    return f"{spec.method}-{aggregator}-s{seed}"


def _cell_config(
    base: ExperimentConfig,
    spec: AssignerSpec,
    aggregator: str,
    seed: int,
    rank: int | None,
    budget: int | None = None,
) -> ExperimentConfig:
    raw = base.model_dump(mode="json")
    raw["seed"] = seed
    raw["ranking"] |= {"assigner": spec.assigner, "uniform_rank": rank}
    if budget is not None:
        raw["ranking"]["budget_params"] = budget
    if spec.rerank_every is not None:
        raw["ranking"]["rerank_every"] = spec.rerank_every
    elif spec.assigner != "autorank":  # re-ranking is AutoRank's: the baselines keep their ranks
        raw["ranking"]["rerank_every"] = 0
    if spec.difficulty_from is not None:
        raw["ranking"]["difficulty_from"] = spec.difficulty_from
    raw["aggregation"] |= aggregation_fields(aggregator)
    raw["tracking"] |= {"run_name": cell_name(spec, aggregator, seed)}
    return parse_config(raw)


def expand_grid(grid: GridConfig) -> tuple[list[Cell], list[SkippedCell]]:
    """One cell per assigner x aggregator x seed; invalid combinations are skipped, with a note.

    Returns:
        The runnable cells (seed-major, then assigner, then aggregator) and the skipped ones.
    """
    cells: list[Cell] = []
    skipped: list[SkippedCell] = []
    for seed in grid.seeds:
        for spec in grid.assigners:
            rank = spec.uniform_rank if isinstance(spec.uniform_rank, int) else None
            for aggregator in grid.merges_of(spec):
                name = cell_name(spec, aggregator, seed)
                try:
                    config = _cell_config(grid.base, spec, aggregator, seed, rank)
                except ConfigError as err:
                    logger.warning("skipping %s: %s", name, err)
                    skipped.append(SkippedCell(name, str(err)))
                    continue
                cells.append(Cell(spec, aggregator, seed, config))
    return cells, skipped


def runnable_cells(grid: GridConfig) -> tuple[list[Cell], list[SkippedCell]]:
    """The grid's cells and skipped combinations, refused as ``check_runnable`` says."""
    cells, skipped = expand_grid(grid)
    check_runnable(grid, cells)
    return cells, skipped


def check_runnable(grid: GridConfig, cells: Sequence[Cell]) -> None:
    """Refuse a grid where nothing runs or where the reference method never runs (every
    combination of it skipped); ``cells``: the grid's, from ``expand_grid``."""
    if not cells:
        raise ConfigError("the grid has no runnable cell (every combination was skipped)")
    reference = grid.reference_method
    if reference is not None and all(c.method != reference for c in cells):
        methods = ", ".join(dict.fromkeys(c.method for c in cells))
        raise ConfigError(
            f"reference: {reference!r} never runs (every cell of it is skipped); "
            f"expected one of {methods}"
        )


def with_uniform_rank(cell: Cell, rank: int) -> Cell:
    """The cell with its uniform rank fixed (for ``mean_autorank`` once AutoRank has run)."""
    config = _cell_config(cell.config, cell.spec, cell.aggregator, cell.seed, rank)
    return Cell(cell.spec, cell.aggregator, cell.seed, config)


def with_budget(cell: Cell, budget: int) -> Cell:
    """The cell with its parameter budget fixed (for ``budget_autorank`` once AutoRank has run)."""
    config = _cell_config(cell.config, cell.spec, cell.aggregator, cell.seed, None, budget)
    return Cell(cell.spec, cell.aggregator, cell.seed, config)


def mean_rank(ranks: Sequence[int], r_min: int, r_max: int) -> int:
    """The uniform rank with AutoRank's budget: ``clamp(round_half_up(mean(ranks)))``."""
    if not ranks:
        raise ValueError("ranks is empty; expected one rank per client")
    return max(r_min, min(r_max, round_half_up(sum(ranks) / len(ranks))))
