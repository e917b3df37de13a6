"""Comparing methods: a grid of federated runs nested under one parent MLflow run, then a summary.

``compare_methods`` runs every cell of a grid (assigner x aggregator x seed) as a
``federated_training`` subflow whose MLflow run is nested under the comparison's parent run, then
logs to the parent ``summary.md``, the MLflow table ``summary.json`` and two plots. Cells share the
base experiment and seeds, so every method sees the same partitions and initial weights, and the
summary pairs every method with the grid's reference method seed by seed.

Resuming (``resume_parent_run_id``) finds the children by their parent tag and run name: a
FINISHED child is skipped, any other (RUNNING after a crash, FAILED, KILLED) is resumed in its own
run from its newest checkpoint; a child whose config digest differs from its cell's is refused.

Order: every other cell first, then the ``mean_autorank`` cells, whose uniform rank is the mean
of the ranks in the same seed's AutoRank ``rank_decision.json`` (with no AutoRank cell in the
grid, the no-training ranking of ``rank_table``, without learning difficulty). ``max_parallel``
above 1 submits cells as tasks that each call the subflow, a batch at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from autorank.config import ConfigError, ExperimentConfig, config_digest, flatten
from autorank.lora.targets import target_sizes
from autorank.recipe import federation_for, layer_ranges, rank_table, untrained_base
from autorank.reporting.cells import (
    Cell,
    SkippedCell,
    mean_rank,
    runnable_cells,
    with_budget,
    with_uniform_rank,
)
from autorank.reporting.grid import (
    BUDGET_AUTORANK,
    MEAN_AUTORANK,
    GridConfig,
    grid_digest,
    parse_grid,
)
from autorank.reporting.plots import accuracy_curves, ranks_per_client
from autorank.reporting.summary import (
    CellResult,
    curve_metrics,
    markdown_table,
    mean_curves,
    paired_against,
    std_curves,
    summarise,
    summary_columns,
    summary_metrics,
    terminal_table,
)
from autorank.rounds.steps import DivergenceError
from flows import run_views
from flows.engines import runs_ending
from flows.experiment import federated_training
from flows.failure_records import drop_failure_record
from flows.invocation import command
from flows.resumes import GRID_DIGEST_TAG, GRID_FILE, check_parent
from flows.run_records import close_interrupted_or_failed, read_decision
from flows.run_views import progress_in_run_log
from flows.runners import signals_deferred
from tasks import tracking

progress = logging.getLogger("autorank.progress")

SUMMARY_FILE = "summary.md"
TERMINAL_FILE = "summary.txt"
TABLE_FILE = "summary.json"
CURVES_FILE = "plots/accuracy_per_round.png"


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def _open_parent(grid: GridConfig, resume_parent_run_id: str | None) -> str:
    """Create the parent run (tags, params, grid.yaml) or reopen the one being resumed."""
    uri = grid.base.tracking.uri
    if resume_parent_run_id is not None:
        check_parent(grid, resume_parent_run_id)
        tracking.reopen_run(uri, resume_parent_run_id)
        tracking.set_tags(uri, resume_parent_run_id, {"prefect.flow_run_id": _flow_run_id()})
        return resume_parent_run_id
    base = grid.base
    tags = {
        "kind": "comparison",
        "dataset": base.data.name,
        "partition": base.partition.scheme,
        "n_clients": str(base.partition.n_clients),
        GRID_DIGEST_TAG: grid_digest(grid),
        "prefect.flow_run_id": _flow_run_id(),
    }
    run_id = tracking.start_run(uri, base.tracking.experiment, run_name=_name(grid), tags=tags)
    params = {
        "assigners": ",".join(a.method for a in grid.assigners),
        "aggregators": ",".join(grid.merge_labels),
        "seeds": ",".join(str(s) for s in grid.seeds),
        "target_accuracy": str(grid.target_accuracy),
        "max_parallel": str(grid.max_parallel),
    }
    params |= {f"base.{k}": v for k, v in flatten(base).items()}
    tracking.log_params(uri, run_id, params)
    text = yaml.safe_dump(grid.model_dump(mode="json", exclude_none=True), sort_keys=False)
    tracking.log_text(uri, run_id, text, GRID_FILE)
    return run_id


def _existing(children: Sequence[tracking.ChildRun], cell: Cell) -> tracking.ChildRun | None:
    """The child run of ``cell`` to reuse (finished) or resume (anything else), if any."""
    mine = [c for c in children if c.name == cell.run_name]
    if not mine:
        return None
    child = next((c for c in mine if c.status == "FINISHED"), mine[-1])
    if child.config_digest != config_digest(cell.config):
        raise ConfigError(
            f"cell {cell.run_name} ran with another config (run {child.run_id}); "
            "start a new comparison instead of resuming this one"
        )
    return child


def _nested(config: ExperimentConfig, parent: str) -> ExperimentConfig:
    return config.model_copy(
        update={"tracking": config.tracking.model_copy(update={"parent_run_id": parent})}
    )


def _train(config: ExperimentConfig, resume_run_id: str | None) -> str:
    subflow = federated_training.with_options(flow_run_name=config.tracking.run_name)
    return str(subflow(config=config, resume_run_id=resume_run_id))


@task(cache_policy=NO_CACHE, persist_result=False)
def train_cell(config: ExperimentConfig, resume_run_id: str | None) -> str:
    """Train one cell of a comparison grid (a federated_training subflow)."""
    return _train(config, resume_run_id)


def _split_finished(
    cells: Sequence[Cell], children: Sequence[tracking.ChildRun]
) -> tuple[dict[str, str], list[tuple[Cell, str | None]]]:
    """Finished cells (run name -> run id), and the rest with the run id to resume, if any."""
    done: dict[str, str] = {}
    todo: list[tuple[Cell, str | None]] = []
    for cell in cells:
        found = _existing(children, cell)
        if found is not None and found.status == "FINISHED":
            progress.info("%s: finished in run %s, skipped", cell.run_name, found.run_id)
            done[cell.run_name] = found.run_id
        else:
            todo.append((cell, found.run_id if found else None))
    return done, todo


def _start_batch(parent: str, batch: Sequence[tuple[Cell, str | None]]) -> list[Callable[[], str]]:
    """Start a batch of cells; one callable per cell that returns its run id (or raises)."""
    for cell, resume in batch:
        progress.info("%s: %s", cell.run_name, f"resuming {resume}" if resume else "starting")
    if len(batch) == 1:
        cell, resume = batch[0]
        return [lambda: _train(_nested(cell.config, parent), resume)]
    futures = []
    for cell, resume in batch:
        with signals_deferred():  # whole or not at all (see signals_deferred)
            futures.append(train_cell.submit(_nested(cell.config, parent), resume))
    try:
        wait(futures)  # let the whole batch end before a failure propagates
    except BaseException:
        # Ctrl-C or SIGTERM, which reach this thread only: the cells in the others stop at
        # their next step, each marked as interrupted, and end before the comparison does (a
        # second Ctrl-C stops waiting for them).
        runs_ending(futures)
        wait(futures)
        raise
    return [f.result for f in futures]


def _run_cells(
    grid: GridConfig,
    parent: str,
    cells: Sequence[Cell],
    children: Sequence[tracking.ChildRun],
    diverged: list[SkippedCell],
) -> dict[str, str]:
    """Train the cells not finished yet, ``max_parallel`` at a time; run name -> run id.

    A cell whose training diverges (non-finite loss) is recorded in ``diverged`` and left out
    of the summary; the other cells go on.
    """
    done, todo = _split_finished(cells, children)
    for start in range(0, len(todo), grid.max_parallel):
        batch = todo[start : start + grid.max_parallel]
        for (cell, _), outcome in zip(batch, _start_batch(parent, batch), strict=True):
            try:
                done[cell.run_name] = outcome()
            except DivergenceError as err:
                progress.warning("%s: %s", cell.run_name, err)
                diverged.append(SkippedCell(cell.run_name, str(err)))
    return done


def _autorank_decision(
    grid: GridConfig, cells: Sequence[Cell], done: dict[str, str], seed: int
) -> tuple[list[int], int]:
    """AutoRank's global-scale ranks for ``seed`` and the LoRA parameters they train over all
    clients: its cell's decision, else the no-training one."""
    source = next(
        (
            c
            for c in cells
            if c.spec.assigner == "autorank"
            and c.seed == seed
            and c.run_name in done
            # a first-participation cell decides round by round: no whole decision to read
            and c.config.difficulty_mode() != "first_participation"
        ),
        None,
    )
    if source is not None:
        decision = read_decision(grid.base.tracking.uri, done[source.run_name])
        return [int(row["rank"]) for row in decision["clients"]], int(decision["total_params"])
    progress.info("seed %d: no AutoRank cell; its ranks come from the no-training criteria", seed)
    config = next(c for c in cells if c.seed == seed).config
    ranking = config.ranking.model_copy(update={"assigner": "autorank"})
    config = config.model_copy(update={"ranking": ranking})
    federation = federation_for(config)
    sizes = target_sizes(untrained_base(config, federation), list(layer_ranges(config)))
    result = rank_table(config, federation, layer_sizes=sizes)
    assert result.total_params is not None  # counted since the layer sizes are given
    return [d.rank for d in result.decisions], result.total_params


def _resolve_from_autorank(
    grid: GridConfig, cells: Sequence[Cell], done: dict[str, str]
) -> list[Cell]:
    """The ``mean_autorank`` and ``budget_autorank`` cells completed from AutoRank's decision of
    their seed: its mean rank, or the LoRA parameters its ranks train as the budget."""
    lora = grid.base.lora
    waiting = [c for c in cells if c.waits_for_autorank]
    resolved: list[Cell] = []
    for seed in sorted({c.seed for c in waiting}):
        ranks, total = _autorank_decision(grid, cells, done, seed)
        rank = mean_rank(ranks, lora.r_min, lora.r_max)
        mine = [c for c in waiting if c.seed == seed]
        if any(c.spec.uniform_rank == MEAN_AUTORANK for c in mine):
            progress.info("seed %d: AutoRank's mean rank is %d", seed, rank)
        if any(c.spec.uniform_rank == BUDGET_AUTORANK for c in mine):
            progress.info("seed %d: AutoRank's ranks train %s LoRA parameters", seed, f"{total:,}")
        resolved += [
            with_uniform_rank(c, rank)
            if c.spec.uniform_rank == MEAN_AUTORANK
            else with_budget(c, total)
            for c in mine
        ]
    order = {c.run_name: i for i, c in enumerate(cells)}
    return sorted(resolved, key=lambda c: order[c.run_name])


def _cell_result(uri: str, cell: Cell, run_id: str) -> CellResult:
    """Read one finished cell's history back from its run."""
    metrics = tracking.run_metrics(uri, run_id)
    comm = tracking.metric_series(uri, run_id, "traffic/bytes_up")
    comm += tracking.metric_series(uri, run_id, "traffic/bytes_down")
    return CellResult(
        assigner=cell.spec.method,
        aggregator=cell.aggregator,
        seed=cell.seed,
        accuracy=tuple(tracking.metric_series(uri, run_id, "global/accuracy")),
        personal_accuracy=metrics.get("per_client/accuracy_mean"),
        trainable_params=metrics["summary/trainable_params"],
        client_params=metrics.get("summary/params_per_client"),
        bytes_communicated=sum(comm),
        wall_seconds=sum(tracking.metric_series(uri, run_id, "time/round_s")),
    )


def _rank_plot_data(
    grid: GridConfig, cells: Sequence[Cell], done: dict[str, str]
) -> dict[str, list[int]]:
    """Per assigner, the clients' ranks in the first seed (the aggregator does not change them)."""
    out: dict[str, list[int]] = {}
    for cell in cells:
        if cell.seed == grid.seeds[0] and cell.spec.method not in out:
            decision = read_decision(grid.base.tracking.uri, done[cell.run_name])
            out[cell.spec.method] = [int(row["rank"]) for row in decision["clients"]]
    return out


def chart_pages(uri: str, parent: str) -> tuple[str, str]:
    """The comparison at a glance, as in-UI links (``#/...``): the parent's plot of the
    methods' accuracy per round, and every run's global accuracy per round in one chart."""
    curves = tracking.artifact_view(uri, parent, CURVES_FILE)
    return curves, tracking.overlaid_children(uri, parent, "global/accuracy")


def comparison_charts(uri: str, parent: str) -> str:
    """``chart_pages`` as the line of Markdown links that opens the parent's description."""
    curves, runs = chart_pages(uri, parent)
    return (
        f"Charts: [each method's accuracy per round, mean ± std over seeds]({curves}) · "
        f"[every run's global accuracy per round]({runs})"
    )


def _write_summary(
    grid: GridConfig,
    parent: str,
    cells: Sequence[Cell],
    done: dict[str, str],
    skipped: Sequence[SkippedCell],
) -> str:
    """The summary on the parent: its description (the terminal's table), metrics per method, the
    artifacts summary.md, summary.txt (the terminal's table) and summary.json (an MLflow
    table), and the two comparison plots. Returns the description."""
    uri = grid.base.tracking.uri
    results = [_cell_result(uri, c, done[c.run_name]) for c in cells]
    summaries = summarise(results, grid.target_accuracy)
    reference = grid.reference_method
    paired = None if reference is None else paired_against(results, reference)
    table = markdown_table(summaries, grid.target_accuracy, skipped, paired)
    tracking.log_text(uri, parent, table, SUMMARY_FILE)
    terminal = terminal_table(summaries, grid.target_accuracy, paired)
    tracking.log_text(uri, parent, terminal, TERMINAL_FILE)
    tracking.log_table(uri, parent, summary_columns(summaries, paired), TABLE_FILE)
    seeds = ", ".join(str(s) for s in grid.seeds)
    note = f"Comparison on {grid.base.data.name} ({grid.base.partition.scheme}), seeds {seeds}: "
    # The narrow table, aligned in a code block: the Overview panel squeezes an 11-column one.
    note += f"accuracy as mean ± std over seeds.\n\n```\n{terminal}```\n\n"
    note += f"Every column and the paired tests: `{SUMMARY_FILE}`, `{TABLE_FILE}`."
    note = f"{comparison_charts(uri, parent)}\n\n{note}"
    tracking.set_tags(uri, parent, {"mlflow.note.content": note})  # the run's description
    logged = tracking.run_metrics(uri, parent)  # a resumed comparison logs only what changed
    metrics = {k: v for k, v in summary_metrics(summaries, paired).items() if logged.get(k) != v}
    tracking.log_metrics(uri, parent, metrics, step=0)
    means = mean_curves(results)
    _log_curves(uri, parent, means)
    curves = accuracy_curves(
        means,
        title="Global test accuracy per round (mean ± std over seeds)",
        spread=std_curves(results),
    )
    tracking.track_figure(uri, parent, curves, CURVES_FILE)
    ranks = ranks_per_client(_rank_plot_data(grid, cells, done))
    tracking.track_figure(uri, parent, ranks, "plots/rank_per_client.png")
    return note


def _log_curves(uri: str, parent: str, means: Mapping[str, Sequence[float]]) -> None:
    """The methods' mean accuracy per round on the parent, each round once (a resumed
    comparison's curves are those already logged)."""
    by_round = curve_metrics(means)
    logged = {key: tracking.logged_steps(uri, parent, key) for key in by_round.get(1, {})}
    for step, metrics in by_round.items():
        fresh = {k: v for k, v in metrics.items() if step not in logged[k]}
        if fresh:
            tracking.log_metrics(uri, parent, fresh, step=step)


def _name(grid: GridConfig) -> str:
    """The comparison's name, for its parent MLflow run and its Prefect flow run."""
    return grid.name or f"compare-{grid.base.data.name}"


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    grid, resumed = params.get("grid"), params.get("resume_parent_run_id")
    if isinstance(grid, dict):  # a deployment's parameters; the flow reports a bad grid itself
        try:
            grid = parse_grid(grid)
        except ConfigError:
            grid = None
    name = _name(grid) if isinstance(grid, GridConfig) else "compare"
    return name + (f" (resume {str(resumed)[:8]})" if resumed else "")


@flow(
    name="autorank-compare",
    flow_run_name=_flow_run_name,
    log_prints=True,
    on_failure=[drop_failure_record],  # no pickled exception left in Prefect's storage
)
def compare_methods(
    grid: GridConfig | dict,
    resume_parent_run_id: str | None = None,
) -> str:
    """Compare methods: every assigner x aggregator x seed as nested runs, then a summary table."""
    grid = grid if isinstance(grid, GridConfig) else parse_grid(grid)
    cells, skipped = runnable_cells(grid)
    uri = grid.base.tracking.uri
    with progress_in_run_log():
        parent = _open_parent(grid, resume_parent_run_id)
        run_views.link_mlflow_run(uri, parent, _name(grid))
        _compare(grid, cells, skipped, parent)
    return parent


def _compare(
    grid: GridConfig, cells: Sequence[Cell], skipped: Sequence[SkippedCell], parent: str
) -> None:
    """Run the cells not finished yet, then the summary; the parent ends FINISHED (or stopped)."""
    uri = grid.base.tracking.uri
    try:
        children = tracking.child_runs(uri, parent)
        diverged: list[SkippedCell] = []
        first = [c for c in cells if not c.waits_for_autorank]
        done = _run_cells(grid, parent, first, children, diverged)
        resolved = _resolve_from_autorank(grid, cells, done)
        done |= _run_cells(grid, parent, resolved, children, diverged)
        final = {c.run_name: c for c in [*first, *resolved]}
        ran = [final[c.run_name] for c in cells if c.run_name in done]
        table = _write_summary(grid, parent, ran, done, [*skipped, *diverged])
    except BaseException as err:
        hint = f"`{command('compare', '--config', 'GRID.yaml', '--resume', parent)}`"
        close_interrupted_or_failed(uri, parent, err, hint)
        raise
    tracking.end_run(uri, parent, "FINISHED")
    run_views.summary_of_comparison(uri, table, parent)


def compare_locally(grid: GridConfig, *, resume_parent_run_id: str | None) -> tuple[str, str]:
    """Run (or resume) a comparison here; return the parent run id and the terminal's table.

    Check the grid first (``preflight_grid``).
    """
    parent = compare_methods(grid=grid, resume_parent_run_id=resume_parent_run_id)
    return parent, tracking.read_text(grid.base.tracking.uri, parent, TERMINAL_FILE)
