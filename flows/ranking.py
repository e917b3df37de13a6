"""Rank assignment from the data alone: the `autorank ranks` preview of a config."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from autorank.base import new_model
from autorank.config import ExperimentConfig
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
