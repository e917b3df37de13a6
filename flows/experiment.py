"""The AutoRank flow: partition -> profile -> warm up -> assign ranks -> federated rounds.

Each round: sample the clients -> train them in a handful of cohort tasks -> (every
``ranking.rerank_every`` rounds: decide the ranks again from the round's loss curves) -> one
server task (aggregate, evaluate, checkpoint, MLflow). A run resumes from its newest checkpoint
in the same MLflow run (``resume_run_id``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from torch import nn

from autorank.config import AggregatorName, ExperimentConfig, config_digest
from autorank.data.federation import Federation
from autorank.engine.jobs import ClientJob, ClientOutcome, limit_threads, warmup_jobs
from autorank.lora.adapters import AdapterState
from autorank.lora.targets import target_sizes
from autorank.ranking.assignment import RankAssignment
from autorank.ranking.budget import draw_caps
from autorank.ranking.profiling import ClientProfile, profile_clients
from autorank.ranking.reranking import remeasured_profiles, rerank_due
from autorank.recipe import layer_ranges, lora_settings, public_fraction
from autorank.rounds.checkpoint import (
    DECISION_FILE,
    Checkpoint,
    decision_file_of,
    load_decision,
    run_lock,
    save_decision,
)
from autorank.rounds.cohorts import sample_clients, split_cohorts
from autorank.rounds.growth import fit_global
from autorank.rounds.steps import (
    ClientData,
    check_finite,
    client_data,
    initial_state,
    round_jobs,
    test_data,
)
from flows import RESUME_NOTE, run_views
from flows.engines import Engines, build_engines
from flows.failure_records import drop_failure_record
from flows.model_records import record_data
from flows.ranking import early_gaps, early_plan, first_rounds
from flows.run_records import (
    close_interrupted_or_failed,
    finish_run,
    open_run,
    record_decision,
    record_early_merge,
    relog_checkpoint_round,
    run_finished,
    run_name,
)
from flows.run_views import progress_in_run_log
from flows.runners import client_task_resources, opaque, signals_deferred, task_runner_for
from tasks.checkpointing import load_round
from tasks.clients import train_cohort
from tasks.ranking import rank_clients
from tasks.server import ClosedRound, RoundClose, close_round
from tasks.setup import build_base, load_federation

progress = logging.getLogger("autorank.progress")
T = TypeVar("T")


@dataclass
class RunState:
    """What changes from round to round (and what a checkpoint restores).

    ``fresh``: the last update was merged into the base (FLoRA), so clients start fresh adapters.
    ``base_version`` counts those merges (engines on another device copy the base when it moves).
    ``decision_file``: the checkpoint file of ``assignment`` (a new one after each re-ranking).
    """

    base: nn.Module
    global_state: AdapterState
    fresh: bool
    assignment: RankAssignment
    history: list[float]
    start_round: int
    base_version: int = 0
    decision_file: str = DECISION_FILE


def _same(value: T) -> T:
    return value


def _run_cohorts(
    config: ExperimentConfig,
    engines: Engines,
    jobs: Sequence[ClientJob],
    data: Sequence[ClientData] | None,
    base: nn.Module,
    base_version: int,
    label: str,
) -> list[ClientOutcome]:
    """Split the jobs into cohorts, one task each on the configured runner; outcomes in order.

    With ``data`` each client is also evaluated on its local split (not in the warm-up).
    """
    # Balanced by local steps, so that parallel cohorts finish together.
    steps = [j.epochs * -(-int(j.x.shape[0]) // config.training.batch_size) for j in jobs]
    chunks = split_cohorts(jobs, len(engines.backends), steps)
    # Dask ships parameters itself (and would unpack Prefect's quote as a plain tuple).
    wrap = opaque if config.runtime.task_runner == "threads" else _same
    futures = engines.in_flight  # what Engines.stop waits for if the run is interrupted
    with client_task_resources(config.runtime):
        for i, chunk in enumerate(chunks):
            parameters = {
                "engine": engines.backends[i],
                "jobs": wrap(chunk),
                "tests": wrap(
                    None if data is None else [data[j.client].local_split() for j in chunk]
                ),
                "base": base,
                "base_version": base_version,
                "threads": config.runtime.threads_per_client,
                "label": f"{label}-cohort-{i}",
            }
            # Whole or not at all: a signal inside a submission could leave a cohort running
            # that nothing waits for (the executor starts its thread, then records it).
            with signals_deferred():
                futures.append(engines.runner.submit(train_cohort, parameters))
    done = {o.result.client: o for f in futures for o in f.result()}
    futures.clear()
    return [done[j.client] for j in jobs]  # the jobs' order, whatever the cohorts were


def _warm_up_and_rank(
    config: ExperimentConfig,
    base: nn.Module,
    federation: Federation,
    data: list[ClientData],
    engines: Engines,
) -> RankAssignment:
    """Warm-up round at the maximum ranks (for learning difficulty), then rank assignment."""
    layers = layer_ranges(config)
    profiles = profile_clients(federation.histogram)
    if "learning_difficulty" in config.ranking.criteria and config.ranking.assigner == "autorank":
        r = config.ranking
        caps = draw_caps(range(len(data)), r.rank_caps, r.cap_tiers, config.seed)
        jobs = warmup_jobs(
            [d.x for d in data],
            [d.y for d in data],
            ranks={k: hi for k, (_, hi) in layers.items()},
            epochs=config.training.warmup_epochs,
            seed=config.seed,
            caps=caps,
        )
        capped = sum(cap is not None for cap in caps)
        progress.info(
            "warm-up: %d clients, %d epochs at the maximum ranks%s (for learning difficulty)",
            len(jobs),
            config.training.warmup_epochs,
            f", {capped} at its device's cap" if capped else "",
        )
        outcomes = _run_cohorts(config, engines, jobs, None, base, 0, "warm-up")
        check_finite(0, [o.result for o in outcomes])
        curves = [list(o.result.epoch_losses) for o in outcomes]
        profiles = profile_clients(federation.histogram, curves)
        progress.info("warm-up done: %d loss curves", len(curves))
    return _decide(config, profiles, federation, base)


def _fresh_state(
    config: ExperimentConfig,
    run_id: str,
    base: nn.Module,
    federation: Federation,
    data: list[ClientData],
    engines: Engines,
) -> RunState:
    assignment = _warm_up_and_rank(config, base, federation, data, engines)
    # Once per run, not in every round's checkpoint: it grows with the number of clients.
    save_decision(config.runtime.checkpoint_dir, run_id, assignment.to_json())
    record_decision(config, run_id, federation, assignment)
    global_state = initial_state(base, assignment.ranks(), lora_settings(config), seed=config.seed)
    return RunState(base, global_state, False, assignment, [], 1)


def _run_round(
    config: ExperimentConfig,
    run_id: str,
    state: RunState,
    federation: Federation,
    data: list[ClientData],
    test: tuple[Any, Any],
    round_idx: int,
    engines: Engines,
) -> RunState:
    start = time.perf_counter()
    if config.ranking.rerank_every:  # a new decision may hold ranks above the global adapter's
        grown = fit_global(
            state.global_state,
            state.base,
            state.assignment.ranks(),
            lora_settings(config),
            seed=config.seed * 1_000_003 + round_idx,
        )
        state = replace(state, global_state=grown)
    sampled = sample_clients(
        len(data), config.training.clients_per_round, seed=config.seed, round_idx=round_idx
    )
    jobs = round_jobs(
        data,
        sampled,
        state.global_state,
        state.assignment.ranks(),
        engines.paths,
        lora_settings(config),
        fresh=state.fresh,
        epochs=config.training.local_epochs,
        seed=config.seed,
        round_idx=round_idx,
    )
    outcomes = _run_cohorts(
        config, engines, jobs, data, state.base, state.base_version, f"round-{round_idx}"
    )
    trained = time.perf_counter()
    assignment, decision_file = state.assignment, state.decision_file
    if rerank_due(round_idx, config.ranking.rerank_every, config.training.rounds):
        assignment = _rerank(config, run_id, state, federation, outcomes, round_idx)
        decision_file = save_decision(
            config.runtime.checkpoint_dir, run_id, assignment.to_json(), after_round=round_idx
        )
    method, whole_early = _round_merge(
        config,
        run_id,
        state.assignment,
        federation,
        round_idx,
        announce=round_idx == state.start_round,
    )
    with signals_deferred():  # a signal lands after the round's close, not inside it
        closed: ClosedRound = close_round(
            opaque(
                RoundClose(
                    method=method,
                    outcomes=outcomes,
                    previous=state.global_state,
                    base=state.base,
                    template=engines.evaluator,
                    x=test[0],
                    y=test[1],
                    round_idx=round_idx,
                    started=start,
                    train_seconds=trained - start,
                    n_clients=len(data),
                    keyed_clients=len(data) <= config.tracking.keyed_clients_max,
                    table_due=round_idx % config.tracking.client_table_every == 0
                    or round_idx == config.training.rounds,
                    history=state.history,
                    sampled=sampled,
                    root=config.runtime.checkpoint_dir,
                    uri=config.tracking.uri,
                    run_id=run_id,
                    digest=config_digest(config),
                    threads=config.runtime.threads_per_client,
                    decision_file=decision_file,
                )
            )
        )
    step, metrics = closed.step, closed.metrics
    merged = bool(step.aggregation.base_delta)
    new = replace(
        state,
        global_state=step.global_state,
        fresh=merged,
        history=[*state.history, step.evaluation.accuracy],
        base_version=state.base_version + int(merged),
        assignment=assignment,
        decision_file=decision_file,
    )
    if assignment is not state.assignment:
        engines.set_ranks(assignment.ranks())
    progress.info(
        "round %d/%d: global accuracy %.4f, loss %.4f, clients' mean accuracy %.4f (%.1f s)",
        round_idx,
        config.training.rounds,
        step.evaluation.accuracy,
        step.evaluation.loss,
        metrics["per_client/accuracy_mean"],
        closed.seconds,
        extra={"round": round_idx, "rounds": config.training.rounds},
    )
    agg, rounds = config.aggregation, config.training.rounds
    if whole_early and method == agg.early_method and agg.early_rounds == round_idx < rounds:
        progress.info(
            "%s merged with %s; %s merges from round %d on",
            first_rounds(round_idx),
            agg.early_method,
            agg.method,
            round_idx + 1,
        )
    return new


def _round_merge(
    config: ExperimentConfig,
    run_id: str,
    assignment: RankAssignment,
    federation: Federation,
    round_idx: int,
    *,
    announce: bool,
) -> tuple[AggregatorName, bool]:
    """The merge of the round, and whether the early merge ran in every early round.

    With ``early_when: all_labels`` the early merge runs in the early rounds whose clients, in
    every rank tier, hold every label. With ``announce`` (the first round this process runs:
    round 1, or a resume's first) the plan is logged and recorded as a tag (the same plan
    again on a resume: sampling and ranks are those of the interrupted run).
    """
    agg = config.aggregation
    if agg.early_method is None or agg.early_when == "always" or round_idx > agg.early_rounds:
        return agg.method_at(round_idx), True
    gaps = early_gaps(config, assignment, federation)
    if announce:
        plan = early_plan(agg, gaps)
        progress.info("early merge %s", plan)
        record_early_merge(config.tracking.uri, run_id, plan)
    covered = gaps[round_idx - 1] is None
    return agg.method_at(round_idx, labels_covered=covered), all(g is None for g in gaps)


def _decide(
    config: ExperimentConfig,
    profiles: Sequence[ClientProfile],
    federation: Federation,
    base: nn.Module,
) -> RankAssignment:
    """The configured assigner over the clients' profiles (with the rank budget, if any)."""
    sizes = target_sizes(base, list(layer_ranges(config)))
    return rank_clients(config, profiles, n_classes=federation.data.n_classes, layer_sizes=sizes)


def _rerank(
    config: ExperimentConfig,
    run_id: str,
    state: RunState,
    federation: Federation,
    outcomes: Sequence[ClientOutcome],
    round_idx: int,
) -> RankAssignment:
    """Decide the ranks again from this round's loss curves (``ranking.rerank_every``) and log the
    decision as the first one was, at this round's step; it holds from the next round on."""
    in_force = state.assignment
    curves = {o.result.client: list(o.result.epoch_losses) for o in outcomes}
    profiles = remeasured_profiles(profile_clients(federation.histogram), in_force, curves)
    assignment = _decide(config, profiles, federation, state.base)
    record_decision(config, run_id, federation, assignment, step=round_idx)
    before = {d.client: d.rank for d in in_force.decisions}
    changed = sum(before[d.client] != d.rank for d in assignment.decisions)
    progress.info(
        "round %d: ranks decided again from its loss curves: %d of %d clients changed rank, "
        "mean rank %.1f (was %.1f)",
        round_idx,
        changed,
        len(assignment.decisions),
        sum(d.rank for d in assignment.decisions) / len(assignment.decisions),
        sum(before.values()) / len(before),
    )
    return assignment


def _flow_run_name() -> str:
    """The flow run's name in Prefect: the MLflow run's name, and which run a resume continues."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    config = params.get("config") or ExperimentConfig()
    if not isinstance(config, ExperimentConfig):  # raw parameters: the flow validates them
        return "autorank"
    resumed = params.get("resume_run_id")
    return run_name(config) + (f" (resume {str(resumed)[:8]})" if resumed else "")


@flow(
    name="autorank",
    flow_run_name=_flow_run_name,
    task_runner=ThreadPoolTaskRunner(),  # type: ignore[arg-type]
    log_prints=True,
    on_failure=[drop_failure_record],  # no pickled exception left in Prefect's storage
)
def federated_training(
    config: ExperimentConfig = ExperimentConfig(),  # noqa: B008
    resume_run_id: str | None = None,
) -> str:
    """AutoRank federated LoRA: partition, profile, warm up, rank, then train/aggregate rounds."""
    limit_threads(config.runtime.threads_per_client)
    root = config.runtime.checkpoint_dir
    with contextlib.ExitStack() as held:
        held.enter_context(progress_in_run_log())
        ckpt = None
        if resume_run_id is not None:
            held.enter_context(run_lock(root, resume_run_id))
            if run_finished(config.tracking.uri, resume_run_id):
                progress.info("run %s already finished; nothing to resume", resume_run_id)
                return resume_run_id
            # A checkpoint that is not what it claims is refused before anything is written.
            ckpt = load_round(root, run_id=resume_run_id, digest=config_digest(config))
        run_id = open_run(config, resume_run_id)
        if resume_run_id is None:
            held.enter_context(run_lock(root, run_id))
        run_views.link_mlflow_run(config.tracking.uri, run_id, run_name(config))
        _train(config, run_id, ckpt)
        run_views.table_of_rounds(config.tracking.uri, run_id)
        return run_id


def _train(config: ExperimentConfig, run_id: str, ckpt: Checkpoint | None) -> str:
    """The run's body, between opening its MLflow run and marking it finished (or stopped)."""
    try:
        federation = load_federation(
            config.data, config.partition, public_fraction=public_fraction(config), seed=config.seed
        )
        record_data(config, run_id, federation)  # once: a resumed run logs nothing twice
        if config.model.init == "pretrain" and ckpt is None:
            progress.info("pre-training the base model on the server's public share")
        base = build_base(
            config.model,
            federation,
            lr=config.training.lr,
            batch_size=config.training.batch_size,
            seed=config.seed,
            threads=config.runtime.threads_per_client,
        )
        data, test = client_data(federation), test_data(federation)
        # Cohorts go to the configured runner (threads, or a Dask cluster), also when the flow
        # runs from a deployment.
        restored = None if ckpt is None else _restore(config, run_id, base, ckpt)
        with task_runner_for(config.runtime) as runner:
            engines = build_engines(config, base, data, runner)  # from the restored base
            try:
                state = restored or _fresh_state(config, run_id, base, federation, data, engines)
                engines.set_ranks(state.assignment.ranks())
                first, rounds = state.start_round, config.training.rounds
                progress.debug(  # starts the terminal's progress bar
                    "round %d/%d", first, rounds, extra={"round": first - 1, "rounds": rounds}
                )
                for round_idx in range(first, rounds + 1):
                    state = _run_round(
                        config, run_id, state, federation, data, test, round_idx, engines
                    )
            except BaseException:
                # Ctrl-C, SIGTERM or a failed cohort, wherever it lands (a submission too):
                # cohorts in flight stop at their next step, before the runner waits for them,
                # instead of finishing the round or the warm-up first.
                engines.stop()
                raise
        finish_run(
            config,
            run_id,
            state.global_state,
            state.history,
            engines.paths,
            base=state.base,
            merged=state.fresh,
            data=federation.data,
        )
    except BaseException as err:
        hint = f"`autorank resume {run_id}`"
        close_interrupted_or_failed(config.tracking.uri, run_id, err, hint)
        err.add_note(RESUME_NOTE + hint)
        raise
    return run_id


def _restore(config: ExperimentConfig, run_id: str, base: nn.Module, ckpt: Checkpoint) -> RunState:
    """The state after the newest checkpointed round."""
    base.load_state_dict(dict(ckpt.base))
    assignment = RankAssignment.from_json(load_decision(config.runtime.checkpoint_dir, ckpt))
    decision_file = decision_file_of(ckpt)
    relog_checkpoint_round(config.tracking.uri, run_id, ckpt)
    progress.info("resuming run %s after round %d", run_id, ckpt.round_idx)
    return RunState(
        base,
        ckpt.global_state,
        ckpt.fresh,
        assignment,
        list(ckpt.meta["history"]),
        ckpt.round_idx + 1,
        decision_file=decision_file,
    )
