"""A causal LM through the whole flow, on a tiny Llama built in memory: books of a text file as
natural clients, one held out whole, perplexity per round, ranks from the token criteria."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from autorank.rounds.checkpoint import DECISION_FILE, latest_round_dir
from flows.experiment import federated_training
from tests.flows.conftest import tiny_config
from tests.unit.conftest import TEXT_WORDS


@pytest.fixture(scope="module")
def lm_run(
    prefect_harness: None, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    tmp = tmp_path_factory.mktemp("lm")
    words = iter(TEXT_WORDS * 40)
    rows = ["text,book"]
    for book, n in (("gen", 90), ("exo", 60), ("lev", 40), ("ruth", 30), ("jude", 40)):
        rows.append(f'"{" ".join(next(words) for _ in range(n))}",{book}')
    (tmp / "books.csv").write_text("\n".join(rows) + "\n")
    config = tiny_config(
        tmp,
        data={
            "name": "text",
            "path": str(tmp / "books.csv"),
            "key_column": "book",
            "test_keys": ["jude"],
            "max_length": 8,
            "cache_dir": str(tmp / "cache"),
        },
        partition={"scheme": "natural", "n_clients": 4, "local_test_fraction": 0.0},
        model={"name": "causal_lm", "hf_name_or_path": str(tiny_llama_dir), "init": "random"},
        lora={"r_min": 1, "r_max": 4},
        training={
            "rounds": 2,
            "clients_per_round": 3,
            "local_epochs": 1,
            "local_steps": 2,
            "warmup_epochs": 2,
            "optimizer": "adam",
            "lr": 0.01,
            "batch_size": 4,
        },
        tracking={
            "prompts": ["good day", "the film"],
            "generate_every": 1,
            "max_new_tokens": 4,
            "log_model": True,
        },
    )
    return config, federated_training(config=config)


def test_every_round_reports_the_held_out_perplexity_against_the_pretrained_one(
    lm_run: Any,
) -> None:
    config, run_id = lm_run
    client = MlflowClient(tracking_uri=config.tracking.uri)

    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "global/perplexity")

    assert run.info.status == "FINISHED"
    assert [m.step for m in history] == [1, 2]
    assert all(m.value > 1.0 for m in history)
    assert [m.step for m in client.get_metric_history(run_id, "pretrained/perplexity")] == [0]
    assert run.data.metrics["pretrained/perplexity"] > history[-1].value  # it learned the books


def test_ranks_come_from_the_books_token_criteria(lm_run: Any) -> None:
    config, run_id = lm_run

    decision = json.loads((config.runtime.checkpoint_dir / run_id / DECISION_FILE).read_text())

    rows = decision["clients"]
    assert len(rows) == 4  # gen, exo, lev, ruth; jude is held out
    assert all(row["labels_held"] == 1 for row in rows)  # one "label": the text
    assert len({row["entropy"] for row in rows}) == 4  # their tokens' entropies, not a label's
    assert len({row["rank"] for row in rows}) > 1


def test_the_checkpointed_base_keeps_the_tied_output_layer_once(lm_run: Any) -> None:
    config, run_id = lm_run

    folder = latest_round_dir(config.runtime.checkpoint_dir, run_id)

    assert folder is not None
    meta = json.loads((folder / "meta.json").read_text())
    base = load_file(str(folder.parent / meta["base_file"]))
    assert "model.model.embed_tokens.weight" in base and "model.lm_head.weight" not in base


def test_generations_from_fixed_prompts_are_logged_before_and_after_rounds(lm_run: Any) -> None:
    config, run_id = lm_run
    client = MlflowClient(tracking_uri=config.tracking.uri)

    files = sorted(f.path for f in client.list_artifacts(run_id, "generations"))
    text = Path(client.download_artifacts(run_id, files[-1], str(config.runtime.checkpoint_dir)))

    assert files == [f"generations/round_000{r}.txt" for r in (0, 1, 2)]
    lines = text.read_text().splitlines()
    assert lines[0] == "round 2, greedy, 4 new tokens"
    assert "> good day" in lines and "> the film" in lines
    continued = lines[lines.index("> good day") + 1]
    assert continued.startswith("good day") and len(continued) > len("good day")


def test_the_logged_model_continues_prompts_as_the_run_s_last_generations(
    lm_run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, run_id = lm_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking.uri)  # MLflow's loaders read it
    client = MlflowClient(tracking_uri=config.tracking.uri)
    last = client.download_artifacts(
        run_id, "generations/round_0002.txt", str(config.runtime.checkpoint_dir)
    )
    lines = Path(last).read_text().splitlines()

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    got = model.predict(pd.DataFrame({"text": ["good day"]}), params={"max_new_tokens": 4})

    assert lines[lines.index("> good day") + 1] == "good day" + got[0]
    folder = Path(client.download_artifacts(run_id, "adapter", str(config.runtime.checkpoint_dir)))
    assert not (folder / "base" / "model.safetensors").exists()  # served from the pretrained one
