"""Rank assignment from the data alone: the `autorank ranks` preview of a config."""

from __future__ import annotations

from autorank.config import ExperimentConfig
from autorank.data import load_data
from autorank.federation import build_federation
from autorank.models import default_targets
from autorank.ranks import RankAssignment, assign_ranks


def layer_ranges(config: ExperimentConfig) -> dict[str, tuple[int, int]]:
    """Each adapted layer's [r_min, r_max]: the configured targets, else the model's default."""
    targets = config.lora.target_modules or default_targets(
        config.model.name, n_hidden=len(config.model.hidden)
    )
    return {layer: config.lora.range_of(layer) for layer in targets}


def rank_table(config: ExperimentConfig) -> RankAssignment:
    """Load, partition, profile (no training) and assign ranks as the config says."""
    data = load_data(
        config.data.name,
        path=config.data.path,
        test_fraction=config.data.test_fraction,
        seed=config.seed,
        max_train_samples=config.data.max_train_samples,
    )
    public_fraction = config.model.pretrain_fraction if config.model.init == "pretrain" else 0.0
    federation = build_federation(
        data, config.partition, public_fraction=public_fraction, seed=config.seed
    )
    return assign_ranks(
        config.ranking.assigner,
        federation.profiles(),
        settings=config.ranking,
        r_min=config.lora.r_min,
        r_max=config.lora.r_max,
        layers=layer_ranges(config),
        n_classes=data.n_classes,
        seed=config.seed,
    )
