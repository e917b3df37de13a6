"""The ranking phase's plans: the early merge that waits for the labels, per early round."""

from __future__ import annotations

from collections.abc import Sequence

from autorank.config import AggregationConfig, ExperimentConfig
from autorank.data.federation import Federation
from autorank.merge.tiers import LabelGap, tier_label_gap
from autorank.ranking.assignment import RankAssignment
from autorank.rounds.cohorts import sample_clients


def first_rounds(n: int) -> str:
    return "round 1" if n == 1 else f"rounds 1-{n}"


def early_gaps(
    config: ExperimentConfig, assignment: RankAssignment, federation: Federation
) -> list[LabelGap | None]:
    """Per early round, the rank tier of that round's clients that lacks labels (None: none
    does, the early merge runs). Sampling is a function of seed and round, and no re-ranking
    falls among the early rounds (``ExperimentConfig``), so a resume finds the same list; the
    ``autorank ranks`` preview gives it its ranks, which lack the warm-up's learning difficulty."""
    ranks, n = assignment.ranks(), len(federation.clients)
    per_round = config.training.clients_per_round
    return [
        tier_label_gap(
            ranks,
            federation.histogram,
            sample_clients(n, per_round, seed=config.seed, round_idx=r),
        )
        for r in range(1, config.aggregation.early_rounds + 1)
    ]


def early_plan(agg: AggregationConfig, gaps: Sequence[LabelGap | None]) -> str:
    """What ``early_when: all_labels`` does over the early rounds, in one line."""
    ran = [r for r, gap in enumerate(gaps, start=1) if gap is None]
    if len(ran) == len(gaps):
        every = "every rank tier's clients hold every label"
        return f"{agg.early_method} in {first_rounds(len(gaps))}: {every}"
    first = next(r for r, gap in enumerate(gaps, start=1) if gap is not None)
    if not ran:
        return f"skipped, {agg.method} merges from round 1: {gaps[0]}"
    return (
        f"{agg.early_method} in round(s) {', '.join(map(str, ran))} of 1-{len(gaps)}, "
        f"{agg.method} in the others, where a rank tier lacks labels (round {first}: "
        f"{gaps[first - 1]})"
    )
