"""The rank-assignment task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefect import task

from autorank.config import RankingConfig
from autorank.profiling import ClientProfile
from autorank.ranks import RankAssignment, assign_ranks


@task(persist_result=False)
def rank_clients(
    profiles: Sequence[ClientProfile],
    settings: RankingConfig,
    *,
    r_min: int,
    r_max: int,
    layers: Mapping[str, tuple[int, int]],
    n_classes: int,
    seed: int,
    layer_sizes: Mapping[str, int] | None = None,
) -> RankAssignment:
    """Assign every client its LoRA rank (AutoRank: CRITIC-weighted TOPSIS; or a baseline)."""
    return assign_ranks(
        settings.assigner,
        profiles,
        settings=settings,
        r_min=r_min,
        r_max=r_max,
        layers=layers,
        n_classes=n_classes,
        seed=seed,
        layer_sizes=layer_sizes,
    )
