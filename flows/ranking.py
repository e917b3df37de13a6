"""Rank assignment from the data alone: the `autorank ranks` preview of a config."""

from __future__ import annotations

from autorank.config import ExperimentConfig
from autorank.federation import Federation, federation_from_config
from autorank.models import default_targets
from autorank.ranks import RankAssignment, assign_ranks


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


def rank_table(config: ExperimentConfig, federation: Federation | None = None) -> RankAssignment:
    """Partition, profile (no training) and assign ranks as the config says."""
    federation = federation or federation_for(config)
    return assign_ranks(
        config.ranking.assigner,
        federation.profiles(),
        settings=config.ranking,
        r_min=config.lora.r_min,
        r_max=config.lora.r_max,
        layers=layer_ranges(config),
        n_classes=federation.data.n_classes,
        seed=config.seed,
    )
