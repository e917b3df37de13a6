"""The trained model as MLflow and peft users load it, and the data set as an MLflow input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from torch.testing import assert_close

from autorank.config import ConfigError, ExperimentConfig
from autorank.lora.adapters import AdapterState
from autorank.lora.files import load_adapter
from autorank.lora.functional import LoraTemplate, bind_state, evaluate_state
from autorank.lora.targets import expand_ranks, merge_base_delta
from autorank.models.zoo import load_base_weights
from autorank.recipe import federation_for, lora_settings, make_base
from autorank.rounds.steps import download, initial_state
from autorank.serving import ModelSpec, load_classifier
from flows.experiment import federated_training
from flows.model_records import FinalModel, record_data, write_adapters
from tasks import model_tracking
from tests.flows.conftest import tiny_config

REGISTERED = "autorank-digits"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def exported_run(
    prefect_harness: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExperimentConfig, str, MlflowClient, Path]:
    """One finished run whose global adapter has layers of different ranks, registered."""
    tmp = tmp_path_factory.mktemp("export")
    config = tiny_config(
        tmp,
        lora={"r_min": 2, "r_max": 8, "layer_ranges": {"fc2": {"r_min": 2, "r_max": 4}}},
        tracking={"register_as": REGISTERED, "log_model": True},
    )
    run_id = federated_training(config=config)
    return config, run_id, MlflowClient(tracking_uri=config.tracking.uri), tmp


@pytest.fixture
def tracking_uri(exported_run: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLflow's own loaders read the process-wide tracking URI: point it at the run's store."""
    uri = exported_run[0].tracking.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return str(uri)


def _test_split(config: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
    x, y = federation_for(config).data.arrays("test")
    return x.reshape(len(x), -1), y


def _adapter_folder(exported_run: Any) -> Path:
    _, run_id, client, tmp = exported_run
    return Path(client.download_artifacts(run_id, "adapter", str(tmp / "dl")))


def test_the_mlflow_model_predicts_the_runs_final_accuracy(exported_run, tracking_uri) -> None:
    # Prepare
    config, run_id, client, _ = exported_run
    x, y = _test_split(config)
    final = client.get_metric_history(run_id, "global/accuracy")[-1].value

    # Execute
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    classes = model.predict(x)
    probabilities = model.predict(x, params={"output": "probabilities"})

    # Assert
    assert float(np.mean(classes == y)) == final
    assert probabilities.shape == (len(x), 10) and np.allclose(probabilities.sum(axis=1), 1.0)
    assert np.array_equal(probabilities.argmax(axis=1), classes)
    assert np.array_equal(model.predict(pd.DataFrame(x[:7])), classes[:7])
    assert tuple(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 64)
    assert model.metadata.saved_input_example_info["type"] == "ndarray"
    assert not list(Path(model.metadata.artifact_path.removeprefix("file://")).rglob("*.pkl"))


def test_the_peft_adapter_loads_over_the_logged_base(exported_run) -> None:
    from peft import PeftModel

    config, *_ = exported_run
    folder = _adapter_folder(exported_run)
    x, _ = _test_split(config)
    spec = ModelSpec.from_json((folder / "base" / "model.json").read_text())
    base = spec.build()
    load_base_weights(base, folder / "base" / "model.safetensors")

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder / "peft").eval()
    own = load_classifier(
        folder / "base" / "model.json",
        folder / "base" / "model.safetensors",
        folder / "global_adapter.safetensors",
    )

    peft_config = json.loads((folder / "peft" / "adapter_config.json").read_text())
    assert (peft_config["r"], peft_config["rank_pattern"]) == (8, {"fc2": 4})
    with torch.no_grad():
        assert_close(peft_model(torch.from_numpy(x)), own.module(torch.from_numpy(x)))


def test_each_clients_adapter_has_its_own_ranks_and_loads_in_peft(exported_run) -> None:
    from peft import PeftModel

    config, run_id, client, _ = exported_run
    folder = _adapter_folder(exported_run)
    decision = json.loads(Path(client.download_artifacts(run_id, "rank_decision.json")).read_text())
    base = ModelSpec.from_json((folder / "base" / "model.json").read_text()).build()
    load_base_weights(base, folder / "base" / "model.safetensors")
    x = torch.from_numpy(_test_split(config)[0][:20])
    global_state = load_adapter(folder / "global_adapter.safetensors")
    template = LoraTemplate(base, ["fc1", "fc2"], ("head",), CPU)

    for row in decision["clients"]:
        own = folder / "clients" / f"c{row['client']:02d}"
        peft_config = json.loads((own / "adapter_config.json").read_text())
        ranks = {k: peft_config["rank_pattern"].get(k, peft_config["r"]) for k in ("fc1", "fc2")}
        assert ranks == row["layer_ranks"]
        mine = download(global_state, expand_ranks(base, ranks), lora_settings(config))
        with torch.no_grad():
            want = bind_state(template, mine)(x)
            got = PeftModel.from_pretrained(copy.deepcopy(base), own).eval()(x)
        assert_close(got, want)


@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")
def test_the_data_set_and_its_partition_are_the_runs_inputs_once(exported_run) -> None:
    # Prepare
    config, run_id, client, _ = exported_run
    federation = federation_for(config)

    # Execute: what a resumed run does again
    record_data(config, run_id, federation)

    # Assert
    inputs = client.get_run(run_id).inputs.dataset_inputs
    by_context = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in inputs
    }
    assert len(inputs) == 2 and set(by_context) == {"train", "test"}
    train = by_context["train"]
    assert train.dataset.name == "digits/train"
    assert train.dataset.digest == federation.data.digest("train")
    tags = {t.key: t.value for t in train.tags}
    sizes = [len(c.train) for c in federation.clients]
    assert tags["partition.scheme"] == "double_imbalance"
    assert tags["partition.client_sizes"] == ",".join(map(str, sizes))
    layout = json.loads(Path(client.download_artifacts(run_id, "data/partition.json")).read_text())
    assert [c["train"] for c in layout["clients"]] == sizes
    assert tags["partition.digest"] == layout["digest"]


def test_register_as_registers_one_version_of_the_runs_model(exported_run, tracking_uri) -> None:
    config, run_id, client, _ = exported_run
    x, _ = _test_split(config)
    model_id = model_tracking.run_model_id(tracking_uri, run_id)
    assert model_id is not None

    # a resumed finish logs and registers nothing new
    again = model_tracking.log_model(tracking_uri, run_id, {}, x[:2], step=2)
    version = model_tracking.register_model(tracking_uri, run_id, model_id, REGISTERED)

    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    assert again == model_id and [str(v.version) for v in versions] == [version] == ["1"]
    assert versions[0].run_id == run_id
    assert versions[0].source == client.get_logged_model(model_id).artifact_location
    registered = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1")
    runs = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert np.array_equal(registered.predict(x), runs.predict(x))


def test_register_as_refuses_a_name_the_registry_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="register_as"):
        tiny_config(tmp_path, tracking={"register_as": "team/digits", "log_model": True})
    with pytest.raises(ConfigError, match="needs the model logged"):
        tiny_config(tmp_path, tracking={"register_as": "digits", "log_model": False})


def test_the_description_names_the_model(exported_run) -> None:
    _, run_id, client, _ = exported_run

    note = client.get_run(run_id).data.tags["mlflow.note.content"]

    assert f"Model: `runs:/{run_id}/model`" in note


def test_under_flora_the_export_is_the_merged_base_and_an_adapter_that_adds_nothing(
    tmp_path: Path,
) -> None:
    """FLoRA merges every round's update into the base: the logged base must be the final
    one, and the adapter over it must not add the update a second time."""
    # Prepare
    config = tiny_config(tmp_path, aggregation={"method": "flora"})
    federation = federation_for(config)
    spec = ModelSpec("mlp", federation.data.input_shape, 10, (200, 200), ("head",))
    base, lora = spec.build().eval(), lora_settings(config)
    state = initial_state(base, [{"fc1": 4, "fc2": 2}], lora, seed=0)
    for f in state.lora.values():
        f.B.normal_(generator=torch.Generator().manual_seed(1))
    merge_base_delta(base, {path: f.delta() for path, f in state.lora.items()})
    x, y = (torch.from_numpy(a) for a in federation.data.arrays("test"))

    # Execute
    final = FinalModel(base, state, merged=True, paths=[{"fc1": 4, "fc2": 2}])
    files = write_adapters(tmp_path, config, final, federation.data)

    # Assert
    served = load_classifier(files["spec"], files["base"], files["adapter"])
    template = LoraTemplate(base, ["fc1", "fc2"], ("head",), CPU)
    evaluated = evaluate_state(template, AdapterState({}, dict(state.extra)), x, y)
    assert float(np.mean(served.predict(x.numpy()) == y.numpy())) == evaluated.accuracy
    logged_base = load_file(str(files["base"]))
    assert all(torch.equal(logged_base[k], v) for k, v in base.state_dict().items())
    peft_tensors = load_file(str(tmp_path / "adapter" / "peft" / "adapter_model.safetensors"))
    assert not any(t.any() for k, t in peft_tensors.items() if ".lora_B." in k)
    assert not (tmp_path / "adapter" / "clients").exists()


def test_under_fedex_the_logged_model_is_the_updated_base_with_the_global_adapter(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedEx-LoRA adds each round's residual to the base and keeps the adapter: the logged model
    (the final base, written, plus the adapter) predicts at the run's final global accuracy, and
    the base differs from the one the run started from. Two of four clients train each round, so
    a round's merge can leave components uncovered."""
    # Prepare
    config = tiny_config(
        tmp_path,
        training={"rounds": 3, "clients_per_round": 2},
        aggregation={"method": "fedex"},
        tracking={"log_model": True},
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking.uri)
    x, y = _test_split(config)

    # Execute
    run_id = federated_training(config=config)

    # Assert
    client = MlflowClient(tracking_uri=config.tracking.uri)
    final = client.get_metric_history(run_id, "global/accuracy")[-1].value
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert float(np.mean(model.predict(x) == y)) == final
    folder = Path(client.download_artifacts(run_id, "adapter", str(tmp_path / "dl")))
    peft_tensors = load_file(str(folder / "peft" / "adapter_model.safetensors"))
    assert any(t.any() for k, t in peft_tensors.items() if ".lora_B." in k)  # not merged away
    logged_base = load_file(str(folder / "base" / "model.safetensors"))
    federation = federation_for(config)
    t = config.training
    start = make_base(
        config.model,
        federation.data,
        federation.public,
        lr=t.lr,
        batch_size=t.batch_size,
        seed=config.seed,
    ).state_dict()
    assert not torch.equal(logged_base["fc1.weight"], start["fc1.weight"])  # the residuals
    assert torch.equal(logged_base["head.weight"], start["head.weight"])  # not a LoRA layer
