"""Round metrics written in the background: once per step, awaited, rewritten after a failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks import round_writer, tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('tracking')}/mlflow.db"  # one schema set-up


@pytest.fixture
def run(store: str) -> tuple[str, str]:
    uri = store
    client = tracking.client_for(uri)
    run_id = client.create_run(tracking.experiment_id(uri, "t")).info.run_id
    return uri, run_id


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted(
        (m.step, m.value) for m in tracking.client_for(uri).get_metric_history(run_id, key)
    )


def test_background_rounds_land_once_each_after_settle(run: tuple[str, str]) -> None:
    uri, run_id = run
    for step in (1, 2, 3):
        metrics = {"global/accuracy": step / 10, "global/loss": 1.0 / step}
        round_writer.log_round(uri, run_id, metrics, step, background=True)
    round_writer.log_round(
        uri, run_id, {"global/accuracy": 0.3, "global/loss": 0.5}, 3, background=True
    )
    round_writer.settle(run_id)
    assert _history(uri, run_id, "global/accuracy") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert _history(uri, run_id, "global/loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


def test_synchronous_round_is_not_logged_twice(run: tuple[str, str]) -> None:
    uri, run_id = run
    round_writer.log_round(uri, run_id, {"global/accuracy": 0.5}, 1, background=True)
    round_writer.log_round(uri, run_id, {"global/accuracy": 0.5}, 1)  # a resume re-logging it
    assert _history(uri, run_id, "global/accuracy") == [(1, 0.5)]


def _store_away(*args: object, **kwargs: object) -> None:
    raise MlflowException("the store went away")


def test_failed_background_write_is_written_again_on_settle(
    run: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, run_id = run
    monkeypatch.setattr(tracking, "log_metrics", _store_away)
    round_writer.log_round(uri, run_id, {"global/accuracy": 0.7}, 4, background=True)
    round_writer._writer.submit(lambda: None).result()  # the failed write is done
    monkeypatch.undo()
    assert _history(uri, run_id, "global/accuracy") == []
    round_writer.settle(run_id)
    assert _history(uri, run_id, "global/accuracy") == [(4, 0.7)]


def test_a_rewrite_that_fails_stays_pending(
    run: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, run_id = run
    monkeypatch.setattr(tracking, "log_metrics", _store_away)
    round_writer.log_round(uri, run_id, {"global/accuracy": 0.7}, 5, background=True)
    with pytest.raises(MlflowException, match="the store went away"):
        round_writer.settle(run_id)
    monkeypatch.undo()
    round_writer.settle(run_id)  # the store is back: the pending round is written now
    assert _history(uri, run_id, "global/accuracy") == [(5, 0.7)]


def test_a_round_table_is_written_with_its_metrics_and_once(
    run: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, run_id = run
    table = {"client": [0, 3], "accuracy": [0.5, None]}
    round_writer.log_round(uri, run_id, {"global/accuracy": 0.5}, 1, table=table, background=True)
    round_writer.settle(run_id)
    assert tracking.has_artifact(uri, run_id, "clients/round_0001.json")

    def twice(*args: object, **kwargs: object) -> None:
        raise AssertionError("written twice")

    monkeypatch.setattr(tracking, "log_client_table", twice)
    monkeypatch.setattr(tracking, "log_metrics", twice)
    round_writer.log_round(uri, run_id, {"global/accuracy": 0.5}, 1, table=table)  # a resume
    text = tracking.client_for(uri).download_artifacts(run_id, "clients/round_0001.json")
    import json
    from pathlib import Path

    assert json.loads(Path(text).read_text()) == {
        "columns": ["client", "accuracy"],
        "data": [[0, 0.5], [3, None]],
    }


def test_the_ui_link_opens_the_classic_runs_view_of_the_experiment_run_last(
    tmp_path: Path,
) -> None:
    from tasks.tracking import experiments_page

    uri, server = f"sqlite:///{tmp_path}/m.db", "http://127.0.0.1:5000"
    assert experiments_page(uri, server) == f"{server}/#/experiments?workflowType=machine_learning"
    assert not (tmp_path / "m.db").exists()  # a store not there yet is not created

    client = MlflowClient(tracking_uri=uri)
    first, second = (client.create_experiment(name) for name in ("first", "second"))
    client.create_run(second, start_time=1_000)
    client.create_run(first, start_time=2_000)  # started last

    assert experiments_page(uri, server) == (
        f"{server}/#/experiments/{first}/runs?workflowType=machine_learning"
    )
