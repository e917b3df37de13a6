"""The experiment configuration: one validated object, loaded from YAML, sliced for the library.

Every field has a default, so an empty YAML file is the quickstart experiment: digits, 10 clients,
the paper's double imbalance, AutoRank ranks and RBLA aggregation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Scheme = Literal["iid", "dirichlet", "shards", "quantity_skew", "double_imbalance"]
Criterion = Literal["entropy", "gini_simpson", "n_samples", "learning_difficulty"]
AssignerName = Literal["autorank", "uniform", "manual", "random", "heavy_tail", "size"]
AggregatorName = Literal["fedavg", "zeropad", "hetlora", "rbla", "flexlora", "flora"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Which dataset, from where, and how its test split is made when it ships none."""

    name: str = Field(
        "digits",
        description="digits | mnist5k | mnist | fashion_mnist | parquet | hf:<hub dataset name>",
    )
    path: Path | None = Field(None, description="IDX folder or parquet file/folder, when needed")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    max_train_samples: int | None = Field(None, gt=0, description="subsample for quick runs")


class PartitionConfig(_Section):
    """How the training split is divided among clients (see autorank.partition)."""

    scheme: Scheme = "double_imbalance"
    n_clients: int = Field(10, ge=1)
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration")
    min_size: int = Field(1, ge=1, description="smallest client the Dirichlet scheme accepts")
    shards_per_client: int = Field(2, ge=1)
    quantity_sigma: float = Field(1.0, gt=0.0, description="log-normal sigma of quantity skew")
    local_test_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of each client's data held out for personal eval"
    )


class ModelConfig(_Section):
    """The frozen base model that clients adapt."""

    name: Literal["mlp", "cnn", "hf"] = "mlp"
    hidden: tuple[int, ...] = (200, 200)
    hf_name_or_path: str | None = Field(None, description="transformers model folder or Hub name")
    init: Literal["random", "safetensors", "pretrain"] = "pretrain"
    weights_path: Path | None = None
    pretrain_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="public share of train data for server pre-training"
    )
    pretrain_epochs: int = Field(5, ge=0, le=10_000)

    @model_validator(mode="after")
    def _check_sources(self) -> ModelConfig:
        if self.name == "hf" and not self.hf_name_or_path:
            raise ValueError("model.hf_name_or_path is required when model.name is 'hf'")
        if self.init == "safetensors" and self.weights_path is None:
            raise ValueError("model.weights_path is required when model.init is 'safetensors'")
        return self


class LayerRange(_Section):
    """Rank bounds of one adapted layer."""

    r_min: int = Field(ge=1)
    r_max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> LayerRange:
        if self.r_min > self.r_max:
            raise ValueError(f"r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        return self


class LoraConfig(_Section):
    """LoRA adapters: targets, rank bounds, and how alpha depends on rank."""

    target_modules: tuple[str, ...] | None = Field(None, description="None: the model's default")
    r_min: int = Field(2, ge=1)
    r_max: int = Field(32, ge=1)
    layer_ranges: dict[str, LayerRange] = Field(
        default_factory=dict, description="per-layer [r_min, r_max] overriding the global range"
    )
    alpha_policy: Literal["fixed", "proportional", "rslora"] = Field(
        "proportional",
        description="fixed: scale alpha/r; proportional: alpha = alpha_ratio*r (constant scale); "
        "rslora: scale alpha/sqrt(r)",
    )
    alpha: float = Field(16.0, gt=0.0)
    alpha_ratio: float = Field(2.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> LoraConfig:
        if self.r_min > self.r_max:
            raise ValueError(f"lora.r_min ({self.r_min}) must not exceed lora.r_max ({self.r_max})")
        return self

    def range_of(self, layer: str) -> tuple[int, int]:
        """The [r_min, r_max] of one layer: its own entry, else the global range."""
        own = self.layer_ranges.get(layer)
        return (own.r_min, own.r_max) if own else (self.r_min, self.r_max)


class RankingConfig(_Section):
    """Which rank assigner, and its knobs (see autorank.ranks)."""

    assigner: AssignerName = "autorank"
    criteria: tuple[Criterion, ...] = (
        "entropy",
        "gini_simpson",
        "n_samples",
        "learning_difficulty",
    )
    uniform_rank: int | None = Field(None, ge=1, description="uniform assigner; None means r_max")
    equal_policy: Literal["max", "mid"] = Field(
        "max", description="rank for everyone when all closeness scores are equal"
    )
    layer_mapping: Literal["scale", "clamp"] = Field(
        "scale",
        description="scale: map closeness into each layer's own range; "
        "clamp: map into the global range, then clamp per layer",
    )
    rerank_every: int = Field(0, ge=0, description="reserved: re-ranking every T rounds; only 0")
    heavy_tail_exponent: float = Field(2.0, gt=0.0)

    @model_validator(mode="after")
    def _criteria_unique(self) -> RankingConfig:
        if not self.criteria:
            raise ValueError("ranking.criteria must name at least one criterion")
        if len(set(self.criteria)) != len(self.criteria):
            raise ValueError(f"ranking.criteria has duplicates: {list(self.criteria)}")
        if self.rerank_every:
            raise ValueError(
                "re-ranking during training is not supported yet (ranks are fixed after the "
                "warm-up); expected 0"
            )
        return self


class TrainingConfig(_Section):
    """Local training and the round schedule."""

    rounds: int = Field(20, ge=1, le=100_000)
    local_epochs: int = Field(5, ge=1, le=10_000)
    warmup_epochs: int = Field(
        5, ge=2, le=10_000, description="E >= 2 epochs for learning difficulty"
    )
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(64, ge=1)
    grad_clip: float | None = Field(None, gt=0.0)
    clients_per_round: int | float | None = Field(
        None,
        description="clients sampled each round: a count, a fraction in (0, 1], or None for all",
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

    method: AggregatorName = "rbla"


DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


class TrackingConfig(_Section):
    """Where MLflow records go."""

    uri: str = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
        description="MLflow tracking URI: this setting, else MLFLOW_TRACKING_URI, else "
        f"{DEFAULT_TRACKING_URI}",
    )
    experiment: str = Field("autorank", min_length=1)
    run_name: str | None = None
    parent_run_id: str | None = Field(None, description="nest the run under this run (grids)")
    keyed_clients_max: int = Field(
        20,
        ge=0,
        description="per-client metric keys (per_client/cNN/...) only up to this many clients; "
        "above it per-client values go to one table artifact per round",
    )
    client_table_every: int = Field(
        1, ge=1, description="write the per-client table artifact every N rounds"
    )


class RuntimeConfig(_Section):
    """Where and how the clients train."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "sequential", "batched"] = Field(
        "auto",
        description="batched: a cohort's clients in one forward/backward per step; sequential: "
        "one client after another on peft models; auto: batched where the model allows it",
    )
    task_runner: Literal["threads", "dask"] = "threads"
    max_workers: int | None = Field(None, ge=1, description="parallel cohort tasks; None = cores")
    cohort_size: int | None = Field(
        None,
        ge=1,
        description="clients per cohort task; None: one cohort per worker (the batched engine "
        "on a CPU splits a round only where each cohort has enough work to keep a core busy)",
    )
    batch_clients: int = Field(
        64, ge=1, description="batched backend: clients trained together in one step at most"
    )
    threads_per_client: int = Field(
        1, ge=1, description="torch CPU threads of every task (cohorts, server, set-up)"
    )
    dask_address: str | None = Field(None, description="scheduler of an existing Dask cluster")
    dask_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Dask worker resources each client task needs, e.g. {GPU: 1}",
    )
    checkpoint_dir: Path = Path("mlruns/checkpoints")

    @model_validator(mode="after")
    def _dask_needs_address(self) -> RuntimeConfig:
        if self.task_runner == "dask" and not self.dask_address:
            raise ValueError("runtime.dask_address is required when runtime.task_runner is 'dask'")
        return self


class ExperimentConfig(_Section):
    """One federated experiment, end to end."""

    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    ranking: RankingConfig = RankingConfig()
    training: TrainingConfig = TrainingConfig()
    aggregation: AggregationConfig = AggregationConfig()
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)  # reads the environment
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        c = self.training.clients_per_round
        if isinstance(c, int) and c > self.partition.n_clients:
            raise ValueError(
                f"training.clients_per_round ({c}) exceeds partition.n_clients "
                f"({self.partition.n_clients})"
            )
        if self.aggregation.method == "fedavg" and self.ranking.assigner != "uniform":
            raise ValueError(
                "aggregation.method 'fedavg' needs equal ranks: set ranking.assigner to 'uniform' "
                f"(got '{self.ranking.assigner}')"
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
    return json_digest(payload)
