"""The real flow end to end on CPU, asserting what landed in MLflow."""

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from autorank.config import flatten
from flows.experiment import federated_training
from flows.run_views import forward_progress
from tests.flows.conftest import tiny_config


@pytest.fixture(scope="module")
def finished_run(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("flow")
    config = tiny_config(tmp)
    # As in a deployment: a CLI test earlier in this process turned the forwarding off and
    # quietened Prefect's run loggers.
    forward_progress(True)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    run_id = federated_training(config=config)
    client = MlflowClient(tracking_uri=config.tracking.uri)
    return config, run_id, client, tmp


def _flow_run(client: MlflowClient, run_id: str) -> tuple[Any, list[Any], list[str]]:
    """The Prefect flow run behind an MLflow run: itself, its artifacts, its log lines (sent in
    batches by a background worker: read until the last round's line is there, or 60 s)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    flow_run_id = client.get_run(run_id).data.tags["prefect.flow_run_id"]
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
        mine = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        artifacts = prefect.read_artifacts(artifact_filter=mine)
        logs = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
        while True:
            APILogWorker.drain_all(timeout=10)
            lines = [log.message for log in prefect.read_logs(logs)]
            if any(line.startswith("round 2/2") for line in lines) or time.monotonic() > deadline:
                return flow_run, artifacts, lines
            time.sleep(0.5)


def test_the_prefect_flow_run_is_named_logs_rounds_and_links_mlflow(finished_run) -> None:
    _, run_id, client, _ = finished_run

    flow_run, artifacts, lines = _flow_run(client, run_id)

    assert flow_run.name == client.get_run(run_id).info.run_name == "autorank-rbla-digits-s0"
    by_key = {a.key: a for a in artifacts}
    assert by_key["mlflow-run"].type == "markdown"  # a link artifact is stored as markdown
    assert "#/experiments/" in by_key["mlflow-run"].data and run_id in by_key["mlflow-run"].data
    table = by_key["round-metrics"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[-1]["global accuracy"] == round(
        client.get_metric_history(run_id, "global/accuracy")[-1].value, 4
    )
    assert any(line.startswith("round 2/2: global accuracy ") for line in lines)
    # The page reads like the terminal: the task runs' "Finished in state Completed()" lines
    # (two or three a round) are left out; the flow run's own closing line may come later.
    assert [line for line in lines if line.startswith("Finished in state")] in (
        [],
        ["Finished in state Completed()"],
    )


def test_run_records_params_and_tags(finished_run) -> None:
    config, run_id, client, _ = finished_run

    run = client.get_run(run_id)

    assert run.info.status == "FINISHED"
    assert run.data.params == flatten(config)
    assert run.data.tags["assigner"] == "autorank"
    assert run.data.tags["aggregator"] == "rbla"
    assert run.data.tags["dataset"] == "digits"
    assert run.data.tags["partition"] == "double_imbalance"
    assert run.data.tags["seed"] == "0"
    assert run.data.tags["prefect.flow_run_id"]


def test_every_round_is_logged_once_per_metric(finished_run) -> None:
    _, run_id, client, _ = finished_run

    for key in (
        "global/accuracy",
        "global/loss",
        "per_client/accuracy_mean",
        "traffic/bytes_up",
        "traffic/bytes_down",
        "time/round_s",
        "per_client/c00/accuracy",
        "per_client/c03/train_loss",
    ):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [1, 2], key
    accuracy = [m.value for m in client.get_metric_history(run_id, "global/accuracy")]
    assert all(0.0 <= a <= 1.0 for a in accuracy)
    assert client.get_metric_history(run_id, "traffic/bytes_up")[0].value > 0


def test_the_ranking_s_cost_is_logged_once_before_the_rounds(finished_run) -> None:
    _, run_id, client, _ = finished_run

    (ranking,) = client.get_metric_history(run_id, "time/ranking_s")

    assert ranking.step == 0 and ranking.value > 0


def test_the_description_leads_with_the_final_accuracy(finished_run) -> None:
    _, run_id, client, _ = finished_run

    run = client.get_run(run_id)

    final = run.data.metrics["global/accuracy"]
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"Global test accuracy **{final:.4f}** after 2 rounds")
    assert "*Model metrics*" in note and "runs:/" not in note  # no model: log_model is off


def test_the_first_chart_section_is_the_global_model(finished_run) -> None:
    """MLflow 3's run page groups charts by the key up to its last ``/``, sorts the named
    sections and puts keys without one last; the headline must open the page."""
    _, run_id, client, _ = finished_run

    keys = client.get_run(run_id).data.metrics
    sections = sorted({k.rsplit("/", 1)[0] for k in keys if "/" in k})

    assert all("/" in k for k in keys)
    assert sections[0] == "global"
    assert sorted(k for k in keys if k.startswith("global/")) == ["global/accuracy", "global/loss"]


def test_rank_decision_plots_and_adapter_artifacts(finished_run) -> None:
    _, run_id, client, tmp = finished_run

    local = Path(client.download_artifacts(run_id, "", str(tmp / "dl")))
    decision = json.loads((local / "rank_decision.json").read_text())
    adapter = load_file(str(local / "adapter" / "global_adapter.safetensors"))

    assert decision["assigner"] == "autorank"
    assert len(decision["clients"]) == 4
    assert set(decision["weights"]) == {
        "entropy",
        "gini_simpson",
        "n_samples",
        "learning_difficulty",
    }
    ranks = [row["rank"] for row in decision["clients"]]
    assert ranks == sorted(ranks) and ranks[0] >= 2 and ranks[-1] == 8
    for png in ("label_distribution", "closeness_vs_rank", "accuracy"):
        assert (local / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert (local / "config.yaml").is_file()
    assert any(k.endswith("/A") for k in adapter) and any(
        k.startswith("adapter/extra/") for k in adapter
    )


def test_summary_counts_every_clients_trainable_parameters(finished_run) -> None:
    _, run_id, client, _ = finished_run

    metrics = client.get_run(run_id).data.metrics
    per_client = [
        v
        for k, v in metrics.items()
        if k.startswith("per_client/c") and k.endswith("/trainable_params")
    ]

    assert len(per_client) == 4
    assert metrics["summary/trainable_params"] == sum(per_client)
    assert metrics["summary/best_accuracy"] >= metrics["summary/final_accuracy"]
    # The decision counts LoRA only: the summary less every client's head, 200 x 10 + 10.
    assert metrics["ranks/total_params"] == metrics["summary/trainable_params"] - 4 * 2010


def test_divergence_stops_the_run_with_a_clear_error_and_marks_it_failed(
    prefect_harness: None, tmp_path: Path
) -> None:
    from autorank.rounds.steps import DivergenceError

    config = tiny_config(
        tmp_path,
        training={"rounds": 3, "local_epochs": 1, "warmup_epochs": 2, "lr": 1e12},
        ranking={"assigner": "uniform"},
    )

    with pytest.raises(DivergenceError, match="training diverged in round 1"):
        federated_training(config=config)

    client = MlflowClient(tracking_uri=config.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not client.get_metric_history(runs[0].info.run_id, "global/accuracy")


def test_a_capped_client_warms_up_at_its_cap(
    prefect_harness: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: client 0's device holds rank 2 (r_max 8)
    config = tiny_config(tmp_path, training={"rounds": 1}, ranking={"rank_caps": {0: 2}})

    # Execute
    with caplog.at_level(logging.INFO):
        run_id = federated_training(config=config)

    # Assert: the warm-up said so, and the decision kept the cap
    lines = [r.getMessage() for r in caplog.records]  # the flow run's logger forwards them
    assert any(
        line.startswith("warm-up: 4 clients") and "ranks, 1 at its device's cap (" in line
        for line in lines
    )
    client = MlflowClient(tracking_uri=config.tracking.uri)
    ranks = client.get_run(run_id).data.metrics
    assert (
        ranks["per_client/c00/rank"] <= 2 < max(ranks[f"per_client/c0{k}/rank"] for k in (1, 2, 3))
    )


@pytest.fixture
def server_merges(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the merge the server runs, round by round."""
    import autorank.rounds.steps
    from autorank.merge.aggregators import aggregate

    merges: list[str] = []

    def spy(method: str, updates: Any) -> Any:
        merges.append(method)
        return aggregate(method, updates)  # type: ignore[arg-type]

    monkeypatch.setattr(autorank.rounds.steps, "aggregate", spy)
    return merges


@pytest.mark.parametrize(
    ("partition", "expected"),
    [
        # clients 1-3 hold classes {0, 1}, {0, 1, 2}, {0, 1, 2, 3}: every label of the four
        ({"scheme": "double_imbalance"}, ["rbla_tiered", "rbla_product"]),
        # one label-sorted shard each: labels only client 0 holds are missing above its cap
        ({"scheme": "shards", "shards_per_client": 1}, ["rbla_product", "rbla_product"]),
    ],
    ids=["double_imbalance", "shards"],
)
def test_an_early_merge_waiting_for_the_labels_runs_only_where_every_tier_holds_them(
    prefect_harness: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    server_merges: list[str],
    partition: dict[str, Any],
    expected: list[str],
) -> None:
    # Prepare: uniform ranks 8 with client 0's device capped at 2, so the top tier is clients
    # 1-3; record the server's merge of each round
    from autorank.recipe import federation_for

    merges = server_merges
    config = tiny_config(
        tmp_path,
        partition=partition,
        ranking={"assigner": "uniform", "rank_caps": {0: 2}},
        aggregation={
            "method": "rbla_product",
            "early_method": "rbla_tiered",
            "early_rounds": 1,
            "early_when": "all_labels",
        },
    )
    histogram = federation_for(config).histogram
    labels = int((histogram.sum(axis=0) > 0).sum())
    top_tier = int((histogram[1:].sum(axis=0) > 0).sum())
    assert (top_tier == labels) == (expected[0] == "rbla_tiered")  # the premise of each case

    # Execute
    with caplog.at_level(logging.INFO):
        run_id = federated_training(config=config)

    # Assert
    assert merges == expected
    lines = [r.getMessage() for r in caplog.records]
    tags = MlflowClient(tracking_uri=config.tracking.uri).get_run(run_id).data.tags
    assert tags["aggregator"] == "rbla_tiered1@all_labels+rbla_product"
    if expected[0] == "rbla_tiered":
        assert (
            "early merge rbla_tiered in round 1: every rank tier's clients hold every label"
            in lines
        )
        assert (
            tags["early_merge"]
            == "rbla_tiered in round 1: every rank tier's clients hold every label"
        )
    else:
        gap = (
            f"the 3 client(s) of fc1 rank >= 8 hold {top_tier} of the federation's {labels} labels"
        )
        assert tags["early_merge"] == f"skipped, rbla_product merges from round 1: {gap}"
        assert f"early merge skipped, rbla_product merges from round 1: {gap}" in lines


def test_an_early_merge_runs_its_rounds_then_hands_over(
    prefect_harness: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    server_merges: list[str],
) -> None:
    # Prepare: record which aggregator the server runs in each round
    merges = server_merges
    config = tiny_config(
        tmp_path,
        training={"rounds": 3},
        aggregation={"method": "rbla_product", "early_method": "rbla_tiered", "early_rounds": 1},
    )

    # Execute
    with caplog.at_level(logging.INFO):
        run_id = federated_training(config=config)

    # Assert
    assert merges == ["rbla_tiered", "rbla_product", "rbla_product"]
    lines = [r.getMessage() for r in caplog.records]
    assert "round 1 merged with rbla_tiered; rbla_product merges from round 2 on" in lines
    run = MlflowClient(tracking_uri=config.tracking.uri).get_run(run_id)
    assert run.data.tags["aggregator"] == "rbla_tiered1+rbla_product"
    assert run.info.run_name == "autorank-rbla_tiered1+rbla_product-digits-s0"
