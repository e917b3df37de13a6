"""What the flow records in MLflow at the start and end of a run, and on resume."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from prefect.exceptions import TerminationSignal
from torch import nn

import flows
from autorank.config import ExperimentConfig, config_digest, flatten, to_yaml
from autorank.data.datasets import DatasetSplits
from autorank.data.federation import Federation
from autorank.engine.local import TrainingStoppedError
from autorank.lora.adapters import AdapterState
from autorank.lora.files import CheckpointError
from autorank.ranking.assignment import RankAssignment, decision_columns, rows_of_columns
from autorank.reporting.plots import accuracy_curves, closeness_vs_rank, label_distribution
from autorank.rounds.checkpoint import DECISION_FILE, Checkpoint, decision_file
from autorank.rounds.steps import client_parameters
from flows import CONFIG_FILE
from flows.model_records import FinalModel, record_model
from flows.runners import opaque
from tasks import round_writer, tracking

progress = logging.getLogger("autorank.progress")


def close_interrupted_or_failed(
    uri: str, run_id: str, err: BaseException, resume_hint: str
) -> None:
    """Mark a run that stopped early: KILLED after an interrupt, FAILED after an error.

    Ctrl-C raises KeyboardInterrupt; SIGTERM (a scheduler's stop, a preemption) reaches flow code
    as Prefect's TerminationSignal; a run in another thread than the one they reach is stopped
    by ``flows.engines.runs_ending`` (TrainingStoppedError). None is a failure of the run: it
    stopped between checkpoints, and ``resume_hint`` (the command that continues it) is logged.
    """
    interrupted = isinstance(err, KeyboardInterrupt | TerminationSignal | TrainingStoppedError)
    flows.stopped.append(resume_hint)
    with contextlib.suppress(Exception):  # else they are logged again from the checkpoint
        round_writer.settle(run_id)
    tracking.end_run(uri, run_id, "KILLED" if interrupted else "FAILED")
    if interrupted:
        progress.info("run %s stopped; %s continues it", run_id, resume_hint)


def run_tags(config: ExperimentConfig) -> dict[str, str]:
    """The tags that make runs filterable and comparable in the MLflow UI."""
    return {
        "assigner": config.ranking.assigner,
        "aggregator": config.aggregation.label,
        "dataset": config.data.name,
        "partition": config.partition.scheme,
        "n_clients": str(config.partition.n_clients),
        "seed": str(config.seed),
        "config_digest": config_digest(config),
    }


def run_name(config: ExperimentConfig) -> str:
    """What runs, as the MLflow run and the Prefect flow run are named:
    ``tracking.run_name``, else ``<assigner>-<aggregator>-<dataset>-s<seed>``."""
    return config.tracking.run_name or (
        f"{config.ranking.assigner}-{config.aggregation.label}-{config.data.name}-s{config.seed}"
    )


def _prefect_flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def run_finished(uri: str, run_id: str) -> bool:
    """Whether a run ended with every round done (resuming it has nothing to do)."""
    return tracking.run_info(uri, run_id)[2] == "FINISHED"


def open_run(config: ExperimentConfig, resume_run_id: str | None) -> str:
    """Create the run (params, tags, config.yaml) or reopen ``resume_run_id`` after checks."""
    uri = config.tracking.uri
    run_dir = config.runtime.checkpoint_dir
    if resume_run_id is not None:
        _, tags, _ = tracking.run_info(uri, resume_run_id)
        if tags.get("config_digest") != config_digest(config):
            raise CheckpointError(
                f"run {resume_run_id} was started with another config "
                f"(digest {tags.get('config_digest')}, this one is {config_digest(config)})"
            )
        tracking.client_for(uri).update_run(resume_run_id, status="RUNNING")
        tracking.set_tags(uri, resume_run_id, {"prefect.flow_run_id": _prefect_flow_run_id()})
        return resume_run_id
    name = run_name(config)
    tags = run_tags(config) | {"prefect.flow_run_id": _prefect_flow_run_id()}
    run_id = tracking.start_run(
        uri,
        config.tracking.experiment,
        run_name=name,
        tags=tags,
        parent_run_id=config.tracking.parent_run_id,
    )
    tracking.log_params(uri, run_id, flatten(config))
    tracking.log_text(uri, run_id, to_yaml(config), CONFIG_FILE)
    (run_dir / run_id).mkdir(parents=True, exist_ok=True)
    (run_dir / run_id / CONFIG_FILE).write_text(to_yaml(config))
    return run_id


# A generated population's label plot draws this many clients (exchangeable, so the first ones
# are a random sample), not all of them (16 s at 100,000).
LABELS_DRAWN = 2000


def record_labels(config: ExperimentConfig, run_id: str, federation: Federation) -> None:
    """The clients' label distribution plot (of a generated population's first
    ``LABELS_DRAWN`` clients unless its counts were drawn already)."""
    if federation.population is None:
        counts = federation.histogram
    else:
        counts = federation.label_counts(range(min(federation.n_clients, LABELS_DRAWN)))
    tracking.track_figure(
        config.tracking.uri, run_id, label_distribution(counts), "plots/label_distribution.png"
    )


def record_decision(
    config: ExperimentConfig,
    run_id: str,
    federation: Federation,
    assignment: RankAssignment,
    *,
    step: int = 0,
    in_force: RankAssignment | None = None,
    plot: bool = True,
) -> None:
    """The rank decision table, the ranks' spread (and each client's rank up to
    ``tracking.keyed_clients_max`` clients) as metrics at ``step``, and the decision plots.

    ``step`` 0 is the decision after the warm-up; a re-ranking after round N logs at step N,
    into files named ``..._round_NNNN``. Under first participation ``assignment`` holds the
    clients ranked in that round only (its table and plot), and ``in_force`` every client
    ranked so far (the spread), and ``plot`` False leaves the closeness plot to the run's end.
    """
    uri = config.tracking.uri
    decision = assignment.to_json()
    suffix = "" if step == 0 else f"_round_{step:04d}"
    if in_force is not None:
        decision["ranked_so_far"] = len(in_force.decisions)
    log_decision(config, run_id, decision, decision_file(step))
    ranks = [float(d.rank) for d in (in_force or assignment).decisions]
    metrics = {
        "ranks/mean": float(np.mean(ranks)),
        "ranks/min": min(ranks),
        "ranks/max": max(ranks),
    }
    if assignment.total_params is not None:  # LoRA over all clients, the head not counted
        metrics["ranks/total_params"] = float(assignment.total_params)
    if assignment.budget_params is not None:
        metrics["ranks/budget_params"] = float(assignment.budget_params)
    if federation.n_clients <= config.tracking.keyed_clients_max:
        metrics |= {f"per_client/c{d.client:02d}/rank": float(d.rank) for d in assignment.decisions}
    # A run that stopped before the checkpoint after a decision decides again when resumed (the
    # same ranks: training is seeded); its metrics are at that step already.
    if step not in tracking.logged_steps(uri, run_id, "ranks/mean"):
        tracking.log_metrics(uri, run_id, metrics, step=step)
    if step == 0:  # the partition does not change
        record_labels(config, run_id, federation)
    if plot:
        _plot_closeness(config, run_id, assignment, suffix)


def _plot_closeness(
    config: ExperimentConfig, run_id: str, assignment: RankAssignment, suffix: str
) -> None:
    """The decision's closeness against rank, as ``plots/closeness_vs_rank{suffix}.png``."""
    tracking.track_figure(
        config.tracking.uri,
        run_id,
        closeness_vs_rank(
            [d.closeness for d in assignment.decisions],
            [d.rank for d in assignment.decisions],
            [d.client for d in assignment.decisions],
        ),
        f"plots/closeness_vs_rank{suffix}.png",
    )


def record_ranked(config: ExperimentConfig, run_id: str, assignment: RankAssignment) -> None:
    """Under first participation, the decision in force at the end as ``rank_decision.json``:
    every client ranked in the run (the rounds' files hold each round's newcomers)."""
    decision = assignment.to_json()
    decision["ranked_so_far"] = len(assignment.decisions)
    log_decision(config, run_id, decision, decision_file(0))
    if assignment.decisions:
        _plot_closeness(config, run_id, assignment, "")


def log_decision(
    config: ExperimentConfig, run_id: str, decision: dict[str, Any], name: str
) -> None:
    """A rank decision as the JSON ``name``: whole up to ``tracking.keyed_clients_max`` clients;
    beyond, a summary (the assigner, weights, budget, the ranks' spread) whose ``table`` names
    the rows as Parquet beside it (``read_decision`` reads either back)."""
    uri, rows = config.tracking.uri, decision["clients"]
    if len(rows) > config.tracking.keyed_clients_max:
        table = name.removesuffix(".json") + ".parquet"
        tracking.log_parquet(uri, run_id, decision_columns(decision), table)
        ranks = np.array([row["rank"] for row in rows], dtype=float)
        spread = {"min": ranks.min(), "median": np.median(ranks), "max": ranks.max()}
        decision = {k: v for k, v in decision.items() if k != "clients"}
        decision |= {
            "n_clients": len(rows),
            "ranks": {k: float(v) for k, v in spread.items()} | {"mean": float(ranks.mean())},
            "table": table,
        }
    # Prefect walks a task's parameters for futures: a large table is handed over opaque.
    tracking.track_json(uri, run_id, opaque(decision), name)


def read_decision(uri: str, run_id: str, name: str = DECISION_FILE) -> dict[str, Any]:
    """A logged rank decision with its rows, whether whole or summarised beside a table."""
    decision = dict(tracking.read_json(uri, run_id, name))
    if "table" in decision:
        columns = tracking.read_parquet(uri, run_id, decision["table"])
        decision["clients"] = rows_of_columns(columns)
    return decision


def relog_checkpoint_round(uri: str, run_id: str, ckpt: Checkpoint) -> None:
    """Log the checkpointed round's metrics and table if the crash came before they reached
    MLflow (they are written in the background while the next round trains)."""
    table = ckpt.meta.get("table")  # checkpoints before format 4 hold no table
    round_writer.log_round(uri, run_id, dict(ckpt.meta["metrics"]), ckpt.round_idx, table=table)


def finish_run(
    config: ExperimentConfig,
    run_id: str,
    global_state: AdapterState,
    history: list[float],
    paths: Sequence[Mapping[str, int]],
    *,
    base: nn.Module,
    merged: bool,
    data: DatasetSplits,
) -> None:
    """Final adapters and base, the MLflow model, accuracy plot, summary metrics; mark the run
    finished (``flows.model_records``).

    ``base`` is the final base and ``merged`` says that the global adapter's last update is
    already inside it (FLoRA). ``summary/trainable_params`` is what every client trains (and
    sends) in a round it takes part in, summed over all clients: the budget rank assignment
    controls.
    """
    uri = config.tracking.uri
    round_writer.settle(run_id)  # the last round's metrics, written in the background
    final = FinalModel(base, global_state, merged, paths)
    record_model(config, run_id, final, data, step=len(history))
    tracking.track_figure(
        uri,
        run_id,
        accuracy_curves({"global": history}, title="Global test accuracy per round"),
        "plots/accuracy.png",
    )
    params = client_parameters(global_state, paths)
    summary = {
        "summary/best_accuracy": max(history),
        "summary/final_accuracy": history[-1],
        "summary/trainable_params": float(sum(params)),
        "summary/params_per_client": float(np.mean(params)),
    }
    tracking.log_metrics(uri, run_id, summary, step=len(history))
    note = description(config, history, summary["summary/params_per_client"], run_id)
    tracking.set_tags(uri, run_id, {"mlflow.note.content": note})
    tracking.end_run(uri, run_id, "FINISHED")


EARLY_MERGE_TAG = "early_merge"


def record_early_merge(uri: str, run_id: str, applied: str) -> None:
    """Whether the run's early merge applies (``aggregation.early_when``), as the
    ``early_merge`` tag: a column to filter by in the MLflow UI."""
    tracking.set_tags(uri, run_id, {EARLY_MERGE_TAG: applied})


def description(
    config: ExperimentConfig, history: Sequence[float], params_per_client: float, run_id: str
) -> str:
    """The run's description (markdown, on its Overview in the MLflow UI): the outcome first."""
    best = int(np.argmax(history))
    return (
        f"Global test accuracy **{history[-1]:.4f}** after {len(history)} rounds "
        f"(best {history[best]:.4f} in round {best + 1}).\n\n"
        f"{config.ranking.assigner} ranks, {config.aggregation.label} aggregation, "
        f"{config.data.name} split {config.partition.scheme} over "
        f"{config.partition.n_clients} clients, seed {config.seed}; "
        f"{params_per_client:,.0f} trainable LoRA parameters per client on average.\n\n"
        + (f"Model: `runs:/{run_id}/model`; " if config.tracking.log_model else "")
        + "charts: the *Model metrics* tab (`global/*` first)."
    )
