"""``training`` and ``aggregation``: the clients' local training and the server's merge."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from autorank.config.vocab import BASE_UPDATING, AggregatorName, EarlyWhen, Section


class TrainingConfig(Section):
    """Local training and the round schedule."""

    rounds: int = Field(
        20,
        ge=1,
        le=100_000,
        description="federated rounds (train, aggregate, evaluate, checkpoint)",
    )
    local_epochs: int = Field(
        5, ge=1, le=10_000, description="passes over its own data each sampled client makes a round"
    )
    local_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="at most this many optimiser steps per local epoch, the warm-up's too (each "
        "epoch a fresh order of the client's data); with local_epochs 1, the steps of a round, "
        "as federated fine-tuning of language models counts them; null: every batch",
    )
    grad_accumulation: int = Field(
        1,
        ge=1,
        le=1024,
        description="mini-batches of batch_size whose gradients make one optimiser step (an "
        "effective batch of batch_size x this, at one mini-batch's memory); local_steps counts "
        "optimiser steps; an epoch's last step takes the mini-batches left",
    )
    warmup_epochs: int = Field(
        5,
        ge=2,
        le=10_000,
        description="epochs of the warm-up at each layer's r_max whose loss curve gives learning "
        "difficulty (autorank with that criterion only)",
    )
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd",
        description="clients' optimiser (also of the warm-up): sgd, adam, or adamw (adam with "
        "decoupled weight decay, as language models are fine-tuned)",
    )
    lr: float = Field(
        0.05,
        gt=0.0,
        description="learning rate of the clients and of the server's pre-training (on synthetic "
        "data 0.01, FedProx's, unless set)",
    )
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd momentum; ignored by adam")
    weight_decay: float = Field(
        0.0,
        ge=0.0,
        description="weight decay: added to the gradient (sgd, adam), or the weights shrunk by "
        "lr * weight_decay each step (adamw)",
    )
    batch_size: int = Field(
        64, ge=1, description="samples per step of a client (and of the server's pre-training)"
    )
    grad_clip: float | None = Field(
        None,
        gt=0.0,
        description="clip each client's gradients to this global L2 norm every step; null: off",
    )
    clients_per_round: int | float | None = Field(
        None,
        description="clients sampled each round (seeded per round): a count, a fraction in "
        "(0, 1], or null for all",
    )

    @model_validator(mode="after")
    def _participation(self) -> TrainingConfig:
        c = self.clients_per_round
        if isinstance(c, float) and not 0.0 < c <= 1.0:
            raise ValueError(f"training.clients_per_round as a fraction must be in (0, 1], got {c}")
        if isinstance(c, int) and c < 1:
            raise ValueError(f"training.clients_per_round must be >= 1, got {c}")
        return self


class AggregationConfig(Section):
    """How the server merges heterogeneous-rank adapters (see autorank.merge.aggregators)."""

    method: AggregatorName = Field(
        "rbla",
        description="rbla (each rank index averaged over the clients that have it), rbla_svd "
        "(rbla re-expressed in its SVD basis), rbla_product (rbla's per-slot weights on the "
        "clients' products, SVD), rbla_tiered (rbla_product within each rank tier), zeropad, "
        "hetlora, flexlora (SVD), fedex (FedAvg of the factors, the exact average's residual "
        "added to the base), flora (stacked, merged into the base), fedavg (uniform only)",
    )
    early_method: AggregatorName | None = Field(
        None,
        description="the merge of rounds 1..early_rounds, e.g. rbla_tiered for a fast start "
        "before method; null: method from the first round",
    )
    early_rounds: int = Field(
        0, ge=0, description="rounds merged with early_method before method takes over"
    )
    early_when: EarlyWhen = Field(
        "always",
        description="always: early_method merges rounds 1..early_rounds; all_labels: only the "
        "early rounds whose merged clients, in every rank tier (per layer, those at or above "
        "each client rank), hold every label the federation holds between them, as under the "
        "double imbalance; method merges the others",
    )

    @model_validator(mode="after")
    def _schedule(self) -> AggregationConfig:
        if (self.early_method is None) != (self.early_rounds == 0):
            raise ValueError(
                "aggregation.early_method and aggregation.early_rounds go together: set both "
                f"(got early_method {self.early_method!r}, early_rounds {self.early_rounds})"
            )
        if self.early_method is None and self.early_when != "always":
            raise ValueError(
                f"aggregation.early_when {self.early_when!r} needs an early merge: set "
                "early_method and early_rounds, or leave early_when at 'always'"
            )
        if self.early_method is not None and self.early_method == self.method:
            raise ValueError(
                f"aggregation.early_method is aggregation.method ({self.method!r}): name another "
                "merge for the first rounds, or leave early_method unset"
            )
        if self.early_method is not None and "flora" in (self.early_method, self.method):
            raise ValueError(
                "aggregation.early_method cannot switch to or from flora, which merges the "
                "adapters into the base and hands out fresh ones"
            )
        return self

    @property
    def updates_base(self) -> bool:
        """Whether a merge of this schedule writes into the frozen base (flora, fedex)."""
        return bool({self.method, self.early_method} & set(BASE_UPDATING))

    def method_at(self, round_idx: int, *, labels_covered: bool = True) -> AggregatorName:
        """The merge of round ``round_idx`` (1-based); ``labels_covered``: whether every rank
        tier's clients hold every label (``aggregation.tier_label_gap``), which
        ``early_when: all_labels`` asks for."""
        early = self.early_when == "always" or labels_covered
        if self.early_method is not None and round_idx <= self.early_rounds and early:
            return self.early_method
        return self.method

    @property
    def methods(self) -> tuple[AggregatorName, ...]:
        """Every merge the run uses."""
        return (self.method,) if self.early_method is None else (self.early_method, self.method)

    @property
    def label(self) -> str:
        """The merge's name in run names and tables: ``method``, or
        ``<early><rounds>[@<when>]+<method>`` with an early merge (``rbla_tiered5+rbla_product``;
        ``rbla_tiered5@all_labels+rbla_product`` when it depends on the labels)."""
        if self.early_method is None:
            return self.method
        when = "" if self.early_when == "always" else f"@{self.early_when}"
        return f"{self.early_method}{self.early_rounds}{when}+{self.method}"


_SCHEDULE = re.compile(r"^([a-z_]+?)([1-9]\d*)(?:@([a-z_]+))?\+([a-z_]+)$")


def aggregation_fields(label: str) -> dict[str, Any]:
    """An ``AggregationConfig.label`` as its fields: ``rbla`` -> ``{method: rbla}``,
    ``rbla_tiered5+rbla_product`` -> ``{early_method: rbla_tiered, early_rounds: 5,
    early_when: always, method: rbla_product}``; ``rbla_tiered5@all_labels+rbla_product`` has
    ``early_when: all_labels``. The names are not checked here."""
    match = _SCHEDULE.match(label)
    if match is None:
        return {"method": label}
    fields = {"early_method": match[1], "early_rounds": int(match[2])}
    return fields | {"early_when": match[3] or "always", "method": match[4]}
