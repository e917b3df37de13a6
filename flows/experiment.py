"""The AutoRank flow: partition -> profile -> warm up -> assign ranks -> federated rounds.

Each round: sample the clients -> train them in a handful of cohort tasks -> (every
``ranking.rerank_every`` rounds: decide the ranks again from the round's loss curves) -> one
server task (aggregate, evaluate, checkpoint, MLflow). A run resumes from its newest checkpoint
in the same MLflow run (``resume_run_id``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from torch import nn

from autorank.config import ExperimentConfig, config_digest
from autorank.config.vocab import TEXT_MODELS
from autorank.data.federation import Federation
from autorank.engine.jobs import limit_threads
from autorank.lora.adapters import AdapterState
from autorank.lora.functional import evaluate_state
from autorank.models.evaluation import EvalResult
from autorank.models.zoo import load_base_state
from autorank.ranking.assignment import RankAssignment
from autorank.ranking.reranking import rerank_due
from autorank.recipe import lora_settings, public_fraction, text_options
from autorank.rounds.checkpoint import (
    DECISION_FILE,
    Checkpoint,
    decision_file_of,
    load_decision,
    load_decisions_given,
    run_lock,
    save_decision,
)
from autorank.rounds.cohorts import sample_clients
from autorank.rounds.growth import fit_global
from autorank.rounds.steps import (
    RANKING_TIME,
    ClientData,
    client_data,
    initial_state,
    round_jobs,
    test_data,
)
from autorank.serving import generate
from flows import RESUME_NOTE, run_views
from flows.engines import Engines, build_engines
from flows.failure_records import drop_failure_record
from flows.invocation import command
from flows.model_records import record_data
from flows.ranking import (
    decide_first_participants,
    first_rounds,
    ranks_in_force,
    rerank,
    round_merge,
    warm_up_and_rank,
)
from flows.run_records import (
    close_interrupted_or_failed,
    finish_run,
    open_run,
    record_decision,
    record_labels,
    record_ranked,
    relog_checkpoint_round,
    run_finished,
    run_name,
)
from flows.run_views import progress_in_run_log
from flows.runners import opaque, signals_deferred, task_runner_for
from tasks import tracking
from tasks.checkpointing import RunTarget, load_round
from tasks.server import ClosedRound, RoundClose, close_round
from tasks.setup import build_base, load_federation

progress = logging.getLogger("autorank.progress")
T = TypeVar("T")


@dataclass
class RunState:
    """What changes from round to round (and what a checkpoint restores).

    ``fresh``: the last update was merged into the base (FLoRA), so clients start fresh adapters.
    ``base_version`` counts those merges (engines on another device copy the base when it moves).
    ``decision_file``: the checkpoint file of ``assignment`` (a new one after each re-ranking;
    under first participation, of the clients ranked in the last round that ranked any).
    ``ranks``: every client's target ranks in force (``ranks_in_force``), in client order.
    """

    base: nn.Module
    global_state: AdapterState
    fresh: bool
    assignment: RankAssignment
    history: list[float]
    start_round: int
    base_version: int = 0
    decision_file: str = DECISION_FILE
    ranks: list[dict[str, int]] = field(default_factory=list)


def _fresh_state(
    config: ExperimentConfig,
    run_id: str,
    base: nn.Module,
    federation: Federation,
    data: Sequence[ClientData],
    engines: Engines,
) -> RunState:
    started = time.perf_counter()
    assignment = warm_up_and_rank(config, base, federation, data, engines)
    # What deciding the ranks cost (profiles, the warm-up, CRITIC and TOPSIS), beside the
    # rounds' time/round_s: AutoRank's overhead over a fixed rank, and `compare --dry-run`'s
    # measure of a warm-up.
    seconds = time.perf_counter() - started
    tracking.log_metrics(config.tracking.uri, run_id, {RANKING_TIME: seconds}, step=0)
    # Once per run, not in every round's checkpoint: it grows with the number of clients.
    save_decision(config.runtime.checkpoint_dir, run_id, assignment.to_json())
    if assignment.decisions:
        record_decision(config, run_id, federation, assignment)
    else:  # first participation: the decisions come round by round
        record_labels(config, run_id, federation)
    ranks = ranks_in_force(config, assignment, federation.n_clients)
    global_state = initial_state(base, ranks, lora_settings(config), seed=config.seed)
    return RunState(base, global_state, False, assignment, [], 1, ranks=ranks)


def _round_line(ev: EvalResult, clients_mean: float) -> str:
    """A round's global figures: accuracy and loss (a causal LM's perplexity first), and the
    clients' mean personalised accuracy where they hold local test data."""
    line = f"global accuracy {ev.accuracy:.4f}, loss {ev.loss:.4f}"
    if ev.per_token:
        line = f"global perplexity {ev.perplexity:.2f}, next-token accuracy {ev.accuracy:.4f}"
    if not math.isnan(clients_mean):
        line += f", clients' mean accuracy {clients_mean:.4f}"
    return line


def _record_generations(
    config: ExperimentConfig, run_id: str, base: nn.Module, state: AdapterState, round_idx: int
) -> None:
    """A causal LM's greedy continuations of ``tracking.prompts`` after ``round_idx`` (0: the
    pretrained model), as ``generations/round_NNNN.txt``."""
    options = text_options(config)
    assert options is not None  # a causal LM reads text
    t = config.tracking
    texts = generate(base, state, options.tokenizer, t.prompts, max_new_tokens=t.max_new_tokens)
    lines = [f"round {round_idx}, greedy, {t.max_new_tokens} new tokens", ""]
    for prompt, text in zip(t.prompts, texts, strict=True):
        lines += [f"> {prompt}", f"{prompt}{text}", ""]
    tracking.log_text(t.uri, run_id, "\n".join(lines), f"generations/round_{round_idx:04d}.txt")


def _record_pretrained(
    config: ExperimentConfig,
    run_id: str,
    engines: Engines,
    state: RunState,
    test: tuple[Any, Any],
) -> None:
    """The pretrained model on the test split before any round (LoRA's ``B = 0``, a new head):
    ``pretrained/*`` metrics at step 0, what the rounds' ``global/*`` are read against."""
    ev = evaluate_state(engines.evaluator, state.global_state, *test)
    metrics = {"pretrained/accuracy": ev.accuracy, "pretrained/loss": ev.loss}
    if ev.per_token:
        metrics["pretrained/perplexity"] = ev.perplexity
    tracking.log_metrics(config.tracking.uri, run_id, metrics, step=0)
    shown = f", perplexity {ev.perplexity:.2f}" if ev.per_token else ""
    progress.info("pretrained model: accuracy %.4f, loss %.4f%s", ev.accuracy, ev.loss, shown)
    if config.model.name == "causal_lm":
        _record_generations(config, run_id, state.base, AdapterState({}), 0)


def _run_round(
    config: ExperimentConfig,
    target: RunTarget,
    state: RunState,
    federation: Federation,
    data: Sequence[ClientData],
    test: tuple[Any, Any],
    round_idx: int,
    engines: Engines,
) -> RunState:
    start, run_id = time.perf_counter(), target.run_id
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
        state.ranks,
        engines.paths,
        lora_settings(config),
        fresh=state.fresh,
        epochs=config.training.local_epochs,
        seed=config.seed,
        round_idx=round_idx,
        max_steps=config.training.local_steps,
    )
    outcomes = engines.train(
        config, jobs, data, state.base, state.base_version, f"round-{round_idx}"
    )
    trained = time.perf_counter()
    assignment, decision_file = state.assignment, state.decision_file
    ranks = state.ranks
    if rerank_due(round_idx, config.ranking.rerank_every, config.training.rounds):
        assignment = rerank(
            config, run_id, state.assignment, state.base, federation, outcomes, round_idx
        )
        decision_file = save_decision(
            config.runtime.checkpoint_dir, run_id, assignment.to_json(), after_round=round_idx
        )
        ranks = assignment.ranks()
        engines.set_ranks(ranks)
    elif config.difficulty_mode() == "first_participation":
        assignment, arrived = decide_first_participants(
            config, run_id, state.assignment, state.base, federation, outcomes, round_idx
        )
        if arrived.decisions:  # the newcomers' file only: the checkpoint reads them together
            decision_file = save_decision(
                config.runtime.checkpoint_dir, run_id, arrived.to_json(), after_round=round_idx
            )
            ranks = list(ranks)
            changed = {d.client: dict(d.layer_ranks) for d in arrived.decisions}
            for client, own in changed.items():
                ranks[client] = own
            engines.update_ranks(changed)
    method, whole_early = round_merge(
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
                    table_due=round_idx % config.tracking.client_table_every == 0
                    or round_idx == config.training.rounds,
                    history=state.history,
                    sampled=sampled,
                    target=target,
                    decision_file=decision_file,
                )
            )
        )
    step, metrics = closed.step, closed.metrics
    new = replace(
        state,
        global_state=step.global_state,
        fresh=step.aggregation.fresh,
        history=[*state.history, step.evaluation.accuracy],
        base_version=state.base_version + int(bool(step.aggregation.base_delta)),
        assignment=assignment,
        decision_file=decision_file,
        ranks=ranks,
    )
    progress.info(
        "round %d/%d: %s (%.1f s)",
        round_idx,
        config.training.rounds,
        _round_line(step.evaluation, metrics["per_client/accuracy_mean"]),
        closed.seconds,
        extra={"round": round_idx, "rounds": config.training.rounds},
    )
    agg, rounds, every = config.aggregation, config.training.rounds, config.tracking.generate_every
    if config.model.name == "causal_lm" and (
        round_idx == rounds or (every and round_idx % every == 0)
    ):
        merged = AdapterState({}) if new.fresh else new.global_state  # FLoRA: inside the base
        _record_generations(config, run_id, new.base, merged, round_idx)
    if whole_early and method == agg.early_method and agg.early_rounds == round_idx < rounds:
        progress.info(
            "%s merged with %s; %s merges from round %d on",
            first_rounds(round_idx),
            agg.early_method,
            agg.method,
            round_idx + 1,
        )
    return new


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
            config.data,
            config.partition,
            public_fraction=public_fraction(config),
            seed=config.seed,
            text=text_options(config),
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
                if restored is None and config.model.name in TEXT_MODELS:
                    _record_pretrained(config, run_id, engines, state, test)
                engines.set_ranks(state.ranks)
                first, rounds = state.start_round, config.training.rounds
                progress.debug(  # starts the terminal's progress bar
                    "round %d/%d", first, rounds, extra={"round": first - 1, "rounds": rounds}
                )
                target = run_target(config, run_id, n_clients=len(data))
                for round_idx in range(first, rounds + 1):
                    state = _run_round(
                        config, target, state, federation, data, test, round_idx, engines
                    )
            except BaseException:
                # Ctrl-C, SIGTERM or a failed cohort, wherever it lands (a submission too):
                # cohorts in flight stop at their next step, before the runner waits for them,
                # instead of finishing the round or the warm-up first.
                engines.stop()
                raise
        if config.difficulty_mode() == "first_participation":
            record_ranked(config, run_id, state.assignment)
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
        hint = f"`{command('resume', run_id)}`"
        close_interrupted_or_failed(config.tracking.uri, run_id, err, hint)
        err.add_note(RESUME_NOTE + hint)
        raise
    return run_id


def run_target(config: ExperimentConfig, run_id: str, *, n_clients: int) -> RunTarget:
    """Where this run's rounds are recorded, and the config digest they bind to (once)."""
    return RunTarget(
        root=config.runtime.checkpoint_dir,
        uri=config.tracking.uri,
        run_id=run_id,
        digest=config_digest(config),
        n_clients=n_clients,
        keyed_clients=n_clients <= config.tracking.keyed_clients_max,
        threads=config.runtime.threads_per_client,
    )


def _restore(config: ExperimentConfig, run_id: str, base: nn.Module, ckpt: Checkpoint) -> RunState:
    """The state after the newest checkpointed round."""
    load_base_state(base, ckpt.base)
    root = config.runtime.checkpoint_dir
    if config.difficulty_mode() == "first_participation":
        assignment = RankAssignment.from_json(load_decisions_given(root, ckpt))
    else:
        assignment = RankAssignment.from_json(load_decision(root, ckpt))
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
        ranks=ranks_in_force(config, assignment, config.partition.n_clients),
    )
