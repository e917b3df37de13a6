"""The ranking phase of a run: the warm-up and the rank decision, the re-ranking during training,
and the plan of an early merge that waits for the labels."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Sequence

from torch import nn

from autorank.config import (
    AggregationConfig,
    AggregatorName,
    ExperimentConfig,
    warm_up_identity,
)
from autorank.data.federation import Federation
from autorank.engine.jobs import ClientOutcome, capped_ranks, warmup_jobs
from autorank.lora.targets import target_sizes
from autorank.merge.tiers import LabelGap, tier_label_gap
from autorank.ranking.assignment import RankAssignment, RankDecision
from autorank.ranking.budget import draw_caps
from autorank.ranking.profiling import ClientProfile, learning_difficulty, profile_clients
from autorank.ranking.reranking import remeasured_profiles
from autorank.recipe import layer_ranges, profile_federation, top_ranks
from autorank.rounds.cohorts import participants, sample_clients
from autorank.rounds.steps import ClientData, check_finite
from flows.engines import Engines
from flows.run_records import record_decision, record_early_merge
from flows.runners import opaque
from tasks.ranking import rank_clients

progress = logging.getLogger("autorank.progress")


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


def warm_up_and_rank(
    config: ExperimentConfig,
    base: nn.Module,
    federation: Federation,
    data: Sequence[ClientData],
    engines: Engines,
) -> RankAssignment:
    """Warm-up round at the maximum ranks (for learning difficulty), then rank assignment; with
    learning difficulty from each client's first participation, no client's rank yet."""
    mode = config.difficulty_mode()
    if mode == "first_participation":
        progress.info(
            "ranks: each client's decided after its first round (learning difficulty from its "
            "loss curve there), at the maximum ranks until then; no warm-up"
        )
        return RankAssignment(config.ranking.assigner, ())
    profiles = profile_federation(federation)
    if mode == "warmup":
        key = warm_up_key(config)
        with _WARM_UPS_LOCK:
            curves = _WARM_UPS.get(key) if key is not None else None
        if curves is not None:
            progress.info(
                "warm-up: reused from an earlier run in this process with the same data, model, "
                "ranks and local training (a grid's other merges)"
            )
        else:
            curves = _warm_up(config, base, data, engines)
            if key is not None:
                with _WARM_UPS_LOCK:
                    _WARM_UPS[key] = curves
                    while len(_WARM_UPS) > _WARM_UPS_KEPT:
                        del _WARM_UPS[next(iter(_WARM_UPS))]
        profiles = profile_federation(federation, curves)
    return decide(config, profiles, federation, base)


def _warm_up(
    config: ExperimentConfig, base: nn.Module, data: Sequence[ClientData], engines: Engines
) -> list[list[float]]:
    """Every client's loss curve over ``training.warmup_epochs`` at the maximum ranks."""
    r, n = config.ranking, len(data)
    caps = draw_caps(range(n), r.rank_caps, r.cap_tiers, config.seed)
    capped = sum(cap is not None for cap in caps)
    progress.info(
        "warm-up: %d clients, %d epochs at the maximum ranks%s (for learning difficulty)",
        n,
        config.training.warmup_epochs,
        f", {capped} at its device's cap" if capped else "",
    )
    # As many clients at a time as a round trains: the warm-up holds no more clients' data and
    # trained adapters at once than a round does (at 10,000 clients, 100 a round: 3.2 GB peak
    # RSS otherwise).
    chunk = participants(n, config.training.clients_per_round)
    curves: list[list[float]] = []
    for start in range(0, n, chunk):
        part = data[start : start + chunk]
        jobs = warmup_jobs(
            [d.x for d in part],
            [d.y for d in part],
            ranks=top_ranks(config),
            epochs=config.training.warmup_epochs,
            seed=config.seed,
            caps=caps[start : start + chunk],
            max_steps=config.training.local_steps,
            first=start,
        )
        outcomes = engines.train(config, jobs, None, base, 0, "warm-up")
        check_finite(0, [o.result for o in outcomes])
        curves += [list(o.result.epoch_losses) for o in outcomes]
        del part, jobs, outcomes
        if chunk < n:
            progress.debug("warm-up: %d of %d clients", len(curves), n)
    progress.info("warm-up done: %d loss curves", len(curves))
    return curves


# The warm-ups of a comparison's cells, by ``warm_up_key``: a grid's AutoRank cells that differ
# only in their merge train the same warm-up, which is deterministic; the later cells reuse the
# first one's curves (the same ranks, to the bit) instead of training it again. Cells may train
# in parallel threads (``max_parallel``).
_WARM_UPS: dict[str, list[list[float]]] = {}
_WARM_UPS_KEPT = 4
_WARM_UPS_LOCK = threading.Lock()


def warm_up_key(config: ExperimentConfig) -> str | None:
    """What a comparison cell's warm-up curves depend on: its comparison (the parent run), the
    config less its merge, and the device and engine it trains on; None outside a comparison."""
    parent = config.tracking.parent_run_id
    return None if parent is None else f"{parent}|{warm_up_identity(config)}"


def decide(
    config: ExperimentConfig,
    profiles: Sequence[ClientProfile],
    federation: Federation,
    base: nn.Module,
) -> RankAssignment:
    """The configured assigner over the clients' profiles (with the rank budget, if any)."""
    sizes = target_sizes(base, list(layer_ranges(config)))
    # Opaque: Prefect would walk every profile of a large population for futures.
    return rank_clients(
        config, opaque(profiles), n_classes=federation.data.n_classes, layer_sizes=sizes
    )


def ranks_in_force(
    config: ExperimentConfig, assignment: RankAssignment, n_clients: int
) -> list[dict[str, int]]:
    """Every client's ranks for the next round: its decision, or, for a client not measured yet
    (``first_participation``), the maximum ranks at its device's cap, as the warm-up trains."""
    if len(assignment.decisions) == n_clients:
        return assignment.ranks()
    top, r = top_ranks(config), config.ranking
    caps = draw_caps(range(n_clients), r.rank_caps, r.cap_tiers, config.seed)
    ranks = [capped_ranks(top, cap) for cap in caps]
    for d in assignment.decisions:
        ranks[d.client] = dict(d.layer_ranks)
    return ranks


def _profile_of(decision: RankDecision) -> ClientProfile:
    """A ranked client's profile from the criteria its decision recorded (no label counts:
    CRITIC and TOPSIS read the criteria only; a criterion not in use reads as NaN)."""
    c = decision.criteria
    return ClientProfile(
        client=decision.client,
        n_samples=decision.n_samples,
        histogram=(),
        entropy=c.get("entropy", math.nan),
        gini_simpson=c.get("gini_simpson", math.nan),
        learning_difficulty=c["learning_difficulty"],
    )


def decide_first_participants(
    config: ExperimentConfig,
    run_id: str,
    in_force: RankAssignment,
    base: nn.Module,
    federation: Federation,
    outcomes: Sequence[ClientOutcome],
    round_idx: int,
) -> tuple[RankAssignment, RankAssignment]:
    """``first_participation``: the ranks of this round's clients that trained for the first
    time, from their loss curves, decided by CRITIC and TOPSIS among every client measured so
    far; the ranks given before stay. Returns the decision in force from the next round on
    and the one of this round's newcomers alone (empty: none; ``in_force`` unchanged)."""
    check_finite(round_idx, [o.result for o in outcomes])  # a diverged curve has no entropy
    decided = {d.client: d for d in in_force.decisions}
    curves = {
        o.result.client: o.result.epoch_losses for o in outcomes if o.result.client not in decided
    }
    if not curves:
        return in_force, RankAssignment(in_force.assigner, ())
    pool = sorted([*decided, *curves])
    newcomers = sorted(curves)
    tokens = None if federation.tokens is None else federation.tokens[newcomers]
    measured = profile_clients(federation.label_counts(newcomers), tokens=tokens)
    fresh_profiles = {
        client: dataclasses.replace(
            p, client=client, learning_difficulty=learning_difficulty(curves[client])
        )
        for client, p in zip(newcomers, measured, strict=True)
    }
    # The clients ranked before keep the criteria their decision recorded (their samples are
    # not drawn again: O(newcomers) a round, not O(every client ranked so far)).
    profiles = [fresh_profiles.get(c) or _profile_of(decided[c]) for c in pool]
    r = config.ranking
    caps = {k: cap for k, cap in r.rank_caps.items() if k in decided or k in curves}
    among = config.model_copy(update={"ranking": r.model_copy(update={"rank_caps": caps})})
    fresh = decide(among, profiles, federation, base)
    new = tuple(d for d in fresh.decisions if d.client in curves)
    assignment = RankAssignment(
        fresh.assigner, tuple(decided.get(d.client) or d for d in fresh.decisions), fresh.weights
    )
    arrived = RankAssignment(fresh.assigner, new, fresh.weights)
    record_decision(
        config, run_id, federation, arrived, step=round_idx, in_force=assignment, plot=False
    )
    progress.info(
        "round %d: %d clients trained for the first time and were given ranks (mean %.1f); "
        "%d of %d clients ranked",
        round_idx,
        len(new),
        sum(d.rank for d in new) / len(new),
        len(pool),
        federation.n_clients,
    )
    return assignment, arrived


def rerank(
    config: ExperimentConfig,
    run_id: str,
    in_force: RankAssignment,
    base: nn.Module,
    federation: Federation,
    outcomes: Sequence[ClientOutcome],
    round_idx: int,
) -> RankAssignment:
    """Decide the ranks again from this round's loss curves (``ranking.rerank_every``) and log the
    decision as the first one was, at this round's step; it holds from the next round on."""
    curves = {o.result.client: list(o.result.epoch_losses) for o in outcomes}
    profiles = remeasured_profiles(profile_federation(federation), in_force, curves)
    assignment = decide(config, profiles, federation, base)
    record_decision(config, run_id, federation, assignment, step=round_idx)
    before = {d.client: d.rank for d in in_force.decisions}
    changed = sum(before[d.client] != d.rank for d in assignment.decisions)
    progress.info(
        "round %d: ranks decided again from its loss curves: %d of %d clients changed rank, "
        "mean rank %.1f (was %.1f)",
        round_idx,
        changed,
        len(assignment.decisions),
        sum(d.rank for d in assignment.decisions) / len(assignment.decisions),
        sum(before.values()) / len(before),
    )
    return assignment


def round_merge(
    config: ExperimentConfig,
    run_id: str,
    assignment: RankAssignment,
    federation: Federation,
    round_idx: int,
    *,
    announce: bool,
) -> tuple[AggregatorName, bool]:
    """The merge of the round, and whether the early merge ran in every early round.

    With ``early_when: all_labels`` the early merge runs in the early rounds whose clients, in
    every rank tier, hold every label. With ``announce`` (the first round this process runs:
    round 1, or a resume's first) the plan is logged and recorded as a tag (the same plan
    again on a resume: sampling and ranks are those of the interrupted run).
    """
    agg = config.aggregation
    if agg.early_method is None or agg.early_when == "always" or round_idx > agg.early_rounds:
        return agg.method_at(round_idx), True
    gaps = early_gaps(config, assignment, federation)
    if announce:
        plan = early_plan(agg, gaps)
        progress.info("early merge %s", plan)
        record_early_merge(config.tracking.uri, run_id, plan)
    covered = gaps[round_idx - 1] is None
    return agg.method_at(round_idx, labels_covered=covered), all(g is None for g in gaps)
