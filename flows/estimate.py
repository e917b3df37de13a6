"""``compare --dry-run``'s time estimate: one cell of the grid run briefly, on this machine.

The cell (one that trains a warm-up, where the grid has one) runs as ``autorank run`` for its
first round or two, in a temporary folder that is deleted afterwards: its own MLflow store,
checkpoints, Prefect home and caches, so nothing of the project's is written. Its MLflow run
then says what each phase cost (``autorank.reporting.estimate``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from subprocess import PIPE

from autorank.config import ExperimentConfig, to_yaml, warm_up_identity
from autorank.reporting.cells import Cell
from autorank.reporting.estimate import Measurement, PlannedCell
from autorank.rounds.steps import RANKING_TIME
from flows.environment import cache_env
from tasks import tracking

RUN_ID = re.compile(r"^MLflow run id: (\w+)$", re.MULTILINE)


class MeasuringError(RuntimeError):
    """The measuring run did not finish; the message is its last line."""


def planned(cells: Sequence[Cell]) -> list[PlannedCell]:
    """Each cell, and whether it trains a warm-up of its own: the first cell of each warm-up
    (the same data, model, ranks and local training) does, the grid's other merges reuse it."""
    seen: set[str] = set()
    out = []
    for cell in cells:
        key = warm_up_identity(cell.config)
        warms = cell.config.difficulty_mode() == "warmup" and key not in seen
        if warms:
            seen.add(key)
        out.append(PlannedCell(cell.run_name, cell.method, warms))
    return out


def measured_cell(cells: Sequence[Cell]) -> Cell:
    """The cell to measure: one that trains a warm-up (so its cost is measured too), else one
    whose ranks are its own (a ``mean_autorank`` cell's are not known before AutoRank's)."""
    for cell in cells:
        if cell.config.difficulty_mode() == "warmup":
            return cell
    return next((c for c in cells if not c.waits_for_autorank), cells[0])


def measuring_config(config: ExperimentConfig, folder: Path) -> ExperimentConfig:
    """The cell's experiment cut to its first rounds (two, or past an early merge), recorded in
    ``folder``; a relative data path is read from here, not from ``folder``."""
    t, agg, data = config.training, config.aggregation, config.data
    rounds = min(t.rounds, max(2, (agg.early_rounds or 0) + 1))
    ranking = config.ranking
    mode = config.difficulty_mode()
    if mode is not None:  # `auto` looks at the rounds: keep what the whole run would do
        ranking = ranking.model_copy(update={"difficulty_from": mode})
    if data.path is not None and not data.path.is_absolute():
        data = data.model_copy(update={"path": data.path.resolve()})
    update = {
        "training": t.model_copy(update={"rounds": rounds}),
        "ranking": ranking,
        "data": data,
        "tracking": config.tracking.model_copy(
            update={"uri": f"sqlite:///{folder / 'mlflow.db'}", "parent_run_id": None}
        ),
        "runtime": config.runtime.model_copy(update={"checkpoint_dir": folder / "checkpoints"}),
    }
    return ExperimentConfig.model_validate(config.model_copy(update=update).model_dump())


def _child_env() -> dict[str, str]:
    """This process's environment less what points at the project: its caches (set by this
    command, so the child sets its own in the folder) and a Prefect server of the user's."""
    ours = cache_env(Path.cwd())
    env = {k: v for k, v in os.environ.items() if ours.get(k) != v}
    env.pop("PREFECT_API_URL", None)
    return env


STOP_WAIT_S = 20.0  # the measuring run's own clean stop (its Prefect server goes with it)
GRACE_S = 10.0  # after Ctrl-C, which reached it too: its own stop, before it is sent SIGTERM


def run_child(command: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    """Run the measuring command in ``folder``, its output captured. Stopped meanwhile (Ctrl-C
    reaches it too, SIGTERM only this process), it is asked to stop and waited for, so that it
    stops its Prefect server and leaves nothing running when this command exits."""
    proc = subprocess.Popen(
        command, cwd=folder, env=_child_env(), stdout=PIPE, stderr=PIPE, text=True
    )
    try:
        out, err = proc.communicate()
    except BaseException as stop:
        # Ctrl-C reached the child's group too: a second signal would cut its clean stop short,
        # so it gets one only if it does not stop by itself (or for a stop meant for us alone).
        alone = type(stop) is not KeyboardInterrupt
        try:
            proc.communicate(timeout=0 if alone else GRACE_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def measure(cell: Cell) -> Measurement:
    """Run ``cell`` for its first rounds in a temporary folder; what each phase cost."""
    with tempfile.TemporaryDirectory(prefix="autorank-estimate-") as tmp:
        folder = Path(tmp)
        config = measuring_config(cell.config, folder)
        path = folder / "cell.yaml"
        path.write_text(to_yaml(config))
        command = [sys.executable, "-m", "flows.cli", "run", "--config", str(path)]
        started = time.perf_counter()
        done = run_child(command, folder)
        process_s = time.perf_counter() - started
        found = RUN_ID.search(done.stdout)
        if done.returncode != 0 or found is None:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            last = lines[-1].removeprefix("autorank: ").removeprefix("error: ")
            raise MeasuringError(f"measuring {cell.run_name} failed: {last}")
        uri, run_id = config.tracking.uri, found.group(1)
        ranking = tracking.metric_series(uri, run_id, RANKING_TIME)
        return Measurement(
            cell=cell.run_name,
            process_s=process_s,
            run_s=tracking.run_seconds(uri, run_id),
            ranking_s=ranking[0] if ranking else 0.0,
            round_s=tuple(tracking.metric_series(uri, run_id, "time/round_s")),
        )
