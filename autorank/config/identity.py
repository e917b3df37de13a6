"""A config's identity: flat parameters, YAML, and the digest checkpoints bind to."""

from __future__ import annotations

from typing import Any

import yaml

from autorank.config.experiment import ExperimentConfig
from autorank.config.training import AggregationConfig


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
    # Where things are tracked, run or cached does not change results.
    exclude: dict[str, Any] = {"tracking": True, "runtime": True, "data": {"cache_dir"}}
    payload = config.model_dump(mode="json", exclude=exclude)
    if payload["training"]["local_steps"] is None:
        del payload["training"]["local_steps"]  # every batch: digests as before the setting
    if payload["training"]["grad_accumulation"] == 1:
        del payload["training"]["grad_accumulation"]  # no accumulation: digests as before
    if payload["training"]["clients_per_round"] is None:
        del payload["training"]["clients_per_round"]  # full participation: digests as before
    unset: dict[str, dict[str, Any]] = {
        "data": {
            "max_test_samples": None,
            "max_length": 64,
            "text_column": "text",
            "label_column": "label",
            "key_column": None,
            "train_keys": None,
            "test_keys": None,
        },
        "ranking": {"budget_params": None, "rank_caps": {}, "cap_tiers": []},
        "aggregation": {"early_method": None, "early_rounds": 0, "early_when": "always"},
    }
    if config.difficulty_mode() == "first_participation":  # set, or what auto resolved to
        payload["ranking"]["difficulty_from"] = "first_participation"
    else:
        del payload["ranking"]["difficulty_from"]  # the warm-up: digests as before the setting
    if payload["data"]["name"] != "synthetic":  # the generator's knobs change nothing else
        for name in [n for n in payload["data"] if n.startswith("synthetic_")]:
            del payload["data"][name]
    for section, defaults in unset.items():
        for name, default in defaults.items():
            if payload[section][name] == default:
                del payload[section][name]  # not set: digests as before these settings existed
    return json_digest(payload)


def warm_up_identity(config: ExperimentConfig) -> str:
    """What a warm-up's loss curves depend on: the experiment less its merge, and the device
    and engine it trains on (a grid's cells that differ only in their merge share one)."""
    neutral = config.model_copy(update={"aggregation": AggregationConfig()})
    where = config.runtime
    return f"{config_digest(neutral)}|{where.device}|{where.backend}|{where.threads_per_client}"
