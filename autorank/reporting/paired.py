"""Paired differences between two methods over the seeds both ran, with a paired t-test.

Cells of one seed share partitions and initial weights, so a method's per-seed difference to a
reference removes the seed's own luck (an easy or hard partition) from the comparison; the
spread of those differences, not of either method's accuracies, decides whether a difference is
more than noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Differences whose sample std is below this are identical up to float rounding: no t statistic.
_STD_ATOL = 1e-12


@dataclass(frozen=True)
class PairedDiff:
    """One statistic's per-seed differences ``d_s = x_M,s - x_R,s``, summarised.

    Attributes:
        mean: ``mean(d) = sum_s d_s / n``.
        std: ``sqrt(sum_s (d_s - mean(d))^2 / (n - 1))`` (0 for one seed).
        p: the two-sided paired t-test's p-value (None when ``n < 2`` or ``std = 0``).
        wins: seeds with ``d_s > 0`` (ties are not wins).
        n: the seeds both methods ran.
    """

    mean: float
    std: float
    p: float | None
    wins: int
    n: int


@dataclass(frozen=True)
class PairedSummary:
    """One method against the reference over the seeds both ran: best and final accuracy."""

    method: str
    best: PairedDiff
    final: PairedDiff

    @property
    def seeds(self) -> int:
        """The number of paired seeds."""
        return self.best.n


@dataclass(frozen=True)
class PairedComparison:
    """Every other method against ``reference``; methods sharing no seed with it are absent."""

    reference: str
    rows: tuple[PairedSummary, ...]

    def of(self, method: str) -> PairedSummary | None:
        """``method``'s row, None for the reference and for methods without a paired seed."""
        return next((r for r in self.rows if r.method == method), None)


def t_two_sided_p(t: float, df: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` (integer) degrees of freedom.

    Closed form for integer ``df`` (Abramowitz & Stegun 26.7.3-4), with
    ``theta = atan(|t| / sqrt(df))`` and ``c = cos(theta)``:
    ``A = 2/pi (theta + sin(theta) c (1 + 2/3 c^2 + ... + (2*4*...*(df-3))/(1*3*...*(df-2))
    c^(df-3)))`` for odd ``df`` (``2 theta / pi`` for ``df = 1``), and
    ``A = sin(theta) (1 + 1/2 c^2 + ... + (1*3*...*(df-3))/(2*4*...*(df-2)) c^(df-2))`` for
    even ``df``; ``p = 1 - A``.
    """
    if df < 1:
        raise ValueError(f"df is {df}; expected an integer >= 1")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term, series = 1.0, 1.0
    if df % 2 == 1:
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            series += term
        tail = math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0
        inside = 2 / math.pi * (theta + tail)
    else:
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            series += term
        inside = math.sin(theta) * series
    return min(1.0, max(0.0, 1.0 - inside))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1`` in the denominator; 0 for one value)."""
    if not values:
        raise ValueError("values is empty; expected at least one seed's result")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_difference(diffs: Sequence[float]) -> PairedDiff:
    """Mean, sample std, two-sided paired t-test and wins of per-seed differences ``d``, ``[n]``.

    ``t = mean(d) / (std(d) / sqrt(n))`` with ``n - 1`` degrees of freedom (Student's paired
    t-test); no p-value for one seed or identical differences, where the test is undefined.
    """
    n = len(diffs)
    if n == 0:
        raise ValueError("diffs is empty; expected the differences of >= 1 paired seed")
    mean, std = mean_std(diffs)
    p = None
    if n > 1 and std > _STD_ATOL:
        p = t_two_sided_p(mean / (std / math.sqrt(n)), n - 1)
    return PairedDiff(mean=mean, std=std, p=p, wins=sum(d > 0 for d in diffs), n=n)


def paired_on_seeds(
    method: Mapping[int, float], reference: Mapping[int, float]
) -> PairedDiff | None:
    """``paired_difference`` of ``method[s] - reference[s]`` over the seeds ``s`` both have
    (seed -> value); None when they share no seed."""
    seeds = sorted(method.keys() & reference.keys())
    if not seeds:
        return None
    return paired_difference([method[s] - reference[s] for s in seeds])
