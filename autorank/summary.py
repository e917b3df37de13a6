"""A comparison's results: one row per method (assigner x aggregator), mean and spread over seeds.

``summarise`` reduces the cells' histories; ``markdown_table`` and ``summary_columns`` present them.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autorank.comparison import SkippedCell


@dataclass(frozen=True)
class CellResult:
    """What one finished cell measured, as read back from its run.

    Attributes:
        assigner: the assigner's method name (``AssignerSpec.method``).
        aggregator: the aggregation method.
        seed: the experiment seed.
        accuracy: global test accuracy per round, ``[rounds]``.
        personal_accuracy: the last round's mean personalised accuracy (None if not measured).
        trainable_params: the run's ``summary/trainable_params`` (summed over clients).
        client_params: mean trainable parameters per client (None if not logged).
        bytes_communicated: ``sum_t (bytes_up_t + bytes_down_t)`` over rounds.
        wall_seconds: ``sum_t round_seconds_t`` over rounds (the warm-up not included).
    """

    assigner: str
    aggregator: str
    seed: int
    accuracy: tuple[float, ...]
    personal_accuracy: float | None
    trainable_params: float
    client_params: float | None
    bytes_communicated: float
    wall_seconds: float

    @property
    def method(self) -> str:
        """``<assigner>-<aggregator>``."""
        return f"{self.assigner}-{self.aggregator}"


@dataclass(frozen=True)
class MethodSummary:
    """One method (assigner x aggregator) over its seeds: means, and spreads as ``(mean, std)``.

    Attributes:
        rounds_to_target: mean first round reaching the target, over the seeds that reached it
            (None if none did); ``reached`` counts those seeds.
    """

    assigner: str
    aggregator: str
    seeds: int
    best: tuple[float, float]
    final: tuple[float, float]
    rounds_to_target: float | None
    reached: int
    personal_accuracy: float | None
    trainable_params: float
    client_params: float | None
    bytes_communicated: float
    wall_seconds: float


def rounds_to_target(accuracy: Sequence[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy is at least ``target``, or None if none is."""
    return next((t for t, acc in enumerate(accuracy, start=1) if acc >= target), None)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1`` in the denominator; 0 for one value)."""
    if not values:
        raise ValueError("values is empty; expected at least one seed's result")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _mean_known(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return sum(known) / len(known) if known else None


def _by_method(results: Sequence[CellResult]) -> dict[str, list[CellResult]]:
    groups: dict[str, list[CellResult]] = {}
    for r in results:
        if not r.accuracy:
            raise ValueError(f"cell {r.method}-s{r.seed} has no rounds; expected >= 1")
        groups.setdefault(r.method, []).append(r)
    return groups


def summarise(results: Sequence[CellResult], target: float) -> list[MethodSummary]:
    """One summary per method, in order of first appearance, over that method's seeds."""
    out = []
    for runs in _by_method(results).values():
        reached = [t for r in runs if (t := rounds_to_target(r.accuracy, target)) is not None]
        out.append(
            MethodSummary(
                assigner=runs[0].assigner,
                aggregator=runs[0].aggregator,
                seeds=len(runs),
                best=mean_std([max(r.accuracy) for r in runs]),
                final=mean_std([r.accuracy[-1] for r in runs]),
                rounds_to_target=_mean_known([float(t) for t in reached]),
                reached=len(reached),
                personal_accuracy=_mean_known([r.personal_accuracy for r in runs]),
                trainable_params=sum(r.trainable_params for r in runs) / len(runs),
                client_params=_mean_known([r.client_params for r in runs]),
                bytes_communicated=sum(r.bytes_communicated for r in runs) / len(runs),
                wall_seconds=sum(r.wall_seconds for r in runs) / len(runs),
            )
        )
    return out


def mean_curve(series: Sequence[Sequence[float]]) -> list[float]:
    """The per-round mean of several seeds' series, ``[n_seeds][rounds]``, to the shortest one."""
    rounds = min(len(s) for s in series)
    return [sum(s[t] for s in series) / len(series) for t in range(rounds)]


def mean_curves(results: Sequence[CellResult]) -> dict[str, list[float]]:
    """Per method, the global accuracy per round averaged over seeds (to the shortest run)."""
    return {
        method: mean_curve([r.accuracy for r in runs])
        for method, runs in _by_method(results).items()
    }


def std_curves(results: Sequence[CellResult]) -> dict[str, list[float]]:
    """Per method, the sample standard deviation over seeds of the global accuracy per round
    (to the shortest run; 0 with one seed)."""
    out = {}
    for method, runs in _by_method(results).items():
        rounds = min(len(r.accuracy) for r in runs)
        out[method] = [mean_std([r.accuracy[t] for r in runs])[1] for t in range(rounds)]
    return out


def _spread(stat: tuple[float, float]) -> str:
    return f"{stat[0]:.4f} ± {stat[1]:.4f}"


def _reach(s: MethodSummary) -> str:
    if s.rounds_to_target is None:
        return "-"
    partial = f" ({s.reached}/{s.seeds})" if s.reached < s.seeds else ""
    return f"{s.rounds_to_target:.1f}{partial}"


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


_COLUMNS = (
    "assigner|aggregator|best accuracy|final accuracy|rounds to {target}|"
    "personalised accuracy|seeds|trainable params (all clients)|params per client|"
    "communicated (MB)|wall time (s)"
)


def _row(s: MethodSummary) -> list[str]:
    return [
        s.assigner,
        s.aggregator,
        _spread(s.best),
        _spread(s.final),
        _reach(s),
        _maybe(s.personal_accuracy, ".4f"),
        str(s.seeds),
        f"{s.trainable_params:,.0f}",
        _maybe(s.client_params, ",.0f"),
        f"{s.bytes_communicated / 1e6:.2f}",
        f"{s.wall_seconds:.1f}",
    ]


def markdown_table(
    summaries: Sequence[MethodSummary], target: float, skipped: Sequence[SkippedCell] = ()
) -> str:
    """The comparison as a markdown table, one row per method, skipped cells listed below.

    "rounds to <target>" averages over the seeds that reached it; ``(k/n)`` says how many did.
    """
    head = _COLUMNS.format(target=f"{target:g}").split("|")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_row(s)) + " |" for s in summaries]
    if skipped:
        lines.append("")
        lines += [f"- skipped `{c.run_name}`: {c.reason}" for c in skipped]
    return "\n".join(lines) + "\n"


# The table's columns, accuracies first after the method (what a reader compares).
_TABLE_KEYS = (
    "assigner",
    "aggregator",
    "best_accuracy_mean",
    "best_accuracy_std",
    "final_accuracy_mean",
    "final_accuracy_std",
    "rounds_to_target",
    "reached",
    "personal_accuracy",
    "seeds",
    "trainable_params",
    "client_params",
    "bytes_communicated",
    "wall_seconds",
)


def summary_columns(summaries: Sequence[MethodSummary]) -> dict[str, list[Any]]:
    """The summary as columns of plain values (an MLflow table: column name -> values)."""
    rows = []
    for s in summaries:
        row = asdict(s)
        row["best_accuracy_mean"], row["best_accuracy_std"] = row.pop("best")
        row["final_accuracy_mean"], row["final_accuracy_std"] = row.pop("final")
        rows.append(row)
    return {key: [r[key] for r in rows] for key in _TABLE_KEYS} if rows else {}


def _metric_name(method: str) -> str:
    """A method's name as an MLflow metric key segment (letters, digits, ``_-.`` only)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in method)


def summary_metrics(summaries: Sequence[MethodSummary]) -> dict[str, float]:
    """The summary as MLflow metrics of the comparison's parent run, ``<statistic>/<method>``.

    One chart section per statistic, one chart per method; ``rounds_to_target`` only for
    methods that reached the target in some seed.
    """
    out: dict[str, float] = {}
    for s in summaries:
        name = _metric_name(f"{s.assigner}-{s.aggregator}")
        out[f"best_accuracy/{name}"] = s.best[0]
        out[f"final_accuracy/{name}"] = s.final[0]
        out[f"final_accuracy_std/{name}"] = s.final[1]
        if s.rounds_to_target is not None:
            out[f"rounds_to_target/{name}"] = s.rounds_to_target
        if s.personal_accuracy is not None:
            out[f"personal_accuracy/{name}"] = s.personal_accuracy
        out[f"trainable_params/{name}"] = s.trainable_params
        out[f"communicated_mb/{name}"] = s.bytes_communicated / 1e6
    return out


def terminal_table(summaries: Sequence[MethodSummary], target: float) -> str:
    """The comparison for a terminal: one aligned row per method, within ~100 columns.

    Method, best and final accuracy (mean ± std over seeds), rounds to the target, parameters
    per client and megabytes communicated; the full table is ``summary.md``.
    """
    head = ["method", "best", "final", f"reach {target:g}", "params", "MB", "seeds"]
    rows = [
        [
            f"{s.assigner}-{s.aggregator}",
            _spread(s.best),
            _spread(s.final),
            _reach(s),
            _maybe(s.client_params, ",.0f"),
            f"{s.bytes_communicated / 1e6:.2f}",
            str(s.seeds),
        ]
        for s in summaries
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    legend = (
        "best, final: global test accuracy, mean ± std over seeds; reach: rounds to the target; "
        "params: trainable LoRA parameters per client; MB: communicated"
    )
    table = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    return "\n".join([*table, "", textwrap.fill(legend, 96)]) + "\n"
