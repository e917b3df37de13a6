"""The rank-assignment task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefect import task

from autorank.config import ExperimentConfig
from autorank.ranking.assignment import RankAssignment
from autorank.ranking.profiling import ClientProfile
from autorank.recipe import assign


@task(persist_result=False)
def rank_clients(
    config: ExperimentConfig,
    profiles: Sequence[ClientProfile],
    *,
    n_classes: int,
    layer_sizes: Mapping[str, int] | None = None,
) -> RankAssignment:
    """Assign every client its LoRA rank (AutoRank: CRITIC-weighted TOPSIS; or a baseline)."""
    return assign(config, profiles, n_classes=n_classes, layer_sizes=layer_sizes)
