"""The AutoRank flow: partition -> profile -> warm up -> assign ranks -> federated rounds.

Each round: parallel client training -> aggregate -> evaluate -> checkpoint -> log. A run
resumes from its newest checkpoint in the same MLflow run (``resume_run_id``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from torch import nn

from autorank.adapters import AdapterState
from autorank.backend import LoraSettings, warmup_jobs
from autorank.config import ExperimentConfig, config_digest
from autorank.federation import Federation
from autorank.lora import merge_base_delta
from autorank.models import head_modules
from autorank.ranks import RankAssignment
from autorank.rounds import (
    ClientData,
    RoundReport,
    check_finite,
    client_data,
    communication,
    initial_states,
    round_jobs,
    test_data,
)
from autorank.training import TrainSettings
from flows.ranking import layer_ranges, public_fraction
from flows.run_records import (
    close_interrupted_or_failed,
    finish_run,
    open_run,
    record_decision,
    relog_checkpoint_round,
)
from flows.runners import client_task_resources, task_runner_for
from tasks.checkpointing import load_round, save_round
from tasks.clients import ClientOutcome, train_client, warm_up_client
from tasks.ranking import rank_clients
from tasks.server import aggregate_round, evaluate_global
from tasks.setup import build_base, load_federation
from tasks.tracking import track_round

progress = logging.getLogger("autorank.progress")


@dataclass
class RunState:
    """What changes from round to round (and what a checkpoint restores)."""

    base: nn.Module
    global_state: AdapterState
    client_states: list[AdapterState]
    assignment: RankAssignment
    history: list[float]
    last_metrics: dict[str, float]
    start_round: int


def _settings(config: ExperimentConfig) -> tuple[LoraSettings, TrainSettings]:
    head = head_modules(config.model.name)
    return LoraSettings.from_config(config.lora, head), TrainSettings.from_config(config.training)


def _common(config: ExperimentConfig, base: nn.Module) -> dict[str, Any]:
    """Task parameters every client shares."""
    lora, train = _settings(config)
    return {
        "base": base,
        "lora": lora,
        "train": train,
        "device": config.runtime.device,
        "threads": config.runtime.threads_per_client,
    }


def _warm_up_and_rank(
    config: ExperimentConfig,
    base: nn.Module,
    federation: Federation,
    data: list[ClientData],
    runner: TaskRunner[Any],
) -> RankAssignment:
    """Warm-up round at the maximum ranks (for learning difficulty), then rank assignment."""
    layers = layer_ranges(config)
    profiles = federation.profiles()
    if "learning_difficulty" in config.ranking.criteria and config.ranking.assigner == "autorank":
        jobs = warmup_jobs(
            [d.x for d in data],
            [d.y for d in data],
            ranks={k: hi for k, (_, hi) in layers.items()},
            epochs=config.training.warmup_epochs,
            seed=config.seed,
        )
        common = _common(config, base)
        with client_task_resources(config.runtime):
            futures = [runner.submit(warm_up_client, {"job": job, **common}) for job in jobs]
        curves = [f.result() for f in futures]
        profiles = federation.profiles([list(c) for c in curves])
        progress.info("warm-up done: %d loss curves", len(curves))
    return rank_clients(
        profiles,
        config.ranking,
        r_min=config.lora.r_min,
        r_max=config.lora.r_max,
        layers=layers,
        n_classes=federation.data.n_classes,
        seed=config.seed,
    )


def _fresh_state(
    config: ExperimentConfig,
    run_id: str,
    base: nn.Module,
    federation: Federation,
    data: list[ClientData],
    runner: TaskRunner[Any],
) -> RunState:
    assignment = _warm_up_and_rank(config, base, federation, data, runner)
    record_decision(config.tracking.uri, run_id, federation, assignment)
    lora, _ = _settings(config)
    global_state, states = initial_states(base, assignment.ranks(), lora, seed=config.seed)
    return RunState(base, global_state, states, assignment, [], {}, 1)


def _train_round(
    config: ExperimentConfig,
    state: RunState,
    data: list[ClientData],
    round_idx: int,
    runner: TaskRunner[Any],
) -> list[ClientOutcome]:
    jobs = round_jobs(
        data,
        state.client_states,
        state.assignment.ranks(),
        epochs=config.training.local_epochs,
        seed=config.seed,
        round_idx=round_idx,
    )
    common = _common(config, state.base)
    with client_task_resources(config.runtime):
        futures = [
            runner.submit(train_client, {"job": job, "data": d, **common})
            for job, d in zip(jobs, data, strict=True)
        ]
    for done, _ in enumerate(as_completed(list(futures)), start=1):
        progress.debug("round %d: %d/%d clients done", round_idx, done, len(jobs))
    return [f.result() for f in futures]


def _run_round(
    config: ExperimentConfig,
    run_id: str,
    state: RunState,
    data: list[ClientData],
    test: tuple[Any, Any],
    round_idx: int,
    runner: TaskRunner[Any],
) -> RunState:
    start = time.perf_counter()
    lora, _ = _settings(config)
    outcomes = _train_round(config, state, data, round_idx, runner)
    results = [o.result for o in outcomes]
    check_finite(round_idx, results)  # before NaN reaches the aggregator (SVD would fail)
    agg = aggregate_round(config.aggregation.method, results)
    if agg.base_delta:
        merge_base_delta(state.base, agg.base_delta)
    ev = evaluate_global(
        state.base,
        agg.global_state,
        merged=bool(agg.base_delta),
        lora=lora,
        x=test[0],
        y=test[1],
        device=config.runtime.device,
    )
    check_finite(round_idx, results, ev.loss)  # an aggregate of finite factors can still blow up
    up, down = communication(results, agg)
    report = RoundReport(
        round_idx,
        ev,
        [o.personal for o in outcomes],
        results,
        up,
        down,
        time.perf_counter() - start,
    )
    metrics = report.metrics()
    new = replace(
        state,
        global_state=agg.global_state,
        client_states=agg.client_states,
        history=[*state.history, ev.accuracy],
        last_metrics=metrics,
    )
    save_round(
        config.runtime.checkpoint_dir,
        run_id=run_id,
        digest=config_digest(config),
        round_idx=round_idx,
        base=new.base.state_dict(),
        global_state=new.global_state,
        client_states=new.client_states,
        meta={
            "metrics": metrics,
            "history": new.history,
            "rank_decision": new.assignment.to_json(),
        },
    )
    track_round(config.tracking.uri, run_id, metrics, round_idx)
    progress.info(
        "round %d/%d: global accuracy %.4f, clients' mean accuracy %.4f (%.1f s)",
        round_idx,
        config.training.rounds,
        ev.accuracy,
        metrics["clients/mean_accuracy"],
        report.seconds,
    )
    return new


@flow(name="autorank", task_runner=ThreadPoolTaskRunner(), log_prints=True)  # type: ignore[arg-type]
def federated_training(
    config: ExperimentConfig = ExperimentConfig(),  # noqa: B008
    resume_run_id: str | None = None,
) -> str:
    """AutoRank federated LoRA: partition, profile, warm up, rank, then train/aggregate rounds."""
    run_id = open_run(config, resume_run_id)
    try:
        federation = load_federation(
            config.data, config.partition, public_fraction=public_fraction(config), seed=config.seed
        )
        base = build_base(
            config.model,
            federation,
            lr=config.training.lr,
            batch_size=config.training.batch_size,
            seed=config.seed,
        )
        data, test = client_data(federation), test_data(federation)
        # Client training goes to the configured runner (threads, or a Dask cluster), also
        # when the flow runs from a deployment.
        with task_runner_for(config.runtime) as runner:
            state = _restore(config, run_id, base) or _fresh_state(
                config, run_id, base, federation, data, runner
            )
            for round_idx in range(state.start_round, config.training.rounds + 1):
                state = _run_round(config, run_id, state, data, test, round_idx, runner)
        finish_run(config, run_id, state.global_state, state.history, state.last_metrics)
    except BaseException as err:
        hint = f"`autorank resume {run_id}`"
        close_interrupted_or_failed(config.tracking.uri, run_id, err, hint)
        raise
    return run_id


def _restore(config: ExperimentConfig, run_id: str, base: nn.Module) -> RunState | None:
    """The state after the newest checkpointed round, or None to start from scratch."""
    ckpt = load_round(config.runtime.checkpoint_dir, run_id=run_id, digest=config_digest(config))
    if ckpt is None:
        return None
    base.load_state_dict(dict(ckpt.base))
    assignment = RankAssignment.from_json(ckpt.meta["rank_decision"])
    relog_checkpoint_round(config.tracking.uri, run_id, ckpt)
    progress.info("resuming run %s after round %d", run_id, ckpt.round_idx)
    return RunState(
        base,
        ckpt.global_state,
        list(ckpt.client_states),
        assignment,
        list(ckpt.meta["history"]),
        dict(ckpt.meta["metrics"]),
        ckpt.round_idx + 1,
    )
