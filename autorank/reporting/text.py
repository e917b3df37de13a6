"""The terminal's tables: a rank decision (``autorank ranks``) and a grid's plan
(``autorank compare --dry-run``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autorank.reporting.cells import Cell, SkippedCell
from autorank.reporting.grid import GridConfig


def _num(value: float | None, width: int) -> str:
    return f"{value:{width}.4f}" if value is not None else f"{'-':>{width}}"


def format_rank_table(decision: dict[str, Any]) -> str:
    """A per-client table of the rank decision (a capped client's cap after its layer ranks),
    with the CRITIC weights and the parameter budget underneath."""
    head = f"{'client':>6} {'samples':>8} {'labels':>6} {'entropy':>8} {'gini':>6} {'close':>6} "
    head += f"{'rank':>5}  layer ranks"
    lines = [f"assigner: {decision['assigner']}", head]
    for row in decision["clients"]:
        close = row.get("closeness")
        close_txt = _num(close, 6)
        layers = " ".join(f"{k}={v}" for k, v in row["layer_ranks"].items())
        layers += "" if row.get("cap") is None else f"  (cap {row['cap']})"
        lines.append(
            f"{row['client']:>6} {row['samples']:>8} {row['labels_held']:>6} "
            f"{_num(row.get('entropy'), 8)} {_num(row.get('gini_simpson'), 6)} {close_txt} "
            f"{row['rank']:>5}  {layers}"
        )
    weights = decision.get("weights") or {}
    if weights:
        lines.append("CRITIC weights: " + ", ".join(f"{k}={v:.4f}" for k, v in weights.items()))
    if decision.get("budget_params") is not None:
        lines.append(
            f"budget: {decision['budget_params']:,} LoRA parameters over all clients, "
            f"{decision['total_params']:,} used (ranks scaled by {decision['scale']:.4g})"
        )
    return "\n".join(lines)


def grid_plan(grid: GridConfig, cells: Sequence[Cell], skipped: Sequence[SkippedCell]) -> str:
    """The runs a grid expands to (``cells``), one line each, then the skipped combinations
    and a total."""
    rounds = grid.base.training.rounds
    rows = [(c.run_name, c.spec.method, c.aggregator, str(c.seed), str(rounds)) for c in cells]
    head = ("run", "method", "aggregator", "seed", "rounds")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(
            v.rjust(w) if i >= 3 else v.ljust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [head, *rows]
    ]
    lines += [f"skipped {s.run_name}: {s.reason}" for s in skipped]
    if grid.reference_method is not None:
        lines.append(f"paired against: {grid.reference_method}")
    budget = grid.base.ranking.budget_params
    if budget is not None:
        lines.append(
            f"budget: {budget:,} LoRA parameters over all clients in every run "
            "(`autorank ranks` shows what one run's ranks use)"
        )
    waiting = sum(c.waits_for_autorank for c in cells)
    lines.append(
        f"{len(cells)} runs ({waiting} wait for AutoRank's decision), {len(skipped)} skipped, "
        f"up to {grid.max_parallel} at a time; tracked in {grid.base.tracking.uri}"
    )
    return "\n".join(lines)
