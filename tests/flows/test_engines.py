"""Which engine a run trains with, and its cohort slots."""

from pathlib import Path

import pytest
import torch

from autorank.models.zoo import build_model
from autorank.rounds.steps import ClientData
from flows.engines import backend_kind
from tests.flows.conftest import tiny_config


def _data(d: int) -> list[ClientData]:
    x = torch.randn(6, d)
    return [ClientData(x, torch.zeros(6, dtype=torch.long), x[:0], x[:0].long())]


@pytest.mark.parametrize(
    ("model", "backend", "lora", "expected"),
    [
        ("mlp", "auto", {}, "batched"),
        ("mlp", "sequential", {}, "sequential"),
        ("mlp", "batched", {"dropout": 0.1}, "sequential"),  # cannot batch: one line, fallback
        ("cnn", "auto", {}, "sequential"),  # convolutions batch slower on a CPU
        ("cnn", "batched", {}, "batched"),  # asked for explicitly
    ],
)
def test_backend_kind(tmp_path: Path, model: str, backend: str, lora: dict, expected: str) -> None:
    config = tiny_config(
        tmp_path,
        model={"name": model, "hidden": [16]},
        lora={"r_min": 1, "r_max": 2, **lora},
        runtime={"backend": backend, "device": "cpu"},
    )
    base = build_model(model, input_shape=(1, 8, 8), n_classes=10, hidden=(16,), seed=0)

    assert backend_kind(config, base, _data(64)) == expected
