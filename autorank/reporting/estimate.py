"""How long a grid will take, from one of its cells measured on this machine.

``autorank compare --dry-run`` runs one cell for a round or two and reads back what each phase
cost; a cell of the grid then costs

    set-up + warm-up (only where the cell trains one) + round 1 + (R - 1) x a later round,

and the comparison adds its own start-up (Prefect's API server, imports) once. The figures are
the measured cell's: a cell at other ranks trains at another speed, a cell that reuses a
warm-up or waits for AutoRank's decision skips the warm-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    """One cell run briefly on this machine.

    Attributes:
        cell: the measured cell's run name.
        process_s: the measuring command, from its start to its exit.
        run_s: its MLflow run, from opening to closing.
        ranking_s: deciding the ranks (profiles, the warm-up, CRITIC and TOPSIS).
        round_s: each measured round, in order (at least one).
    """

    cell: str
    process_s: float
    run_s: float
    ranking_s: float
    round_s: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.round_s:
            raise ValueError(f"measurement of {self.cell}: no round was measured")

    @property
    def start_up_s(self) -> float:
        """The command's own start, before and after its run (Prefect's API server, imports)."""
        return max(0.0, self.process_s - self.run_s)

    @property
    def set_up_s(self) -> float:
        """A run's part outside the ranks and rounds: data, base model, records, final model."""
        return max(0.0, self.run_s - self.ranking_s - sum(self.round_s))

    @property
    def later_round_s(self) -> float:
        """A round after the first (the first also pays one-off costs of the engines)."""
        return self.round_s[-1]

    def cell_seconds(self, rounds: int, *, warms_up: bool) -> float:
        """A cell of ``rounds`` rounds, training a warm-up of its own or not."""
        warm = self.ranking_s if warms_up else 0.0
        return self.set_up_s + warm + self.round_s[0] + (rounds - 1) * self.later_round_s


@dataclass(frozen=True)
class PlannedCell:
    """A cell of the grid as the estimate sees it."""

    run_name: str
    method: str
    warms_up: bool


def duration(seconds: float) -> str:
    """``0.14 s``, ``4.2 s``, ``45 s``, ``3 min 20 s``, ``2 h 05 min``: two figures or so, what a
    person reads at a glance (a tenth of a second hides a round of 0.14 s times 30)."""
    if seconds < 0.995:
        return f"{seconds:.2f} s"
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def estimate_lines(
    measured: Measurement, cells: Sequence[PlannedCell], rounds: int, max_parallel: int
) -> list[str]:
    """The estimate under the grid's plan: how it was measured, each method's cells, the total
    (cells one after another; ``max_parallel`` above 1 may take less where the cores allow)."""
    m = measured
    lines = [
        f"estimated time, from {m.cell} measured for {len(m.round_s)} round(s) on this machine "
        f"(start-up {duration(m.start_up_s)}, a run's set-up {duration(m.set_up_s)}, "
        f"warm-up and ranks {duration(m.ranking_s)}, a round {duration(m.later_round_s)}):"
    ]
    seconds = {c.run_name: m.cell_seconds(rounds, warms_up=c.warms_up) for c in cells}
    methods = list(dict.fromkeys(c.method for c in cells))
    width = max(len(name) for name in methods)
    for method in methods:
        own = [seconds[c.run_name] for c in cells if c.method == method]
        low, high = duration(min(own)), duration(max(own))
        each = low if low == high else f"{low} to {high}"
        lines.append(f"  {method.ljust(width)}  {len(own)} run(s), ~{each} each")
    total = m.start_up_s + sum(seconds.values())
    parallel = f"; up to {max_parallel} at a time may take less" if max_parallel > 1 else ""
    lines.append(
        f"total: ~{duration(total)}: the start-up once, then one run after another{parallel}"
    )
    return lines
