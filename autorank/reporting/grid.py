"""Comparison grids: which methods run side by side, and how their results are summarised.

A grid crosses rank assigners with aggregators and seeds over one shared experiment (``base``),
so every method sees the same partitions, base model and seeds. ``expand_grid`` turns a grid
into one ``ExperimentConfig`` per cell; ``reporting.summary`` reduces the cells' histories to one
row per method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from autorank.config import (
    AggregationConfig,
    AggregatorName,
    AssignerName,
    ConfigError,
    ExperimentConfig,
    RunName,
    Seed,
    aggregation_fields,
    apply_override,
    config_digest,
    format_validation_error,
    json_digest,
    read_yaml,
)

MEAN_AUTORANK = "mean_autorank"
BUDGET_AUTORANK = "budget_autorank"
FROM_AUTORANK = (MEAN_AUTORANK, BUDGET_AUTORANK)  # uniform ranks decided by AutoRank's cell


def _known(names: tuple[str, ...], what: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        if isinstance(value, str) and value not in names:
            raise ValueError(f"unknown {what}; expected one of {', '.join(names)}")
        return value

    return BeforeValidator(check)


def _rank_or_mean(value: Any) -> Any:
    if isinstance(value, str) and value not in FROM_AUTORANK:
        raise ValueError(f"expected a rank (an integer), {MEAN_AUTORANK!r} or {BUDGET_AUTORANK!r}")
    return value


def _known_merges(value: Any) -> Any:
    if isinstance(value, str):
        names = get_args(AggregatorName)
        fields = aggregation_fields(value)
        if any(fields.get(k) not in names for k in ("method", "early_method") if k in fields):
            raise ValueError(
                f"unknown aggregator {value!r}; expected one of {', '.join(names)}, or "
                "<early><rounds>[@all_labels]+<aggregator> for an early merge "
                "(rbla_tiered5+rbla_product)"
            )
        if "@always+" in value:
            raise ValueError(
                f"{value!r}: an early merge runs always by default; write "
                f"{value.replace('@always', '')!r}"
            )
        try:
            AggregationConfig.model_validate(fields)
        except ValidationError as err:
            first = err.errors()[0]
            where = "".join(f"aggregation.{name}: " for name in first["loc"])
            raise ValueError(where + first["msg"].removeprefix("Value error, ")) from None
    return value


Assigner = Annotated[AssignerName, _known(get_args(AssignerName), "assigner")]
Aggregator = Annotated[str, BeforeValidator(_known_merges)]
UniformRank = Annotated[
    Annotated[int, Field(ge=1)] | Literal["mean_autorank", "budget_autorank"] | None,
    BeforeValidator(_rank_or_mean),
]


class AssignerSpec(BaseModel):
    """One rank assigner of the grid, with the settings that make it a distinct method.

    ``uniform_rank: mean_autorank`` is uniform at AutoRank's mean rank (the same rank budget):
    the mean of the global-scale ranks AutoRank gave the clients of the same seed, rounded half
    up, taken from the AutoRank cell's ``rank_decision.json`` (so learning difficulty is in it).
    With per-layer ranges narrower than the global one the match is approximate: uniform clamps
    per layer while AutoRank scales into each layer's range (the "params per client" column
    shows both budgets). ``uniform_rank: budget_autorank`` matches the parameters instead: the
    cell's ``ranking.budget_params`` is the LoRA parameters AutoRank's ranks train over all
    clients of the same seed (the decision's ``total_params``), and uniform ranks take the
    largest common scale of every layer's ``r_max`` that fits it (``autorank.ranking.budget``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    assigner: Assigner = Field(description="the rank assigner, as ranking.assigner")
    uniform_rank: UniformRank = Field(
        None,
        description="uniform only: every client's rank, mean_autorank for AutoRank's mean rank of "
        "the same seed, or budget_autorank for the largest uniform ranks within the LoRA "
        "parameters AutoRank's ranks train (at most that budget: rounded down, 1-6 % below it "
        "in measured grids); null: base.lora.r_max",
    )
    rerank_every: int | None = Field(
        None,
        ge=0,
        description="autorank only: ranking.rerank_every of this method (e.g. autorank every 5 "
        "rounds beside plain autorank); null: base.ranking.rerank_every",
    )
    difficulty_from: Literal["warmup", "first_participation"] | None = Field(
        None,
        description="autorank only: ranking.difficulty_from of this method (e.g. autorank from "
        "first participation beside the warm-up's); null: base.ranking.difficulty_from",
    )
    aggregators: tuple[Aggregator, ...] | None = Field(
        None,
        min_length=1,
        description="the aggregators this assigner runs with, instead of the grid's (e.g. "
        "uniform rank 8 with fedavg only, beside AutoRank with several merges); null: the grid's",
    )
    label: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.@+-]+$",
        description="the method's name in run names, tables and plots (letters, digits, _.@+-); "
        "null: from assigner and uniform_rank",
    )

    @model_validator(mode="after")
    def _uniform_only(self) -> AssignerSpec:
        if self.uniform_rank is not None and self.assigner != "uniform":
            raise ValueError(f"uniform_rank is for the uniform assigner, not {self.assigner!r}")
        for name in ("rerank_every", "difficulty_from"):
            if getattr(self, name) is not None and self.assigner != "autorank":
                raise ValueError(f"{name} is for the autorank assigner, not {self.assigner!r}")
        return self

    @property
    def method(self) -> str:
        """The name of this assigner in run names, tables and plots."""
        if self.label:
            return self.label
        if self.uniform_rank in FROM_AUTORANK:
            return f"uniform-{self.uniform_rank}"
        if self.uniform_rank is not None:
            return f"uniform-r{self.uniform_rank}"
        name: str = self.assigner
        if self.rerank_every:
            name += f"-rerank{self.rerank_every}"
        if self.difficulty_from == "first_participation":
            name += "-first"
        return name


MAX_CELLS = 1000  # hours of digits runs on two cores (~25 s each): far more is likely a typo


class GridConfig(BaseModel):
    """A comparison: every assigner x aggregator x seed over one shared experiment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: RunName | None = Field(None, description="parent run name; null: compare-<dataset>")
    base: ExperimentConfig = Field(
        default_factory=ExperimentConfig,  # reads the environment
        description="the experiment every cell runs; a cell sets only its seed, assigner, "
        "uniform rank, aggregator and run name",
    )
    assigners: tuple[AssignerSpec, ...] = Field(
        min_length=1,
        description="rank assigners, each a method: names, or {assigner, uniform_rank, "
        "rerank_every, difficulty_from, aggregators, label}",
    )
    aggregators: tuple[Aggregator, ...] = Field(
        min_length=1,
        description="aggregation methods, crossed with every assigner: names, or "
        "<early><rounds>+<method> (rbla_tiered5+rbla_product) for an early merge; a plain name "
        "takes base.aggregation's early merge if it has one (fedavg runs only with the "
        "uniform assigner; other combinations with it are skipped)",
    )
    seeds: tuple[Seed, ...] = Field(
        (0,), min_length=1, description="experiment seeds; every method runs once per seed"
    )
    target_accuracy: float = Field(
        gt=0.0,
        le=1.0,
        description="global accuracy in (0, 1] whose first round reached is reported as rounds "
        "to target",
    )
    max_parallel: int = Field(1, ge=1, description="cells trained at the same time")
    max_cells: int = Field(
        MAX_CELLS,
        ge=1,
        description="the most runs (assigners x aggregators x seeds) a grid may expand to; a "
        "guard against a grid far larger than meant: raise it for one that is",
    )
    reference: str | None = Field(
        None,
        description="the method (<assigner label>-<aggregator>, as in the summary's method "
        "column, e.g. uniform-mean_autorank-rbla) every other method is compared with seed by "
        "seed; null: uniform at AutoRank's mean rank with the first aggregator if the grid has "
        "it, else no paired statistics",
    )

    @field_validator("assigners", mode="before")
    @classmethod
    def _names_to_specs(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [{"assigner": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("assigners")
    @classmethod
    def _distinct_methods(cls, value: tuple[AssignerSpec, ...]) -> tuple[AssignerSpec, ...]:
        twice = _twice([a.method for a in value])
        if twice:
            raise ValueError(f"methods {twice} appear twice; give one of them a label")
        return value

    @field_validator("reference")
    @classmethod
    def _a_method_of_the_grid(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not {"base", "assigners", "aggregators"} <= info.data.keys():
            return value  # a bad assigner or aggregator is reported on its own
        base, default = info.data["base"].aggregation, info.data["aggregators"]
        methods = [
            f"{a.method}-{label}"
            for a in info.data["assigners"]
            for label in _labels(base, a.aggregators or default)
        ]
        if value not in methods:
            raise ValueError(f"not a method of this grid; expected one of {', '.join(methods)}")
        return value

    @field_validator("aggregators", "seeds")
    @classmethod
    def _distinct(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if len(set(value)) != len(value):
            raise ValueError("has duplicates")
        return value

    @model_validator(mode="after")
    def _within_max_cells(self) -> GridConfig:
        methods = len(self.methods)
        n = methods * len(self.seeds)
        if n > self.max_cells:
            crossed = f"{len(self.assigners)} assigners x {len(self.aggregators)} aggregators"
            if any(a.aggregators for a in self.assigners):  # not a plain cross product
                crossed = f"{methods} assigner x aggregator methods"
            raise ValueError(
                f"max_cells: the grid expands to {n:,} runs ({crossed} x {len(self.seeds)} "
                f"seeds), expected at most {self.max_cells:,}; raise it with --set "
                f"max_cells={n} if that is meant"
            )
        return self

    @model_validator(mode="after")
    def _distinct_merges(self) -> GridConfig:
        twice = sorted({t for a in self.assigners for t in _twice(self.merges_of(a))})
        if twice:
            raise ValueError(
                f"aggregators: {twice} appear twice once base.aggregation's early merge applies "
                "to the plain names"
            )
        return self

    @model_validator(mode="after")
    def _ranks_in_range(self) -> GridConfig:
        lo, hi = self.base.lora.r_min, self.base.lora.r_max
        for spec in self.assigners:
            if isinstance(spec.uniform_rank, int) and not lo <= spec.uniform_rank <= hi:
                raise ValueError(
                    f"assigners: uniform_rank {spec.uniform_rank} is outside "
                    f"base.lora [r_min, r_max] = [{lo}, {hi}]"
                )
        return self

    @property
    def merge_labels(self) -> list[str]:
        """Every aggregator of the grid as its cells run it (``merge_label``), in order."""
        merges = [m for a in self.assigners for m in self.merges_of(a)]
        return list(dict.fromkeys(merges))

    def merges_of(self, spec: AssignerSpec) -> list[str]:
        """The aggregators ``spec`` runs with (its own, else the grid's), as ``merge_label``."""
        return _labels(self.base.aggregation, spec.aggregators or self.aggregators)

    @property
    def methods(self) -> list[str]:
        """Every assigner x aggregator of the grid, ``<assigner label>-<aggregator>``."""
        return [f"{a.method}-{m}" for a in self.assigners for m in self.merges_of(a)]

    @property
    def reference_method(self) -> str | None:
        """The method paired statistics compare with: ``reference``, else uniform at AutoRank's
        mean rank with the first aggregator, else None (no paired statistics)."""
        if self.reference is not None:
            return self.reference
        mean = next((a for a in self.assigners if a.uniform_rank == MEAN_AUTORANK), None)
        return None if mean is None else f"{mean.method}-{self.merges_of(mean)[0]}"


def merge_label(base: AggregationConfig, aggregator: str) -> str:
    """The merge a cell runs, as ``AggregationConfig.label``: a grid's plain aggregator name
    keeps the base's early merge, if any; ``<early><rounds>+<method>`` replaces it."""
    if "early_method" in aggregation_fields(aggregator):
        return aggregator
    return base.model_copy(update={"method": aggregator}).label


def _twice(names: Sequence[str]) -> list[str]:
    """The names that appear more than once, sorted."""
    return sorted({n for n in names if names.count(n) > 1})


def _labels(base: AggregationConfig, aggregators: Sequence[str]) -> list[str]:
    return [merge_label(base, a) for a in aggregators]


def grid_digest(grid: GridConfig) -> str:
    """A digest of what decides a comparison's cells and their results.

    Left out: the parent's name, ``max_parallel``, the ``reference`` of the paired statistics
    (the summary, not a result) and where runs are tracked or checkpointed, which a resume on
    another machine may change without changing any result.
    """
    relevant = grid.model_dump(mode="json", include={"assigners", "aggregators", "seeds"})
    for spec in relevant["assigners"]:  # the grids before per-assigner aggregators keep theirs
        if spec["aggregators"] is None:
            del spec["aggregators"]
    relevant["target_accuracy"] = grid.target_accuracy
    relevant["base"] = config_digest(grid.base)
    return json_digest(relevant)


def parse_grid(raw: Mapping[str, Any]) -> GridConfig:
    """Validate a plain mapping into a GridConfig, raising ConfigError with one line."""
    try:
        return GridConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_grid(path: Path, overrides: Sequence[str] = ()) -> GridConfig:
    """Load a grid YAML file, apply ``key=value`` overrides (``base.training.rounds=3``)."""
    raw = read_yaml(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_grid(raw)
