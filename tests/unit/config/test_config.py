import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ValidationError

from autorank.config import (
    ConfigError,
    ExperimentConfig,
    aggregation_fields,
    apply_override,
    config_digest,
    flatten,
    json_digest,
    load_config,
    parse_config,
    to_yaml,
)
from autorank.reporting.grid import GridConfig

ROOT = Path(__file__).resolve().parents[3]


def test_defaults_are_the_quickstart_experiment() -> None:
    config = ExperimentConfig()

    assert config.data.name == "digits"
    assert config.partition.scheme == "double_imbalance"
    assert config.partition.n_clients == 10
    assert config.ranking.assigner == "autorank"
    assert config.aggregation.method == "rbla"


EXPERIMENTS = sorted(p for p in (ROOT / "configs").glob("**/*.yaml") if "grids" not in p.parts)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=str)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)

    assert isinstance(config, ExperimentConfig)


def test_default_yaml_matches_builtin_defaults() -> None:
    assert load_config(ROOT / "configs" / "default.yaml") == ExperimentConfig()


def test_overrides_parse_values_as_yaml() -> None:
    config = load_config(
        None,
        ["partition.n_clients=20", "lora.layer_ranges={fc1: {r_min: 4, r_max: 16}}", "seed=3"],
    )

    assert config.partition.n_clients == 20
    assert config.lora.range_of("fc1") == (4, 16)
    assert config.lora.range_of("fc2") == (config.lora.r_min, config.lora.r_max)
    assert config.seed == 3


def test_yaml_round_trip_and_flatten() -> None:
    config = load_config(None, ["partition.n_clients=7", "ranking.assigner=manual"])

    again = parse_config(__import__("yaml").safe_load(to_yaml(config)))
    flat = flatten(config)

    assert again == config
    assert flat["partition.n_clients"] == "7"
    assert flat["ranking.assigner"] == "manual"


def test_an_early_merge_takes_the_first_rounds_then_method_takes_over() -> None:
    config = load_config(
        None,
        [
            "aggregation.method=rbla_product",
            "aggregation.early_method=rbla_tiered",
            "aggregation.early_rounds=2",
        ],
    )

    merges = [config.aggregation.method_at(r) for r in (1, 2, 3, 30)]

    assert merges == ["rbla_tiered", "rbla_tiered", "rbla_product", "rbla_product"]
    assert config.aggregation.label == "rbla_tiered2+rbla_product"
    assert aggregation_fields(config.aggregation.label) == {
        "early_method": "rbla_tiered",
        "early_rounds": 2,
        "early_when": "always",
        "method": "rbla_product",
    }
    assert aggregation_fields("rbla") == {"method": "rbla"}
    assert config_digest(config) != config_digest(
        load_config(None, ["aggregation.method=rbla_product"])
    )


def test_an_early_merge_can_wait_for_every_tier_to_hold_every_label() -> None:
    config = load_config(
        None,
        [
            "aggregation.method=rbla_product",
            "aggregation.early_method=rbla_tiered",
            "aggregation.early_rounds=2",
            "aggregation.early_when=all_labels",
        ],
    )
    agg = config.aggregation

    covered = [agg.method_at(r, labels_covered=True) for r in (1, 2, 3)]
    missing = [agg.method_at(r, labels_covered=False) for r in (1, 2, 3)]

    assert covered == ["rbla_tiered", "rbla_tiered", "rbla_product"]
    assert missing == ["rbla_product"] * 3
    assert agg.label == "rbla_tiered2@all_labels+rbla_product"
    assert aggregation_fields(agg.label) == {
        "early_method": "rbla_tiered",
        "early_rounds": 2,
        "early_when": "all_labels",
        "method": "rbla_product",
    }
    always = agg.model_copy(update={"early_when": "always"})
    assert always.method_at(1, labels_covered=False) == "rbla_tiered"
    assert config_digest(config) != config_digest(
        load_config(
            None,
            [
                "aggregation.method=rbla_product",
                "aggregation.early_method=rbla_tiered",
                "aggregation.early_rounds=2",
            ],
        )
    )


def test_without_an_early_merge_the_digest_is_as_before_the_setting_existed() -> None:
    # Prepare: the default config's digest, computed from its fields before early_* existed
    config = load_config(None, [])
    payload = config.model_dump(mode="json", exclude={"tracking", "runtime"})
    del payload["training"]["clients_per_round"]
    del payload["training"]["local_steps"]
    del payload["training"]["grad_accumulation"]
    for name in ("budget_params", "rank_caps", "cap_tiers", "difficulty_from"):
        del payload["ranking"][name]
    text = ("max_test_samples", "max_length", "text_column", "label_column", "key_column")
    text = (*text, "train_keys", "test_keys")
    synthetic = [n for n in payload["data"] if n.startswith("synthetic_")]
    for name in (*text, *synthetic, "cache_dir"):
        del payload["data"][name]  # the text and generator settings came later still
    payload["aggregation"] = {"method": config.aggregation.method}

    # Execute / Assert: a checkpoint written before the setting resumes
    assert config_digest(config) == json_digest(payload)
    assert config.aggregation.method_at(1) == config.aggregation.label == "rbla"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.name=tweets"], "data.name 'tweets' is text; expected model.name one of"),
        (
            ["model.name=text_classifier", "model.hf_name_or_path=all-MiniLM-L6-v2"],
            "model.name 'text_classifier' reads text; expected data.name one of",
        ),
    ],
)
def test_text_data_and_text_models_go_together(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["data.name=kjv", "model.name=text_classifier", "model.hf_name_or_path=x"],
            "data.name 'kjv' has no labels; expected model.name 'causal_lm'",
        ),
        (["data.test_keys=[Ruth]"], "data.test_keys names natural clients; expected keyed"),
        (
            ["data.name=kjv", "model.name=causal_lm", "model.hf_name_or_path=x",
             "data.train_keys=[Ruth,Jude]", "data.test_keys=[Jude]"],
            r"data.train_keys and data.test_keys share \['Jude'\]",
        ),
    ],
)  # fmt: skip
def test_natural_clients_are_named_only_for_keyed_text(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_the_bible_is_partitioned_by_book_without_a_key_column() -> None:
    overrides = ["data.name=kjv", "model.name=causal_lm", "model.hf_name_or_path=x"]

    config = load_config(None, [*overrides, "partition.scheme=natural"])

    assert config.partition.scheme == "natural" and config.data.key_column is None


def test_a_natural_partition_needs_the_key_column() -> None:
    expected = "partition.scheme 'natural' needs data.key_column"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["partition.scheme=natural"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["partition.n_clients=0"], "partition.n_clients"),
        (["partition.n_clients=ten"], "partition.n_clients"),
        (["partition.scheme=banana"], "partition.scheme"),
        (["partition.colour=red"], "partition.colour: unknown setting"),
        (["lora.r_min=8", "lora.r_max=4"], "must not exceed"),
        (["lora.layer_ranges={fc1: {r_min: 9, r_max: 3}}"], "lora.layer_ranges.fc1"),
        (["training.warmup_epochs=1"], "training.warmup_epochs"),
        (["training.lr=-0.1"], "training.lr"),
        (["aggregation.method=fedavg"], "aggregation.method 'fedavg' needs equal ranks"),
        (["aggregation.early_rounds=5"], "early_method and aggregation.early_rounds go together"),
        (
            ["aggregation.early_method=rbla_tiered"],
            "got early_method 'rbla_tiered', early_rounds 0",
        ),
        (["aggregation.early_method=flora", "aggregation.early_rounds=2"], "from flora"),
        (["aggregation.early_when=all_labels"], "early_when 'all_labels' needs an early merge"),
        (
            [
                "aggregation.early_method=rbla_tiered",
                "aggregation.early_rounds=5",
                "aggregation.early_when=all_labels",
                "ranking.rerank_every=2",
            ],
            "ranking.rerank_every (2) must be at least aggregation.early_rounds (5), or 0",
        ),
        (
            [
                "aggregation.early_method=rbla_tiered",
                "aggregation.early_rounds=2",
                "aggregation.early_when=sometimes",
            ],
            "aggregation.early_when",
        ),
        (["aggregation.early_method=rbla", "aggregation.early_rounds=-1"], "early_rounds"),
        (
            ["aggregation.early_method=fedavg", "aggregation.early_rounds=2"],
            "aggregation.early_method 'fedavg' needs equal ranks",
        ),
        (
            ["aggregation.early_method=rbla_tiered", "aggregation.early_rounds=20"],
            "early_rounds (20) must be below training.rounds (20)",
        ),
        (
            ["aggregation.early_method=rbla", "aggregation.early_rounds=2"],
            "aggregation.early_method is aggregation.method ('rbla')",
        ),
        (["ranking.criteria=[entropy, entropy]"], "duplicates"),
        (["ranking.rerank_every=5", "training.local_epochs=1"], "local_epochs >= 2 (got 1)"),
        (["ranking.rerank_every=5", "ranking.assigner=uniform"], "needs ranking.assigner"),
        (["ranking.rerank_every=5", "ranking.criteria=[entropy]"], "'learning_difficulty' in"),
        (["ranking.rerank_every=-1"], "ranking.rerank_every"),
        (["runtime.task_runner=dask"], "dask_address"),
        (["model.name=hf"], "hf_name_or_path"),
        (["model.init=safetensors"], "weights_path"),
        (["nonsense"], "expected key=value"),
        (["seed=1", "seed.x=1"], "not a section"),
        (["seed.x=1"], "seed: Input should be a valid integer"),
    ],
)
def test_bad_settings_get_one_clear_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)

    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_a_section_check_names_its_setting_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["aggregation.early_when=all_labels"])

    assert str(info.value).startswith("aggregation.early_when 'all_labels' needs an early merge")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("partition: [unclosed\n")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")

    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


BAD_FILES = [
    ("adir", "config file 'adir' is a folder; expected a YAML file"),
    ("/dev/null", "config file '/dev/null' is not a regular file; expected a YAML file"),
    (
        "binary.yaml",
        "config file 'binary.yaml' is not UTF-8 text (byte 0xff at offset 8); expected a YAML file",
    ),
    (
        "deep.yaml",
        "config file 'deep.yaml': the YAML nests too deep to read; expected settings a few "
        "levels deep",
    ),
    ("nope.yaml", "config file 'nope.yaml' not found; expected a YAML file"),
]


@pytest.mark.parametrize(("name", "expected"), BAD_FILES, ids=[n for n, _ in BAD_FILES])
def test_a_config_file_that_cannot_be_read_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"seed: 1\n\xff\xfe\x00\x01")
    (tmp_path / "deep.yaml").write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")

    with pytest.raises(ConfigError) as info:
        load_config(Path(name))

    assert str(info.value) == expected


def test_an_override_nested_too_deep_is_one_line() -> None:
    with pytest.raises(ConfigError, match="nests too deep to read") as info:
        load_config(None, ["seed=" + "[" * 5000 + "]" * 5000])

    assert len(str(info.value)) < 300


def test_override_creates_nested_sections() -> None:
    raw: dict = {}

    apply_override(raw, "training.rounds=3")

    assert raw == {"training": {"rounds": 3}}


def test_tracking_uri_precedence_setting_then_environment_then_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from autorank.config import DEFAULT_TRACKING_URI

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_config(None).tracking.uri == DEFAULT_TRACKING_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/x.db")
    assert load_config(None).tracking.uri == f"sqlite:///{tmp_path}/x.db"
    chosen = load_config(None, ["tracking.uri=sqlite:///elsewhere.db"])
    assert chosen.tracking.uri == "sqlite:///elsewhere.db"
    written = tmp_path / "c.yaml"
    written.write_text("tracking:\n  uri: http://127.0.0.1:5000\n")
    assert load_config(written).tracking.uri == "http://127.0.0.1:5000"


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation names, also inside ``X | None``, tuples and dicts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


def _config_models(*roots: type[BaseModel]) -> list[type[BaseModel]]:
    """Every pydantic model reachable from ``roots`` through their fields."""
    models: list[type[BaseModel]] = []
    todo = list(roots)
    while todo:
        model = todo.pop()
        if model not in models:
            models.append(model)
            todo += [m for f in model.model_fields.values() for m in _models_in(f.annotation)]
    return models


def _nonfinite(annotation: Any) -> Any:
    """A value of ``annotation``'s shape holding inf (None where it holds no float)."""
    if annotation is float:
        return float("inf")
    if getattr(annotation, "__origin__", None) is dict:
        inner = _nonfinite(get_args(annotation)[1])
        return None if inner is None else {"key": inner}
    return next((v for a in get_args(annotation) if (v := _nonfinite(a)) is not None), None)


def test_every_float_setting_refuses_nan_and_inf() -> None:
    checked = []
    for model in _config_models(ExperimentConfig):
        for name, field in model.model_fields.items():
            value = _nonfinite(field.annotation)
            if value is None:
                continue
            with pytest.raises(ValidationError) as info:
                model.model_validate({name: value})
            kinds = {e["type"] for e in info.value.errors() if e["loc"][0] == name}
            assert "finite_number" in kinds, f"{model.__name__}.{name}: {kinds}"
            checked.append(name)

    assert {"lr", "alpha", "share", "dask_resources", "clients_per_round"} <= set(checked)


@pytest.mark.parametrize("setting", ["training.lr=.inf", "partition.alpha=.nan"])
def test_a_nonfinite_setting_is_one_line_naming_it(setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [setting])

    assert str(info.value).startswith(f"{setting.split('=')[0]}: Input should be a finite number")


def test_every_setting_of_every_config_model_says_what_it_does() -> None:
    models = _config_models(ExperimentConfig, GridConfig)

    undescribed = [
        f"{model.__name__}.{name}"
        for model in models
        for name, field in model.model_fields.items()
        if not (field.description or "").strip() or "\n" in field.description
    ]

    assert {"LayerRange", "TrackingConfig", "RuntimeConfig", "AssignerSpec"} <= {
        m.__name__ for m in models
    }
    assert undescribed == []


_POPULATION = ["partition.n_clients=100", "training.clients_per_round=4"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "warmup"),  # 10 clients, all trained every round
        ([*_POPULATION, "training.rounds=25"], "warmup"),  # as many as the run trains
        ([*_POPULATION, "training.rounds=5"], "first_participation"),
        (
            [*_POPULATION[:1], "training.clients_per_round=0.04", "training.rounds=5"],
            "first_participation",
        ),
        ([*_POPULATION, "training.rounds=5", "ranking.budget_params=100000"], "warmup"),
        (["ranking.difficulty_from=first_participation"], "first_participation"),
        (["ranking.assigner=uniform"], None),
        (["ranking.criteria=[entropy, n_samples]"], None),
    ],
)
def test_learning_difficulty_is_measured_where_the_setting_and_the_population_say(
    overrides: list[str], expected: str | None
) -> None:
    assert load_config(None, overrides).difficulty_mode() == expected


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["ranking.assigner=size"], "needs ranking.assigner 'autorank' with 'learning_difficulty'"),
        (["ranking.budget_params=100000"], "expected no ranking.budget_params"),
        (["ranking.rerank_every=2"], "expected no ranking.rerank_every"),
        (["training.local_epochs=1"], "expected no training.local_epochs below 2"),
    ],
)
def test_first_participation_is_refused_where_every_rank_is_needed_at_once(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, ["ranking.difficulty_from=first_participation", *overrides])


def test_first_participation_changes_the_digest_and_the_warm_up_does_not() -> None:
    default = config_digest(load_config(None, []))
    warm = config_digest(load_config(None, ["ranking.difficulty_from=warmup"]))
    first = config_digest(load_config(None, ["ranking.difficulty_from=first_participation"]))

    assert warm == default != first


def test_the_shipped_population_config_is_measured_at_first_participation() -> None:
    config = load_config(Path(__file__).parents[3] / "configs" / "synthetic.yaml", [])

    assert config.data.name == "synthetic" and config.partition.n_clients == 100_000
    assert config.difficulty_mode() == "first_participation"


def test_synthetic_data_trains_at_fedproxs_rate_unless_one_is_set() -> None:
    from autorank.config import DataConfig, ExperimentConfig, TrainingConfig

    assert load_config(None, ["data.name=synthetic"]).training.lr == 0.01
    assert load_config(None, ["data.name=synthetic", "training.lr=0.05"]).training.lr == 0.05
    assert load_config(None, []).training.lr == 0.05
    synthetic = DataConfig(name="synthetic")
    assert ExperimentConfig(data=synthetic).training.lr == 0.01
    assert ExperimentConfig(data=synthetic, training=TrainingConfig(lr=0.2)).training.lr == 0.2
