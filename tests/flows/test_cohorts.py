"""A sampled run of many clients: cohort tasks, bounded metric keys, per-client tables."""

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flows.experiment import federated_training
from tests.flows.conftest import tiny_config

ROUNDS = 3


@pytest.fixture(scope="module")
def sampled_run(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("cohorts")
    config = tiny_config(
        tmp,
        partition={"n_clients": 12, "scheme": "dirichlet", "alpha": 1.0},
        training={"rounds": ROUNDS, "local_epochs": 1, "clients_per_round": 5},
        tracking={"keyed_clients_max": 4},
        runtime={"max_workers": 2, "backend": "batched", "cohort_size": 3},
    )
    run_id = federated_training(config=config)
    return config, run_id, MlflowClient(tracking_uri=config.tracking.uri), tmp


def test_metric_keys_do_not_grow_with_clients(sampled_run) -> None:
    _, run_id, client, _ = sampled_run

    keys = set(client.get_run(run_id).data.metrics)

    assert not [k for k in keys if k.startswith("per_client/c")]
    for key in (
        "per_client/accuracy_p10",
        "per_client/accuracy_median",
        "per_client/train_loss_max",
    ):
        assert len(client.get_metric_history(run_id, key)) == ROUNDS, key
    sampled = client.get_metric_history(run_id, "per_client/sampled")
    assert [m.value for m in sorted(sampled, key=lambda m: m.step)] == [5.0] * ROUNDS


def test_each_round_has_a_table_of_its_sampled_clients(sampled_run) -> None:
    config, run_id, client, tmp = sampled_run

    folder = Path(client.download_artifacts(run_id, "clients", str(tmp / "dl")))
    tables = sorted(folder.glob("round_*.json"))

    assert [t.name for t in tables] == [f"round_{r:04d}.json" for r in range(1, ROUNDS + 1)]
    first = json.loads(tables[0].read_text())
    rows = [dict(zip(first["columns"], row, strict=True)) for row in first["data"]]
    assert len(rows) == 5
    clients = [r["client"] for r in rows]
    assert clients == sorted(clients) and len(set(clients)) == 5
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows if r["accuracy"] is not None)
    assert all(r["rank/fc1"] >= config.lora.r_min for r in rows)
    ckpt = json.loads(
        next(config.runtime.checkpoint_dir.glob(f"{run_id}/round_*/meta.json")).read_text()
    )
    assert len(ckpt["sampled"]) == 5


def test_a_round_is_a_handful_of_task_runs_all_recorded(sampled_run) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, run_id, client, _ = sampled_run
    flow_run_id = client.get_run(run_id).data.tags["prefect.flow_run_id"]
    flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as prefect:
        deadline = time.monotonic() + 30
        while True:  # the API server records task runs from events, slightly after the fact
            runs = prefect.read_task_runs(flow_run_filter=flt)
            done = [r for r in runs if r.state is not None and r.state.is_completed()]
            if len(done) == len(runs) and any(r.name.startswith("round-3-") for r in runs):
                break
            assert time.monotonic() < deadline, [(r.name, r.state) for r in runs]
            time.sleep(0.5)

    per_round = [r.name for r in runs if r.name.startswith("round-2-")]
    # 2 cohorts and the server's step with the record: at most twice the cohorts
    assert sorted(per_round) == [
        "round-2-aggregate-evaluate-record",
        "round-2-cohort-0",
        "round-2-cohort-1",
    ]


def test_the_warm_up_trains_a_rounds_worth_of_clients_at_a_time(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record how many clients each warm-up call trains
    from autorank.recipe import federation_for, untrained_base
    from autorank.rounds.steps import client_data
    from flows.engines import Engines, build_engines
    from flows.ranking import _warm_up
    from flows.runners import task_runner_for

    sizes: list[int] = []
    train = Engines.train

    def recording(self: Engines, config: Any, jobs: Any, *args: Any) -> Any:
        sizes.append(len(jobs))
        return train(self, config, jobs, *args)

    monkeypatch.setattr(Engines, "train", recording)
    curves = {}

    # Execute: the same warm-up under full and under partial participation
    for per_round in (None, 5):
        config = tiny_config(
            tmp_path,
            partition={"n_clients": 12},
            training={"clients_per_round": per_round},
            runtime={"backend": "batched", "cohort_size": 3},
        )
        federation = federation_for(config)
        base = untrained_base(config, federation).requires_grad_(False)
        data = client_data(federation)
        with task_runner_for(config.runtime) as runner:
            engines = build_engines(config, base, data, runner)
            curves[per_round] = _warm_up(config, base, data, engines)

    # Assert: at most a round's clients at a time, and the same curves to the bit
    assert sizes == [12, 5, 5, 2]
    assert curves[5] == curves[None]


def test_the_partition_record_is_a_spread_of_sizes_beyond_the_keyed_clients(sampled_run) -> None:
    config, run_id, client, tmp = sampled_run

    logged = json.loads(
        Path(client.download_artifacts(run_id, "data/partition.json", str(tmp / "p"))).read_text()
    )

    from autorank.recipe import federation_for

    layout = federation_for(config).layout()
    assert "clients" not in logged and logged["n_clients"] == 12
    assert logged["digest"] == layout["digest"]
    trains = [c["train"] for c in layout["clients"]]
    assert logged["client_sizes"]["train"] == {
        "total": sum(trains),
        "min": min(trains),
        "median": float(np.median(trains)),
        "max": max(trains),
    }


def test_a_generated_populations_label_plot_draws_a_bounded_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a population larger than the plot's sample, and the figure it is handed
    from autorank.config import PartitionConfig
    from autorank.data.federation import synthetic_federation
    from autorank.data.synthetic import SyntheticSettings
    from flows import run_records

    fed = synthetic_federation(
        SyntheticSettings(), PartitionConfig(n_clients=50), public_fraction=0.0, seed=0
    )
    drawn: list[np.ndarray] = []
    monkeypatch.setattr(run_records, "LABELS_DRAWN", 20)
    monkeypatch.setattr(run_records, "label_distribution", lambda counts: drawn.append(counts))
    monkeypatch.setattr(run_records.tracking, "track_figure", lambda *args: None)

    # Execute
    run_records.record_labels(tiny_config(Path("/nonexistent")), "run", fed)

    # Assert: 20 clients drawn, the others never
    assert [d.shape for d in drawn] == [(20, 10)]
    assert "histogram" not in fed.__dict__


def test_beyond_the_keyed_clients_the_decision_is_a_summary_beside_a_parquet_table(
    sampled_run,
) -> None:
    config, run_id, client, tmp = sampled_run
    from flows.run_records import read_decision

    logged = json.loads(
        Path(client.download_artifacts(run_id, "rank_decision.json", str(tmp / "r"))).read_text()
    )
    whole = read_decision(config.tracking.uri, run_id)

    kept = json.loads((config.runtime.checkpoint_dir / run_id / "rank_decision.json").read_text())
    assert "clients" not in logged and logged["table"] == "rank_decision.parquet"
    assert logged["n_clients"] == 12 and logged["weights"] == kept["weights"]
    ranks = [row["rank"] for row in kept["clients"]]
    assert logged["ranks"]["max"] == max(ranks) and logged["ranks"]["min"] == min(ranks)
    assert whole["clients"] == kept["clients"]
