"""The settings' vocabularies (the names a YAML value may take) and the base of every section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Scheme = Literal["iid", "dirichlet", "shards", "quantity_skew", "double_imbalance"]
Criterion = Literal["entropy", "gini_simpson", "n_samples", "learning_difficulty"]
AssignerName = Literal["autorank", "uniform", "manual", "random", "heavy_tail", "size"]
AggregatorName = Literal[
    "fedavg",
    "zeropad",
    "hetlora",
    "rbla",
    "rbla_svd",
    "rbla_product",
    "rbla_tiered",
    "flexlora",
    "flora",
]
# When aggregation.early_method applies: always, or only when every rank tier holds every label.
EarlyWhen = Literal["always", "all_labels"]


class Section(BaseModel):
    """A config section: unknown keys refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
