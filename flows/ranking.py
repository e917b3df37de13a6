"""Rank assignment from the data alone: the `autorank ranks` preview of a config, and the plan of
an early merge that waits for the labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from autorank.aggregation import LabelGap, tier_label_gap
from autorank.base import new_model
from autorank.cohorts import sample_clients
from autorank.config import AggregationConfig, ExperimentConfig
from autorank.federation import Federation, federation_from_config
from autorank.models import default_targets
from autorank.ranks import RankAssignment, assign_ranks
from autorank.targets import target_sizes


def layer_ranges(config: ExperimentConfig) -> dict[str, tuple[int, int]]:
    """Each adapted layer's [r_min, r_max]: the configured targets, else the model's default."""
    targets = config.lora.target_modules or default_targets(
        config.model.name, n_hidden=len(config.model.hidden)
    )
    return {layer: config.lora.range_of(layer) for layer in targets}


def public_fraction(config: ExperimentConfig) -> float:
    """The share of training data the server keeps for pre-training the base."""
    return config.model.pretrain_fraction if config.model.init == "pretrain" else 0.0


def federation_for(config: ExperimentConfig) -> Federation:
    """Load the data and lay it out over the clients exactly as a run of this config does."""
    return federation_from_config(
        config.data, config.partition, public_fraction=public_fraction(config), seed=config.seed
    )


def untrained_base(config: ExperimentConfig, federation: Federation) -> nn.Module:
    """The base model as built, before any weights are loaded or trained: its shapes are the
    run's."""
    return new_model(config.model, federation.data, seed=config.seed)


def rank_table(
    config: ExperimentConfig,
    federation: Federation | None = None,
    *,
    layer_sizes: Mapping[str, int] | None = None,
) -> RankAssignment:
    """Partition, profile (no training) and assign ranks as the config says.

    ``layer_sizes`` (``target_sizes`` of the base) count the LoRA parameters; with
    ``ranking.budget_params`` and none given they come from the untrained base's shapes.
    """
    federation = federation or federation_for(config)
    if layer_sizes is None and config.ranking.budget_params is not None:
        base = untrained_base(config, federation)
        layer_sizes = target_sizes(base, list(layer_ranges(config)))
    return assign_ranks(
        config.ranking.assigner,
        federation.profiles(),
        settings=config.ranking,
        r_min=config.lora.r_min,
        r_max=config.lora.r_max,
        layers=layer_ranges(config),
        n_classes=federation.data.n_classes,
        seed=config.seed,
        layer_sizes=layer_sizes,
    )


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
