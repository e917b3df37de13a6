"""A comparison's results: one row per method (assigner x aggregator), mean and spread over seeds.

``summarise`` reduces the cells' histories, ``paired_against`` pairs every method with a reference
seed by seed; ``markdown_table``, ``summary_columns``, ``summary_metrics`` and ``terminal_table``
present them.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autorank.reporting.cells import SkippedCell
from autorank.reporting.paired import (
    PairedComparison,
    PairedDiff,
    PairedSummary,
    mean_std,
    paired_on_seeds,
)


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

    @property
    def method(self) -> str:
        """``<assigner>-<aggregator>``."""
        return f"{self.assigner}-{self.aggregator}"


def rounds_to_target(accuracy: Sequence[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy is at least ``target``, or None if none is."""
    return next((t for t, acc in enumerate(accuracy, start=1) if acc >= target), None)


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


def _per_seed(runs: Sequence[CellResult]) -> tuple[dict[int, float], dict[int, float]]:
    """Best and final accuracy per seed."""
    return {r.seed: max(r.accuracy) for r in runs}, {r.seed: r.accuracy[-1] for r in runs}


def paired_against(results: Sequence[CellResult], reference: str) -> PairedComparison:
    """Every other method against ``reference``, seed by seed, in order of first appearance.

    Cells of one seed share partitions and initial weights, so for a method ``M`` and the
    reference ``R`` the differences ``d_s = best_M,s - best_R,s`` (and the same for final
    accuracy) over the seeds both ran are paired samples (``reporting.paired``). Methods that
    share no seed with the reference, and every method when it has no result, are left out.
    """
    groups = _by_method(results)
    best_ref, final_ref = _per_seed(groups.get(reference, []))
    rows = []
    for method, runs in groups.items():
        best, final = _per_seed(runs)
        best_diff = paired_on_seeds(best, best_ref)
        final_diff = paired_on_seeds(final, final_ref)
        if method != reference and best_diff is not None and final_diff is not None:
            rows.append(PairedSummary(method, best_diff, final_diff))
    return PairedComparison(reference, tuple(rows))


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


def _p_value(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _paired_cells(d: PairedDiff) -> list[str]:
    return [f"{d.mean:+.4f} ± {d.std:.4f}", _p_value(d.p), f"{d.wins}/{d.n}"]


def _markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _paired_lines(paired: PairedComparison) -> list[str]:
    ref = f"`{paired.reference}`"
    if not paired.rows:
        return ["", f"No paired statistics: the reference {ref} has no seed to pair with."]
    title = (
        f"Paired against {ref} (best accuracy, final accuracy: mean ± std of the per-seed "
        "difference, p, wins/n); p: two-sided paired t-test, - with one seed or equal differences."
    )
    head = ["method", "Δ best", "p", "wins", "Δ final", "p", "wins"]
    rows = [[r.method, *_paired_cells(r.best), *_paired_cells(r.final)] for r in paired.rows]
    return ["", title, "", *_markdown(head, rows)]


def markdown_table(
    summaries: Sequence[MethodSummary],
    target: float,
    skipped: Sequence[SkippedCell] = (),
    paired: PairedComparison | None = None,
) -> str:
    """The comparison as a markdown table, one row per method, then (with a reference) the paired
    table, then the skipped cells.

    "rounds to <target>" averages over the seeds that reached it; ``(k/n)`` says how many did.
    """
    lines = _markdown(
        _COLUMNS.format(target=f"{target:g}").split("|"), [_row(s) for s in summaries]
    )
    if paired is not None:
        lines += _paired_lines(paired)
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
# With a reference: the per-seed differences to it (None on its own row).
_PAIRED_KEYS = (
    "best_diff_mean",
    "best_diff_std",
    "best_diff_p",
    "best_diff_wins",
    "final_diff_mean",
    "final_diff_std",
    "final_diff_p",
    "final_diff_wins",
    "paired_seeds",
)


def _paired_columns(row: PairedSummary | None) -> dict[str, Any]:
    if row is None:
        return dict.fromkeys(_PAIRED_KEYS)
    out: dict[str, Any] = {"paired_seeds": row.seeds}
    for stat, d in (("best", row.best), ("final", row.final)):
        out |= {f"{stat}_diff_{k}": v for k, v in asdict(d).items() if k != "n"}
    return out


def summary_columns(
    summaries: Sequence[MethodSummary], paired: PairedComparison | None = None
) -> dict[str, list[Any]]:
    """The summary as columns of plain values (an MLflow table: column name -> values).

    With a reference, ``best_diff_mean``, ``best_diff_std``, ``best_diff_p``, ``best_diff_wins``,
    the same for ``final`` and ``paired_seeds`` follow: None for the reference itself.
    """
    rows = []
    for s in summaries:
        row = asdict(s)
        row["best_accuracy_mean"], row["best_accuracy_std"] = row.pop("best")
        row["final_accuracy_mean"], row["final_accuracy_std"] = row.pop("final")
        if paired is not None:
            row |= _paired_columns(paired.of(s.method))
        rows.append(row)
    keys = _TABLE_KEYS + (_PAIRED_KEYS if paired is not None else ())
    return {key: [r[key] for r in rows] for key in keys} if rows else {}


def _metric_name(method: str) -> str:
    """A method's name as an MLflow metric key segment (letters, digits, ``_-.`` only)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in method)


def curve_metrics(curves: Mapping[str, Sequence[float]]) -> dict[int, dict[str, float]]:
    """Each method's mean global accuracy per round as MLflow metrics of the comparison's
    parent, ``accuracy_per_round/<method>`` by round (step): the parent's metrics page sorts
    its sections by name, so it opens on these curves, not on one-value statistics."""
    out: dict[int, dict[str, float]] = {}
    for method, curve in curves.items():
        for t, value in enumerate(curve, start=1):
            out.setdefault(t, {})[f"accuracy_per_round/{_metric_name(method)}"] = value
    return out


def summary_metrics(
    summaries: Sequence[MethodSummary], paired: PairedComparison | None = None
) -> dict[str, float]:
    """The summary as MLflow metrics of the comparison's parent run, ``<statistic>/<method>``.

    One chart section per statistic, one chart per method; ``rounds_to_target`` only for
    methods that reached the target in some seed; ``best_accuracy_diff`` and
    ``final_accuracy_diff`` (mean per-seed difference to the reference) for paired methods.
    """
    out: dict[str, float] = {}
    for row in paired.rows if paired is not None else ():
        out[f"best_accuracy_diff/{_metric_name(row.method)}"] = row.best.mean
        out[f"final_accuracy_diff/{_metric_name(row.method)}"] = row.final.mean
    for s in summaries:
        name = _metric_name(s.method)
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


def _delta_best(s: MethodSummary, paired: PairedComparison) -> str:
    if s.method == paired.reference:
        return "ref"
    row = paired.of(s.method)
    return "-" if row is None else f"{row.best.mean:+.4f}"


def _terminal_row(s: MethodSummary, paired: PairedComparison | None) -> list[str]:
    accuracy = _spread if paired is None else (lambda stat: f"{stat[0]:.4f}")
    return [
        s.method,
        accuracy(s.best),
        accuracy(s.final),
        _reach(s),
        _maybe(s.client_params, ",.0f"),
        f"{s.bytes_communicated / 1e6:.2f}",
        str(s.seeds),
        *([] if paired is None else [_delta_best(s, paired)]),
    ]


TERMINAL_WIDTH = 100


def terminal_table(
    summaries: Sequence[MethodSummary], target: float, paired: PairedComparison | None = None
) -> str:
    """The comparison for a terminal: one aligned row per method, within 100 columns.

    Method, best and final accuracy (mean ± std over seeds), rounds to the target, parameters
    per client and megabytes communicated; the full table is ``summary.md``. With a reference
    the accuracies drop their std to make room for ``Δbest vs ref``, the mean per-seed difference
    in best accuracy to the reference. Where a method's name would push a row past 100 columns
    (``uniform-mean_autorank-rbla_tiered5@all_labels+rbla_product``), each name takes a line of
    its own above its figures.
    """
    head = ["method", "best", "final", f"reach {target:g}", "params", "MB", "seeds"]
    head += [] if paired is None else ["Δbest vs ref"]
    rows = [_terminal_row(s, paired) for s in summaries]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    spread = "mean ± std over seeds" if paired is None else "mean over seeds"
    legend = (
        f"best, final: global test accuracy, {spread}; reach: rounds to the target; "
        "params: trainable LoRA parameters per client; MB: communicated"
    )
    if paired is not None:
        legend += (
            f"; Δbest vs ref: mean per-seed difference in best accuracy to {paired.reference} "
            "(std, p and wins in summary.md)"
        )
    rule = ["-" * w for w in widths]
    if sum(widths) + 2 * (len(widths) - 1) <= TERMINAL_WIDTH:
        table = [line(head), line(rule), *map(line, rows)]
    else:  # names on their own lines, the figures indented below them
        widths[0] = 0
        table = [head[0], line(["", *head[1:]]), line(["", *rule[1:]])]
        for row in rows:
            table += [row[0], line(["", *row[1:]])]
    return "\n".join([*table, "", textwrap.fill(legend, 96)]) + "\n"
