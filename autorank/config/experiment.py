"""One federated experiment, end to end: the sections and the checks that span them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from autorank.config.data import DataConfig, PartitionConfig
from autorank.config.model import LoraConfig, ModelConfig
from autorank.config.ranking import RankingConfig
from autorank.config.runtime import RuntimeConfig, TrackingConfig
from autorank.config.training import AggregationConfig, TrainingConfig
from autorank.config.vocab import (
    KEYED_TEXT,
    TEXT_DATA,
    TEXT_MODELS,
    UNLABELLED_TEXT,
    Section,
    Seed,
)

SYNTHETIC_LR = 0.01  # FedProx's learning rate for Synthetic(alpha, beta)


class ExperimentConfig(Section):
    """One federated experiment, end to end."""

    seed: Seed = Field(
        0,
        description="the experiment's seed: data split, partition, base and LoRA init, client "
        "sampling and batch order all derive from it",
    )
    data: DataConfig = Field(DataConfig(), description="the dataset and its test split")
    partition: PartitionConfig = Field(
        PartitionConfig(), description="how the training data is divided among the clients"
    )
    model: ModelConfig = Field(ModelConfig(), description="the frozen base model clients adapt")
    lora: LoraConfig = Field(
        LoraConfig(), description="LoRA adapters: target layers, rank bounds, scale"
    )
    ranking: RankingConfig = Field(RankingConfig(), description="which client gets which rank")
    training: TrainingConfig = Field(
        TrainingConfig(), description="local training and the round schedule"
    )
    aggregation: AggregationConfig = Field(
        AggregationConfig(), description="how the server merges the clients' adapters"
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,  # reads the environment
        description="where and under which names MLflow records the run",
    )
    runtime: RuntimeConfig = Field(
        RuntimeConfig(),
        description="where and how clients train: device, engine, parallelism, checkpoints",
    )

    @model_validator(mode="before")
    @classmethod
    def _synthetic_rate(cls, raw: Any) -> Any:
        """On synthetic data an unset ``training.lr`` is FedProx's 0.01 for it, not 0.05 (at
        0.05 a client of a 100,000-client population diverged in round 1, measured)."""
        if not isinstance(raw, dict):
            return raw
        data, training = raw.get("data"), raw.get("training")
        name = data.get("name") if isinstance(data, dict) else getattr(data, "name", None)
        if name != "synthetic":
            return raw
        if isinstance(training, TrainingConfig):
            if "lr" in training.model_fields_set:
                return raw
            training = training.model_copy(update={"lr": SYNTHETIC_LR})
        elif training is None or isinstance(training, dict):
            if "lr" in (training or {}):
                return raw
            training = {**(training or {}), "lr": SYNTHETIC_LR}
        return {**raw, "training": training}

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        c = self.training.clients_per_round
        if isinstance(c, int) and c > self.partition.n_clients:
            raise ValueError(
                f"training.clients_per_round ({c}) exceeds partition.n_clients "
                f"({self.partition.n_clients})"
            )
        if "fedavg" in self.aggregation.methods and self.ranking.assigner != "uniform":
            raise ValueError(
                f"aggregation.{self._fedavg_field()} 'fedavg' needs equal ranks: set "
                f"ranking.assigner to 'uniform' (got '{self.ranking.assigner}')"
            )
        early = self.aggregation.early_rounds
        if early >= self.training.rounds:
            raise ValueError(
                f"aggregation.early_rounds ({early}) must be below training.rounds "
                f"({self.training.rounds}), or aggregation.method would never merge"
            )
        if self.ranking.rerank_every:
            self._check_reranking()
        if self.ranking.difficulty_from == "first_participation":
            self._check_first_participation()
        self._check_early_when()
        self._check_text()
        return self

    def _check_text(self) -> None:
        """Text data needs a model that reads tokens, and such a model needs text data; a
        natural partition needs the column that names each sample's client."""
        keyed = self.data.key_column is not None or self.data.name in KEYED_TEXT
        if self.partition.scheme == "natural" and not keyed:
            raise ValueError(
                "partition.scheme 'natural' needs data.key_column (the column whose values "
                "are the clients)"
            )
        for field in ("train_keys", "test_keys"):
            if getattr(self.data, field) is not None and not keyed:
                raise ValueError(
                    f"data.{field} names natural clients; expected keyed text (data.name kjv, "
                    "or a text file with data.key_column)"
                )
        overlap = set(self.data.train_keys or ()) & set(self.data.test_keys or ())
        if overlap:
            raise ValueError(
                f"data.train_keys and data.test_keys share {sorted(overlap)}; expected a client "
                "either trained on or held out"
            )
        if self.data.name in UNLABELLED_TEXT and self.model.name != "causal_lm":
            raise ValueError(
                f"data.name {self.data.name!r} has no labels; expected model.name 'causal_lm' "
                f"(got {self.model.name!r})"
            )
        text_data, text_model = self.data.name in TEXT_DATA, self.model.name in TEXT_MODELS
        if text_data and not text_model:
            raise ValueError(
                f"data.name {self.data.name!r} is text; expected model.name one of "
                f"{list(TEXT_MODELS)} (got {self.model.name!r})"
            )
        if text_model and not text_data:
            raise ValueError(
                f"model.name {self.model.name!r} reads text; expected data.name one of "
                f"{list(TEXT_DATA)} (got {self.data.name!r})"
            )

    def _check_early_when(self) -> None:
        """all_labels decides from the ranks of the early rounds: no re-ranking among them."""
        every, early = self.ranking.rerank_every, self.aggregation.early_rounds
        if self.aggregation.early_when == "all_labels" and 0 < every < early:
            raise ValueError(
                f"aggregation.early_when 'all_labels' decides from the ranks of rounds 1-{early}: "
                f"ranking.rerank_every ({every}) must be at least aggregation.early_rounds "
                f"({early}), or 0"
            )

    def _fedavg_field(self) -> str:
        return "method" if self.aggregation.method == "fedavg" else "early_method"

    def difficulty_mode(self) -> Literal["warmup", "first_participation"] | None:
        """Where learning difficulty is measured (None: the ranks do not use it).

        ``auto`` measures it from each client's first participation when the warm-up would
        train more clients than the whole run does (a population beyond rounds x the clients
        of a round), and where nothing needs every client's rank at once (a parameter budget,
        re-ranking, an early merge waiting for labels); else from the paper's warm-up.
        """
        r = self.ranking
        if not self._uses_learning_difficulty():
            return None
        if r.difficulty_from != "auto":
            return r.difficulty_from
        n, per_round = self.partition.n_clients, self.training.clients_per_round
        if isinstance(per_round, float):
            per_round = max(1, round(per_round * n))
        trained = self.training.rounds * (per_round or n)
        if n <= trained or self._first_participation_conflict() is not None:
            return "warmup"
        return "first_participation"

    def _first_participation_conflict(self) -> str | None:
        """What needs every client's rank before round 1 (None: nothing)."""
        if self.ranking.budget_params is not None:
            return "ranking.budget_params (a budget scales every client's rank at once)"
        if self.ranking.rerank_every:
            return "ranking.rerank_every (it re-decides every client's rank)"
        if self.aggregation.early_when == "all_labels" and self.aggregation.early_method:
            return "aggregation.early_when all_labels (it checks every round's rank tiers)"
        if self.training.local_epochs < 2:
            return "training.local_epochs below 2 (a first round's loss curve needs 2 epochs)"
        return None

    def _uses_learning_difficulty(self) -> bool:
        """The autorank assigner with learning difficulty among its criteria."""
        r = self.ranking
        return r.assigner == "autorank" and "learning_difficulty" in r.criteria

    def _require_learning_difficulty(self, setting: str) -> None:
        """Refuse ``setting`` (what measures learning difficulty, as the line opens) unless the
        ranks use it."""
        if not self._uses_learning_difficulty():
            r = self.ranking
            raise ValueError(
                f"{setting} learning difficulty: it needs ranking.assigner 'autorank' with "
                f"'learning_difficulty' in ranking.criteria (got '{r.assigner}', criteria "
                f"{list(r.criteria)})"
            )

    def _check_first_participation(self) -> None:
        self._require_learning_difficulty("ranking.difficulty_from 'first_participation' measures")
        conflict = self._first_participation_conflict()
        if conflict is not None:
            raise ValueError(
                f"ranking.difficulty_from 'first_participation' decides each client's rank when "
                f"it first trains; expected no {conflict}"
            )

    def _check_reranking(self) -> None:
        """Re-ranking measures learning difficulty again: autorank only, from >= 2 epochs."""
        self._require_learning_difficulty("ranking.rerank_every re-measures")
        if self.training.local_epochs < 2:
            raise ValueError(
                "ranking.rerank_every measures a loss curve over the local epochs: it needs "
                f"training.local_epochs >= 2 (got {self.training.local_epochs})"
            )

    @model_validator(mode="after")
    def _caps_fit(self) -> ExperimentConfig:
        """Rank caps name existing clients, reach every layer's r_min, and leave fedavg alone."""
        r = self.ranking
        floor = max([self.lora.r_min, *(x.r_min for x in self.lora.layer_ranges.values())])
        r.check_caps(range(self.partition.n_clients), floor)
        if "fedavg" in self.aggregation.methods and r.named_caps():
            raise ValueError(
                f"aggregation.{self._fedavg_field()} 'fedavg' needs equal ranks: "
                "ranking.rank_caps and ranking.cap_tiers give capped clients lower ranks"
            )
        return self
