"""The experiment configuration: one validated object, loaded from YAML, sliced for the library.

Every field has a default, so an empty YAML file is the quickstart experiment: digits, 10 clients,
the paper's double imbalance, AutoRank ranks and RBLA aggregation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Which dataset, from where, and how its test split is made when it ships none."""

    name: str = Field(
        "digits",
        description="digits (embedded), mnist5k, mnist or fashion_mnist (IDX files in "
        "path), parquet (path), or hf:<Hub dataset name> (needs internet)",
    )
    path: Path | None = Field(
        None,
        description="mnist / fashion_mnist: folder of the four IDX files (fashion_mnist defaults "
        "to /usr/share/datasets/fashion-mnist); parquet: a .parquet file or a folder with "
        "train.parquet (and test.parquet); ignored by digits and mnist5k",
    )
    test_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="share of the samples held out (stratified) as the global test split; only "
        "for data that ships no test split (digits, mnist5k, parquet or hf without one)",
    )
    max_train_samples: int | None = Field(
        None,
        gt=0,
        description="keep a stratified subsample of this many training samples (before the "
        "server's pre-training share and the partition), for quick runs; null: all",
    )


class PartitionConfig(_Section):
    """How the training split is divided among clients (see autorank.partition)."""

    scheme: Scheme = Field(
        "double_imbalance",
        description="iid (equal shuffled parts), dirichlet (label skew, alpha), shards "
        "(label-sorted shards), quantity_skew (log-normal sizes), double_imbalance (client i "
        "holds classes 0..i, so both labels and size grow with i)",
    )
    n_clients: int = Field(
        10, ge=1, description="clients the training data (less the server's share) is split among"
    )
    alpha: float = Field(
        0.5,
        gt=0.0,
        description="dirichlet: concentration of each class's draw over the clients; smaller "
        "means fewer classes per client",
    )
    min_size: int = Field(
        1,
        ge=1,
        description="dirichlet: redraw (up to 100 times) until every client holds at least this "
        "many samples",
    )
    shards_per_client: int = Field(
        2,
        ge=1,
        description="shards: label-sorted shards dealt to each client, so that each holds about "
        "this many classes",
    )
    quantity_sigma: float = Field(
        1.0,
        gt=0.0,
        description="quantity_skew: sigma of the log-normal client sizes; larger means more "
        "uneven sizes",
    )
    local_test_fraction: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="share of each client's samples held out for its personalised accuracy "
        "(0: none; every client keeps at least one training sample)",
    )


class ModelConfig(_Section):
    """The frozen base model that clients adapt."""

    name: Literal["mlp", "cnn", "hf"] = Field(
        "mlp",
        description="mlp (hidden layers fc1..fcN, then head), cnn (conv1, conv2, fc1, head), or "
        "hf (a transformers image classifier from hf_name_or_path)",
    )
    hidden: tuple[int, ...] = Field(
        (200, 200),
        description="hidden widths: mlp's fc1..fcN (their count sets the default LoRA targets); "
        "cnn uses the first as fc1's width; hf ignores it",
    )
    hf_name_or_path: str | None = Field(
        None,
        description="model.name hf: transformers model folder or Hub name; its classifier is "
        "resized to the dataset's classes",
    )
    init: Literal["random", "safetensors", "pretrain"] = Field(
        "pretrain",
        description="base weights: random (seeded), safetensors (from weights_path), or pretrain "
        "(the server trains every weight on its public share first)",
    )
    weights_path: Path | None = Field(
        None,
        description="init safetensors: .safetensors file with every weight of the base model "
        "(keys and shapes must match)",
    )
    pretrain_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="init pretrain: share of the training split the server keeps (stratified) "
        "for pre-training; clients never see it; 0: none",
    )
    pretrain_epochs: int = Field(
        5,
        ge=0,
        le=10_000,
        description="init pretrain: epochs of server pre-training (SGD, momentum 0.9, "
        "training.lr and training.batch_size); 0 skips it",
    )

    @model_validator(mode="after")
    def _check_sources(self) -> ModelConfig:
        if self.name == "hf" and not self.hf_name_or_path:
            raise ValueError("model.hf_name_or_path is required when model.name is 'hf'")
        if self.init == "safetensors" and self.weights_path is None:
            raise ValueError("model.weights_path is required when model.init is 'safetensors'")
        return self


class LayerRange(_Section):
    """Rank bounds of one adapted layer."""

    r_min: int = Field(ge=1, description="smallest rank this layer gets")
    r_max: int = Field(
        ge=1, description="largest rank this layer gets; at most the layer's smaller dimension"
    )

    @model_validator(mode="after")
    def _ordered(self) -> LayerRange:
        if self.r_min > self.r_max:
            raise ValueError(f"r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        return self


class LoraConfig(_Section):
    """LoRA adapters: targets, rank bounds, and how alpha depends on rank."""

    target_modules: tuple[str, ...] | None = Field(
        None,
        description="modules that get adapters (a module's name or the end of its path); null: "
        "the model's default (mlp fc1..fcN; cnn conv1, conv2, fc1; hf query/value projections)",
    )
    r_min: int = Field(
        2, ge=1, description="smallest rank a client gets (global range; layer_ranges overrides it)"
    )
    r_max: int = Field(
        32,
        ge=1,
        description="largest rank a client gets (global range; layer_ranges overrides it); must "
        "fit every adapted layer's smaller dimension",
    )
    layer_ranges: dict[str, LayerRange] = Field(
        default_factory=dict,
        description="per adapted layer {r_min, r_max} replacing the global range for that layer, "
        "keyed by target module name, e.g. {fc1: {r_min: 4, r_max: 160}}",
    )
    alpha_policy: Literal["fixed", "proportional", "rslora"] = Field(
        "proportional",
        description="how the LoRA scale depends on rank r: fixed alpha/r; proportional "
        "alpha_ratio at every rank (lora_alpha = alpha_ratio*r); rslora alpha/sqrt(r)",
    )
    alpha: float = Field(
        16.0,
        gt=0.0,
        description="LoRA alpha of the fixed and rslora policies; unused by proportional",
    )
    alpha_ratio: float = Field(
        2.0,
        gt=0.0,
        description="proportional policy: the LoRA scale at every rank; unused by fixed and rslora",
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="LoRA dropout probability; above 0 clients train on the sequential engine "
        "and runs are no longer exactly reproducible",
    )

    @model_validator(mode="after")
    def _ordered(self) -> LoraConfig:
        if self.r_min > self.r_max:
            raise ValueError(f"lora.r_min ({self.r_min}) must not exceed lora.r_max ({self.r_max})")
        return self

    def range_of(self, layer: str) -> tuple[int, int]:
        """The [r_min, r_max] of one layer: its own entry, else the global range."""
        own = self.layer_ranges.get(layer)
        return (own.r_min, own.r_max) if own else (self.r_min, self.r_max)


class CapTier(_Section):
    """A class of client devices: the largest rank they hold, and how common they are."""

    rank: int = Field(ge=1, description="the largest rank a device of this tier can hold")
    share: float = Field(
        gt=0.0, le=1.0, description="the probability that a client is drawn into this tier"
    )


class RankingConfig(_Section):
    """Which rank assigner, and its knobs (see autorank.ranks)."""

    assigner: AssignerName = Field(
        "autorank",
        description="who gets which rank: autorank (CRITIC + TOPSIS over criteria), uniform, "
        "manual (by labels held), random or heavy_tail (FlexLoRA levels), size (by samples)",
    )
    criteria: tuple[Criterion, ...] = Field(
        (
            "entropy",
            "gini_simpson",
            "n_samples",
            "learning_difficulty",
        ),
        description="autorank: the client profile scored by CRITIC and TOPSIS; "
        "learning_difficulty adds a warm-up round (training.warmup_epochs)",
    )
    uniform_rank: int | None = Field(
        None,
        ge=1,
        description="uniform: everyone's rank, within [lora.r_min, lora.r_max] and clamped per "
        "layer; null: lora.r_max",
    )
    equal_policy: Literal["max", "mid"] = Field(
        "max",
        description="autorank: when all closeness scores are equal everyone gets r_max (max) or "
        "the middle of the range (mid)",
    )
    layer_mapping: Literal["scale", "clamp"] = Field(
        "scale",
        description="autorank: scale maps closeness into each layer's own range; clamp maps into "
        "the global range, then clamps per layer",
    )
    rerank_every: int = Field(
        0,
        ge=0,
        description="re-rank every N rounds: after rounds N, 2N, ... the learning difficulty "
        "of each trained client is measured again from that round's loss curve, ranks are "
        "decided again and the clients' adapters re-sized; needs the autorank assigner with "
        "learning_difficulty and training.local_epochs >= 2; 0: ranks fixed after the warm-up",
    )
    heavy_tail_exponent: float = Field(
        2.0,
        gt=0.0,
        description="heavy_tail: a in P(level k) ~ (k + 1)^-a over the geometric rank levels; "
        "larger gives more clients the lowest ranks",
    )
    budget_params: int | None = Field(
        None,
        ge=1,
        description="total trainable LoRA parameters over all clients (sum of r * (d_in + d_out) "
        "over every client's adapted modules; the head not counted): the assigner's ranks are "
        "scaled by the largest common factor that fits (above 1 for an ample budget), within "
        "each layer's range and the caps; null: no budget",
    )
    rank_caps: dict[int, int] = Field(
        default_factory=dict,
        description="client index -> the largest rank its device can hold, in every adapted "
        "layer (at least every layer's r_min); wins over a drawn cap_tiers entry, e.g. {0: 4}",
    )
    cap_tiers: tuple[CapTier, ...] = Field(
        (),
        description="device tiers [{rank, share}, ...]: every client not in rank_caps is drawn "
        "a tier (seeded by seed), the share its probability (shares sum to 1), and holds at "
        "most that rank; empty: no tiers",
    )

    @model_validator(mode="after")
    def _criteria_unique(self) -> RankingConfig:
        if not self.criteria:
            raise ValueError("ranking.criteria must name at least one criterion")
        if len(set(self.criteria)) != len(self.criteria):
            raise ValueError(f"ranking.criteria has duplicates: {list(self.criteria)}")
        return self

    @model_validator(mode="after")
    def _caps_valid(self) -> RankingConfig:
        for client, cap in self.rank_caps.items():
            if client < 0 or cap < 1:
                raise ValueError(
                    f"ranking.rank_caps {{{client}: {cap}}}: expected a client index >= 0 and a "
                    "cap >= 1"
                )
        total = sum(t.share for t in self.cap_tiers)
        if self.cap_tiers and abs(total - 1.0) > 1e-9:
            shares = [t.share for t in self.cap_tiers]
            raise ValueError(f"ranking.cap_tiers: shares {shares} sum to {total}; expected 1")
        return self

    def named_caps(self) -> list[int]:
        """Every cap this section names (``rank_caps`` and tiers), sorted and distinct."""
        return sorted({*self.rank_caps.values(), *(t.rank for t in self.cap_tiers)})

    def check_caps(self, clients: Sequence[int], floor: int) -> None:
        """Refuse ``rank_caps`` of clients not in ``clients`` and caps below ``floor`` (the
        largest ``r_min`` of the adapted layers): one line each, as ``ValueError``."""
        unknown = sorted(set(self.rank_caps) - set(clients))
        if unknown:
            known = list(clients)
            expected = (
                f"indices below partition.n_clients ({len(known)})"
                if known == list(range(len(known)))
                else f"some of {known}"
            )
            raise ValueError(f"ranking.rank_caps names clients {unknown}; expected {expected}")
        low = [cap for cap in self.named_caps() if cap < floor]
        if low:
            raise ValueError(
                f"ranking.rank_caps / ranking.cap_tiers: caps {low} are below the r_min {floor} "
                "of lora (and its layer_ranges); expected caps >= every adapted layer's r_min"
            )


class TrainingConfig(_Section):
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
    warmup_epochs: int = Field(
        5,
        ge=2,
        le=10_000,
        description="epochs of the warm-up at each layer's r_max whose loss curve gives learning "
        "difficulty (autorank with that criterion only)",
    )
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="clients' optimiser (also of the warm-up): sgd or adam"
    )
    lr: float = Field(
        0.05, gt=0.0, description="learning rate of the clients and of the server's pre-training"
    )
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd momentum; ignored by adam")
    weight_decay: float = Field(
        0.0, ge=0.0, description="L2 weight decay added to the gradient (sgd and adam)"
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


class AggregationConfig(_Section):
    """How the server merges heterogeneous-rank adapters (see autorank.aggregation)."""

    method: AggregatorName = Field(
        "rbla",
        description="rbla (each rank index averaged over the clients that have it), rbla_svd "
        "(rbla re-expressed in its SVD basis), rbla_product (rbla's per-slot weights on the "
        "clients' products, SVD), rbla_tiered (rbla_product within each rank tier), zeropad, "
        "hetlora, flexlora (SVD), flora (stacked, merged into the base), fedavg (uniform only)",
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


DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


class TrackingConfig(_Section):
    """Where MLflow records go."""

    uri: str = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
        description="MLflow tracking URI: this setting, else MLFLOW_TRACKING_URI, else "
        f"{DEFAULT_TRACKING_URI}",
    )
    experiment: str = Field("autorank", min_length=1, description="MLflow experiment of the run")
    run_name: str | None = Field(
        None, description="MLflow run name; null: <assigner>-<aggregator>-<dataset>-s<seed>"
    )
    parent_run_id: str | None = Field(
        None, description="nest the run under this MLflow run (set by comparison grids)"
    )
    keyed_clients_max: int = Field(
        20,
        ge=0,
        description="per-client metric keys (per_client/cNN/...) only up to this many clients; "
        "above it per-client values go to one table artifact per round",
    )
    client_table_every: int = Field(
        1, ge=1, description="write the per-client table artifact every N rounds and the last"
    )
    log_model: bool = Field(
        True,
        description="log the final global model as the MLflow model `model` at the end of the "
        "run (MLflow checks its requirements: the slowest record of a small run); false: the "
        "adapter and base files only",
    )
    register_as: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[^/:'\"]+$",
        description="register the run's MLflow model as a new version of this registered model "
        "(no / : or quotes); null: log it without registering",
    )

    @model_validator(mode="after")
    def _registering_needs_a_model(self) -> TrackingConfig:
        if self.register_as is not None and not self.log_model:
            raise ValueError(
                f"register_as {self.register_as!r} needs the model logged: set log_model to true"
            )
        return self


class RuntimeConfig(_Section):
    """Where and how the clients train."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: CUDA when present (cohort i on GPU i mod n), else the CPU; cpu; cuda "
        "(refused without CUDA)",
    )
    backend: Literal["auto", "sequential", "batched"] = Field(
        "auto",
        description="batched: a cohort's clients in one forward/backward per step; sequential: "
        "one client after another on peft models; auto: batched where the model allows it "
        "(not for LoRA on convolutions on a CPU)",
    )
    task_runner: Literal["threads", "dask"] = Field(
        "threads",
        description="threads: cohort tasks on a thread pool in this process; dask: on the Dask "
        "cluster at dask_address",
    )
    max_workers: int | None = Field(
        None,
        ge=1,
        description="parallel cohort tasks, and cohorts per round without cohort_size; null: one "
        "per CPU core",
    )
    cohort_size: int | None = Field(
        None,
        ge=1,
        description="clients per cohort task; null: one cohort per worker (the batched engine "
        "on a CPU splits a round only where each cohort has enough work to keep a core busy)",
    )
    batch_clients: int = Field(
        64,
        ge=1,
        description="batched engine: clients trained together in one step at most (a larger "
        "cohort goes in chunks; bounds activation memory)",
    )
    threads_per_client: int = Field(
        1,
        ge=1,
        description="torch CPU threads of every task (cohorts, server, set-up); at most the cores",
    )
    dask_address: str | None = Field(
        None, description="task_runner dask: tcp://host:port of an existing Dask scheduler"
    )
    dask_resources: dict[str, float] = Field(
        default_factory=dict,
        description="task_runner dask: worker resources each cohort task needs, e.g. {GPU: 1}",
    )
    checkpoint_dir: Path = Field(
        Path("mlruns/checkpoints"),
        description="folder of the per-round checkpoints, one subfolder per run id (autorank "
        "resume --checkpoint-dir)",
    )

    @model_validator(mode="after")
    def _dask_needs_address(self) -> RuntimeConfig:
        if self.task_runner == "dask" and not self.dask_address:
            raise ValueError("runtime.dask_address is required when runtime.task_runner is 'dask'")
        return self


class ExperimentConfig(_Section):
    """One federated experiment, end to end."""

    seed: int = Field(
        0,
        ge=0,
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
        self._check_early_when()
        return self

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

    def _check_reranking(self) -> None:
        """Re-ranking measures learning difficulty again: autorank only, from >= 2 epochs."""
        r = self.ranking
        if r.assigner != "autorank" or "learning_difficulty" not in r.criteria:
            raise ValueError(
                "ranking.rerank_every re-measures learning difficulty: it needs ranking.assigner "
                f"'autorank' with 'learning_difficulty' in ranking.criteria (got '{r.assigner}', "
                f"criteria {list(r.criteria)})"
            )
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


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line for the user."""


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown setting (check the spelling; see configs/default.yaml)"
    if msg.startswith(f"{where}."):  # a section's own check names its setting already
        return msg
    if (
        "input" in first
        and first["type"] not in ("missing",)
        and not isinstance(first["input"], dict)
    ):
        return f"{where}: {msg} (got {first['input']!r})"
    return f"{where}: {msg}"


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a plain mapping into an ExperimentConfig, raising ConfigError with one line."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {assignment!r}: expected key=value, e.g. partition.n_clients=20"
        )
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (it would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                    "(expected each setting once)"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping from a file, raising ConfigError for a missing or malformed file."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except ConfigError as err:
        raise ConfigError(f"config file {str(path)!r}, {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping, got {type(raw).__name__}"
        )
    return raw


def load_config(
    path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load a YAML config (or the defaults), apply ``key=value`` overrides, and validate."""
    raw = read_yaml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_config(raw)


def flatten(config: ExperimentConfig) -> dict[str, str]:
    """The config as dotted keys (``partition.n_clients``) to strings, for tracking params."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(value)

    walk("", config.model_dump(mode="json"))
    return out


def to_yaml(config: ExperimentConfig) -> str:
    """The config as YAML text that ``load_config`` reads back to an equal object."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def json_digest(payload: Any) -> str:
    """A short, stable digest of a JSON-ready value (keys sorted)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def config_digest(config: ExperimentConfig) -> str:
    """A digest of everything that changes results (not where they are tracked or run)."""
    payload = config.model_dump(mode="json", exclude={"tracking", "runtime"})
    if payload["training"]["clients_per_round"] is None:
        del payload["training"]["clients_per_round"]  # full participation: digests as before
    unset: dict[str, dict[str, Any]] = {
        "ranking": {"budget_params": None, "rank_caps": {}, "cap_tiers": []},
        "aggregation": {"early_method": None, "early_rounds": 0, "early_when": "always"},
    }
    for section, defaults in unset.items():
        for name, default in defaults.items():
            if payload[section][name] == default:
                del payload[section][name]  # not set: digests as before these settings existed
    return json_digest(payload)
