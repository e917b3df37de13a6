"""Re-ranking during training (``ranking.rerank_every``): decided, recorded and resumable."""

import json
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

import flows.experiment
from autorank.config import ExperimentConfig, config_digest
from autorank.rounds.checkpoint import load_checkpoint
from flows.experiment import federated_training
from tests.flows.conftest import tiny_config

KEYS = ("global/accuracy", "global/loss", "per_client/accuracy_mean", "ranks/mean")


def _config(tmp: Path) -> ExperimentConfig:
    return tiny_config(tmp, ranking={"rerank_every": 1}, training={"rounds": 3, "local_epochs": 2})


def _histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in (*KEYS, *(f"per_client/c{c:02d}/rank" for c in range(4)))
    }


@pytest.fixture(scope="module")
def reranked_run(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory):
    config = _config(tmp_path_factory.mktemp("rerank"))
    run_id = federated_training(config=config)
    return config, run_id, MlflowClient(tracking_uri=config.tracking.uri)


def _decision(config: ExperimentConfig, run_id: str, name: str) -> dict[str, Any]:
    return dict(json.loads((config.runtime.checkpoint_dir / run_id / name).read_text()))


def test_ranks_are_decided_again_after_every_t_rounds_but_the_last(reranked_run) -> None:
    config, run_id, _ = reranked_run
    folder = config.runtime.checkpoint_dir / run_id

    decisions = sorted(p.name for p in folder.glob("rank_decision*.json"))

    assert decisions == [
        "rank_decision.json",
        "rank_decision_round_0001.json",
        "rank_decision_round_0002.json",
    ]
    # Each re-measured learning difficulty from the round's curves: all 4 clients trained
    first = _decision(config, run_id, "rank_decision.json")
    again = _decision(config, run_id, "rank_decision_round_0001.json")
    ld = [[row["learning_difficulty"] for row in d["clients"]] for d in (first, again)]
    assert all(a != b for a, b in zip(*ld, strict=True))
    # The newest checkpoint trains under (and is bound to) the newest decision
    digest = config_digest(config)
    ckpt = load_checkpoint(config.runtime.checkpoint_dir, run_id, config_digest=digest)
    assert ckpt is not None and ckpt.meta["decision_file"] == "rank_decision_round_0002.json"
    meta = json.loads((folder / "round_0003" / "meta.json").read_text())
    assert "../rank_decision_round_0002.json" in meta["sha256"]


def test_every_decision_is_logged_like_the_first_at_its_round(reranked_run) -> None:
    config, run_id, client = reranked_run
    histories = _histories(client, run_id)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}

    assert [step for step, _ in histories["ranks/mean"]] == [0, 1, 2]
    for step, name in ((1, "rank_decision_round_0001.json"), (2, "rank_decision_round_0002.json")):
        ranks = [row["rank"] for row in _decision(config, run_id, name)["clients"]]
        assert dict(histories["ranks/mean"])[step] == pytest.approx(sum(ranks) / len(ranks))
        for c, rank in enumerate(ranks):
            assert dict(histories[f"per_client/c{c:02d}/rank"])[step] == rank
        assert name in artifacts
        assert f"plots/closeness_vs_rank_round_{step:04d}.png" in plots


def test_a_crash_after_a_re_ranking_resumes_to_the_same_run(
    reranked_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the same run, stopped inside round 2's close: after its re-ranking was decided,
    # saved and logged, before its checkpoint
    config = _config(tmp_path)
    real, calls = flows.experiment.close_round, []

    def crash_in_round_2(closing: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return real(closing)

    with monkeypatch.context() as patched:
        patched.setattr(flows.experiment, "close_round", crash_in_round_2)
        with pytest.raises(RuntimeError, match="power cut"):
            federated_training(config=config)
    client = MlflowClient(tracking_uri=config.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    run_id = run.info.run_id

    # Execute
    federated_training(config=config, resume_run_id=run_id)

    # Verify: every metric step once, with the uninterrupted run's values
    _, full_id, full_client = reranked_run
    assert _histories(client, run_id) == _histories(full_client, full_id)
    assert client.get_run(run_id).info.status == "FINISHED"
