"""Stage 0, the settings: one validated ``ExperimentConfig``, loaded from YAML, sliced for the
library. One module per YAML section (``data``, ``model``, ``ranking``, ``training``,
``runtime``), plus the vocabularies, the cross-section checks, loading and identity.

Every field has a default, so an empty YAML file is the quickstart experiment: digits, 10 clients,
the paper's double imbalance, AutoRank ranks and RBLA aggregation. Every name is re-exported here:
import from ``autorank.config``.

Never imports: torch, or any other package of ``autorank``.
"""

from autorank.config.data import DataConfig, PartitionConfig
from autorank.config.experiment import ExperimentConfig
from autorank.config.identity import (
    config_digest,
    flatten,
    json_digest,
    to_yaml,
    warm_up_identity,
)
from autorank.config.loading import (
    ConfigError,
    apply_override,
    format_validation_error,
    load_config,
    parse_config,
    read_yaml,
)
from autorank.config.model import LayerRange, LoraConfig, ModelConfig
from autorank.config.ranking import CapTier, RankingConfig
from autorank.config.runtime import DEFAULT_TRACKING_URI, RuntimeConfig, TrackingConfig
from autorank.config.training import AggregationConfig, TrainingConfig, aggregation_fields
from autorank.config.vocab import (
    AggregatorName,
    AssignerName,
    Criterion,
    EarlyWhen,
    RunName,
    Scheme,
    Section,
    Seed,
)

__all__ = [
    "DEFAULT_TRACKING_URI",
    "AggregationConfig",
    "AggregatorName",
    "AssignerName",
    "CapTier",
    "ConfigError",
    "Criterion",
    "DataConfig",
    "EarlyWhen",
    "ExperimentConfig",
    "LayerRange",
    "LoraConfig",
    "ModelConfig",
    "PartitionConfig",
    "RankingConfig",
    "RunName",
    "RuntimeConfig",
    "Scheme",
    "Section",
    "Seed",
    "TrackingConfig",
    "TrainingConfig",
    "aggregation_fields",
    "apply_override",
    "config_digest",
    "flatten",
    "format_validation_error",
    "json_digest",
    "load_config",
    "parse_config",
    "read_yaml",
    "to_yaml",
    "warm_up_identity",
]
