"""The `autorank` command line: `ranks`, `run`, `resume`, `compare`, `ui`, `serve`, `config`.

Bad input (config, data, flags) ends with one line on stderr and exit code 2, never a traceback.
Heavy imports (torch, Prefect, MLflow) happen inside the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorank.config import RuntimeConfig, TrackingConfig
from flows import CONFIG_FILE, RESUME_NOTE
from flows.environment import prepare
from flows.local import say as _say

if TYPE_CHECKING:
    from autorank.reporting.cells import Cell
    from autorank.reporting.grid import GridConfig

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2."""

    def error(self, message: str) -> Any:
        sys.stderr.write(f"autorank: error: {message} (see autorank --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment YAML (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set partition.n_clients=20 (repeatable)",
    )


def _version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autorank")
    except PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


# Where runs are tracked, as MLflow users expect it (every command that writes says so).
TRACKING_EPILOG = (
    "Tracking store: the config's tracking.uri (or --set tracking.uri=...), else the "
    "MLFLOW_TRACKING_URI environment variable, else sqlite:///mlruns/mlflow.db."
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autorank", description=__doc__.splitlines()[0], epilog=TRACKING_EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ranks = sub.add_parser(
        "ranks",
        help="partition, profile and print each client's rank",
        description=(
            "Partition the data, profile every client and print the rank AutoRank (or the "
            "configured assigner) gives it, without training."
        ),
    )
    _add_config_args(ranks)
    ranks.add_argument("--json", action="store_true", help="print the decision as JSON")
    run = sub.add_parser(
        "run",
        help="run the federated training flow locally",
        description=(
            "Run the federated training flow locally: warm-up, rank assignment, then rounds "
            "of cohort training, aggregation, evaluation, checkpoint and MLflow records."
        ),
        epilog=TRACKING_EPILOG,
    )
    _add_config_args(run)
    run.add_argument("--verbose", action="store_true", help="show Prefect's own log lines")
    resume = sub.add_parser(
        "resume",
        help="continue a run from its newest checkpoint",
        description=(
            "Continue a stopped or crashed run from its newest checkpoint, in the same MLflow run."
        ),
    )
    resume.add_argument("run_id", help="the MLflow run id printed by `autorank run`")
    resume.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=RuntimeConfig().checkpoint_dir,
        help="where the run's checkpoints are (runtime.checkpoint_dir; default %(default)s)",
    )
    resume.add_argument("--verbose", action="store_true", help="show Prefect's own log lines")
    compare = sub.add_parser(
        "compare",
        help="run a grid of methods and print a summary table",
        description=(
            "Run a grid of methods (assigners x aggregators x seeds) as nested MLflow runs "
            "and print their summary table."
        ),
    )
    compare.add_argument("--config", type=Path, required=True, help="grid YAML (configs/grids/)")
    compare.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one grid setting, e.g. --set base.training.rounds=3 (repeatable)",
    )
    compare.add_argument(
        "--resume",
        metavar="PARENT_RUN_ID",
        help="continue a comparison: finished cells are skipped, interrupted ones resumed",
    )
    compare.add_argument(
        "--dry-run",
        action="store_true",
        help="print the runs the grid expands to and an estimate of their time (one of them "
        "run for a round or two in a temporary folder), and exit without writing anything",
    )
    compare.add_argument(
        "--no-estimate",
        action="store_true",
        help="with --dry-run: list the runs only, without measuring one",
    )
    compare.add_argument("--verbose", action="store_true", help="show Prefect's own log lines")
    ui = sub.add_parser(
        "ui",
        help="start the MLflow UI on 127.0.0.1",
        description="Start the MLflow UI on 127.0.0.1 for a tracking store.",
    )
    _add_ui_args(ui)
    _add_serve_command(sub)
    _add_config_command(sub)
    return parser


def _add_ui_args(parser: argparse.ArgumentParser) -> None:
    """The MLflow UI's store and port (``ui``, ``serve``)."""
    parser.add_argument(
        "--uri",
        default=TrackingConfig().uri,
        help="tracking URI the MLflow UI shows (default: MLFLOW_TRACKING_URI, else "
        "sqlite:///mlruns/mlflow.db; now %(default)s)",
    )
    parser.add_argument("--port", type=_port, default=5000, help="MLflow UI port (%(default)s)")


def _port(text: str) -> int:
    """A TCP port number, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {port}")
    return port


def _check_port_free(port: int) -> None:
    """Refuse a port something on 127.0.0.1 already listens on (the UI would fail later).

    With ``SO_REUSEADDR``, as the servers bind: a port whose connections are in TIME_WAIT, as
    for a minute after ``autorank serve`` or ``ui`` stopped, is free to them, and so here.
    """
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise ValueError(
                f"port {port} on 127.0.0.1 is not free ({err.strerror}); pass --port with another"
            ) from None


def _cmd_ranks(args: argparse.Namespace) -> int:
    from autorank.config import load_config
    from autorank.recipe import federation_for, rank_table
    from autorank.reporting.text import format_rank_table

    config = load_config(args.config, args.overrides)
    assignment = rank_table(config)
    agg, plan = config.aggregation, None
    if agg.early_method is not None and agg.early_when == "all_labels":
        from flows.ranking import early_gaps, early_plan  # imports Prefect (its home: ~/.prefect)

        plan = early_plan(agg, early_gaps(config, assignment, federation_for(config)))
    if args.json:
        decision = assignment.to_json()
        print(json.dumps(decision if plan is None else {**decision, "early_merge": plan}, indent=2))
    else:
        print(format_rank_table(assignment.to_json()))
        if plan is not None:
            print(f"early merge with these ranks (a run decides from its own): {plan}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from autorank.config import load_config
    from flows.local import run_locally

    config = load_config(args.config, args.overrides)
    run_locally(config, resume_run_id=None, verbose=args.verbose)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from autorank.config import load_config
    from flows.local import run_locally
    from flows.places import check_prefect_api
    from flows.resumes import resumable

    saved = args.checkpoint_dir / args.run_id / CONFIG_FILE
    if not saved.is_file():
        raise ValueError(
            f"no checkpoint folder for run {args.run_id!r} (expected {saved}); "
            "pass --checkpoint-dir if the run used another runtime.checkpoint_dir"
        )
    config = load_config(saved)
    check_prefect_api()
    if not resumable(config, args.run_id):
        _say(f"autorank: run {args.run_id} already finished; nothing to resume")
        return 0
    run_locally(config, resume_run_id=args.run_id, verbose=args.verbose)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import logging

    from autorank.reporting.cells import check_runnable, expand_grid
    from autorank.reporting.grid import load_grid
    from autorank.reporting.text import grid_plan
    from flows.local import (
        configure_logging,
        how_to_compare,
        local_orchestration,
        no_failure_records,
    )
    from flows.places import check_places, check_prefect_api
    from flows.resumes import check_parent

    grid = load_grid(args.config, args.overrides)
    if args.dry_run:
        quiet = logging.getLogger("autorank.reporting.cells")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the plan lists the skipped cells instead
        try:
            cells, skipped = expand_grid(grid)
        finally:
            quiet.setLevel(level)
        print(grid_plan(grid, cells, skipped), flush=True)
        check_runnable(grid, cells)  # a grid the run would refuse exits as the run would
        return 0 if args.no_estimate else _print_estimate(grid, cells)
    check_prefect_api()  # what a refusal leaves untouched: before Prefect's server starts
    check_places(grid.base)
    if args.resume is not None:
        check_parent(grid, args.resume)
    # Before Prefect is imported, so that its home, log level and API server apply.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    configure_logging(args.verbose)

    def check() -> None:
        from flows.local import preflight_grid

        preflight_grid(grid)

    uri = grid.base.tracking.uri
    with local_orchestration(check, "flows.compare", uri), no_failure_records():
        from flows.compare import compare_locally

        parent, table = compare_locally(grid, resume_parent_run_id=args.resume)
    print(table)
    print(f"MLflow parent run id: {parent}")
    print(how_to_compare(uri, parent))
    return 0


def _print_estimate(grid: GridConfig, cells: Sequence[Cell]) -> int:
    """Measure one cell for a round or two, then print what the grid's cells will take."""
    from autorank.reporting.estimate import estimate_lines
    from flows.estimate import MeasuringError, measure, measured_cell, planned
    from flows.local import preflight_grid
    from flows.places import check_machine_and_data

    # What the run would refuse, refused as the run would (exit 2), before measuring.
    check_machine_and_data(grid.base)
    preflight_grid(grid)
    cell = measured_cell(cells)
    _say(
        f"estimating: running {cell.run_name}'s first rounds in a temporary folder "
        "(--no-estimate skips this)"
    )
    try:
        measured = measure(cell)
    except MeasuringError as err:
        _say(f"autorank: no estimate: {err}")
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated)
        _say("autorank: estimate stopped")
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    rounds = grid.base.training.rounds
    print("\n".join(estimate_lines(measured, planned(cells), rounds, grid.max_parallel)))
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:

    from flows.places import check_store, tracking_setting
    from flows.serve import mlflow_ui_command, stop_group

    # The UI takes any store a run can use (MLflow itself would fail after its banner).
    check_store(args.uri, tracking_setting(args.uri).replace("tracking.uri", "--uri"))
    _check_port_free(args.port)

    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    command = mlflow_ui_command(args.uri, args.port)
    from tasks.tracking import experiments_page  # after the checks: it imports matplotlib

    runs = experiments_page(args.uri, f"http://127.0.0.1:{args.port}")
    print(f"MLflow UI on {runs} (Ctrl-C to stop)", file=sys.stderr)
    # Its own session: Ctrl-C reaches this process only, which stops the server with SIGTERM
    # (uvicorn's quiet shutdown; on the terminal's SIGINT it printed a CancelledError traceback).
    ui = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return ui.wait()
    except KeyboardInterrupt as err:
        stop_group(ui)
        _say("autorank: MLflow UI stopped")
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    finally:
        stop_group(ui)


def _add_serve_command(sub: argparse._SubParsersAction[_Parser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="the local scheduled stack: Prefect server, pool, deployments, worker, MLflow UI",
        description=(
            "Start Prefect's server, the process work pool, the deployments of prefect.yaml, a "
            "worker and the MLflow UI on 127.0.0.1, each once the one before answers; print "
            "their addresses; stop them all on Ctrl-C or SIGTERM. Run it in the project folder."
        ),
    )
    _add_ui_args(serve)
    serve.add_argument(
        "--prefect-port", type=_port, default=4200, help="Prefect server port (%(default)s)"
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import Ports, serve

    if not Path("prefect.yaml").is_file():
        raise ValueError(
            f"no prefect.yaml in {Path.cwd()}: run autorank serve in the project folder"
        )
    if args.port == args.prefect_port:
        raise ValueError(f"--port and --prefect-port are both {args.port}: expected two ports")
    _check_port_free(args.prefect_port)
    _check_port_free(args.port)
    try:
        serve(Ports(prefect=args.prefect_port, mlflow=args.port), args.uri)
    except KeyboardInterrupt as err:
        _say("autorank: serve stopped: Prefect's server, the worker and the MLflow UI are down")
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    return 0


def _add_config_command(sub: argparse._SubParsersAction[_Parser]) -> None:
    config = sub.add_parser(
        "config",
        help="print the resolved config or every setting's meaning",
        description=(
            "Print the config `autorank run` would use with the same --config and --set, as "
            "YAML: defaults, file, overrides and MLFLOW_TRACKING_URI applied and validated (the "
            "data, places and ranks are checked when a run starts). With --schema, list every "
            "setting with its type, default and meaning."
        ),
    )
    _add_config_args(config)
    config.add_argument(
        "--schema",
        action="store_true",
        help="list every setting (name, type, default, meaning) instead of the resolved config",
    )
    config.add_argument(
        "--json", action="store_true", help="print JSON: the config, or with --schema its schema"
    )


def _cmd_config(args: argparse.Namespace) -> int:
    """The resolved config (or the settings reference); nothing is started or written."""
    from autorank.config import ExperimentConfig, load_config, to_yaml

    if args.schema:
        if args.config is not None or args.overrides:
            raise ValueError("--schema describes every setting; it takes no --config or --set")
        from autorank.config.reference import format_reference

        if args.json:
            print(json.dumps(ExperimentConfig.model_json_schema(), indent=2))
        else:
            print("Settings: a YAML file's sections (--config FILE), or --set NAME=VALUE.\n")
            print(format_reference(ExperimentConfig))
        return 0
    config = load_config(args.config, args.overrides)
    if args.json:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
    else:
        print(to_yaml(config), end="")
    return 0


COMMANDS = {
    "ranks": _cmd_ranks,
    "run": _cmd_run,
    "resume": _cmd_resume,
    "compare": _cmd_compare,
    "ui": _cmd_ui,
    "serve": _cmd_serve,
    "config": _cmd_config,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop or preemption), handled like Ctrl-C so runs stop cleanly."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _raise_lost(signum: int, frame: object) -> None:
    """The Prefect API server this command started exited by itself (its watcher says so)."""
    from flows.orchestrator import OrchestratorError, lost_server

    raise OrchestratorError(lost_server() or "Prefect's API server exited mid-run")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `autorank` console script."""
    args = build_parser().parse_args(argv)
    prepare(Path.cwd(), verbose=getattr(args, "verbose", False))
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread:
        return _dispatch(args)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    before = signal.signal(signal.SIGUSR1, _raise_lost)  # flows.orchestrator.LOST_SIGNAL
    try:
        return _dispatch(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGUSR1, before)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _dispatch(args: argparse.Namespace) -> int:
    """Run one command; bad input, divergence and interrupts become one line and an exit code."""
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError as err:
        if not _stdout_unread():
            return _one_line(args, err)
        _drop_stdout()
        return 0
    except Exception as err:
        from flows.orchestrator import lost_server

        lost = lost_server()  # whatever Prefect raised on the way, the cause is this
        if lost is None:
            return _one_line(args, err)
        from flows.local import lost_server_line

        _say(lost_server_line(lost))
        return 1
    except KeyboardInterrupt as err:
        how = "terminated" if isinstance(err, Terminated) else "interrupted"
        _say(f"autorank: {how}; completed rounds are checkpointed")
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)


def _stdout_unread() -> bool:
    """Whether stdout is a pipe whose reader has gone (``| head`` read its lines and exited)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        events = poller.poll(0)
    except (OSError, ValueError, AttributeError):  # no file descriptor behind sys.stdout
        return False
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in events)


def _drop_stdout() -> None:
    """Point stdout at /dev/null: its reader stopped early, which Unix tools take quietly, and
    what is still buffered would raise again at the next flush (ours or the interpreter's)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _one_line(args: argparse.Namespace, err: Exception) -> int:
    """``err`` as one line and an exit code (2: input the user can fix); the traceback with
    ``--verbose`` for a failure inside a run."""
    from autorank.rounds.steps import DivergenceError
    from flows.orchestrator import OrchestratorError

    first = _first_line(err)
    if isinstance(err, ValueError | FileNotFoundError | KeyError):
        _say(f"autorank: error: {first or type(err).__name__}")
        return EXIT_BAD_INPUT
    resume = [n for n in getattr(err, "__notes__", []) if n.startswith(RESUME_NOTE)]
    then = f"; {resume[0].removeprefix(RESUME_NOTE)} continues it" if resume else ""
    if isinstance(err, DivergenceError):  # resuming would diverge again
        _say(f"autorank: {first}")
        return 1
    if isinstance(err, OrchestratorError):
        _say(f"autorank: {first}{then}")
        return 1
    if getattr(args, "verbose", False):
        raise err
    _say(f"autorank: {type(err).__name__}: {first}{then} (--verbose: traceback)")
    return 1


def entry() -> None:
    """The console script: ``main``, then a prompt exit.

    Tearing down the interpreter after a run (torch, Prefect, MLflow, datasets: thousands of
    modules) took about 3 s on these machines with nothing left to do. So once the command is
    done, the thread pools are shut down, non-daemon threads joined and the exit handlers run,
    as a normal exit does, the output is flushed, and the process ends without the teardown.
    """
    import atexit

    try:
        code = main()
    except SystemExit:  # --help, --version, usage errors: the interpreter's exit flushes again
        _flush()
        raise
    if "flows.orchestrator" in sys.modules:
        from flows.orchestrator import lost_server

        if lost_server() is not None:  # Prefect's exit handlers would retry it for minutes
            _flush()
            os._exit(code)
    threading._shutdown()  # type: ignore[attr-defined]  # what exit does first: join threads
    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def _flush() -> None:
    """Flush stdout and stderr; stdout's reader having gone is no error (see _drop_stdout)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
    sys.stderr.flush()


if __name__ == "__main__":
    entry()
