"""The pipeline against bare loops doing the same training: per round, whole process, memory.

Prints measured figures only (nothing asserted):

    .venv/bin/python benchmarks/pipeline_overhead.py rounds --clients 10 100 1000 \\
        [--per-round 100] [--rounds 3] [--set key=value ...]
    .venv/bin/python benchmarks/pipeline_overhead.py process [--set key=value ...]

``rounds``: the flow runs 1+R rounds in this process; the CPU seconds of this process and its
children (Prefect's temporary API server) between the checkpoints of round 1 and round 1+R,
over R, are the pipeline's CPU per round: start-up, pre-training and the warm-up are left out
(wall likewise). After each measured round, in the same process, the bare loops train exactly
that round's clients (the run's ranks, the same sampled cohorts, data order and epochs) with
nothing around them: no Prefect, MLflow, evaluation, aggregation or checkpoints; their time is
taken out of the pipeline's. Interleaved so, both see the same machine: run one after the
other, the bare loop's own time swung by up to 30 % between runs.
"bare sequential" is one persistent peft model per rank pattern and torch.optim, one client after
another; "bare batched" is the batched engine called directly. Both run on one thread, the
pipeline's cohorts in parallel on ``runtime.max_workers`` (default: every core), so CPU seconds
are the fair measure. Phase shares are the pipeline's own wall seconds (``time/*`` metrics).

``process``: the whole ``autorank run`` process (imports, Prefect's server, data, pre-training,
warm-up, rounds, tracking) against a bare process that imports torch and peft, loads the same
data, builds the same base and trains the same warm-up and rounds sequentially with peft.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent.parent


def tree_cpu() -> float:
    """CPU seconds (user + system) of this process and its live children."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(child.cpu_times()[:2])
    return total


def _config(tmp: str, overrides: list[str]):  # type: ignore[no-untyped-def]
    from autorank.config import load_config

    return load_config(
        None,
        [
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"runtime.checkpoint_dir={tmp}/ckpt",
            *overrides,
        ],
    )


class _Interleaved:
    """Runs the bare loops on each measured round's jobs right after the pipeline's round.

    Wraps the checkpoint write (the end of a round). After round 1 it builds the bare loops'
    base and jobs; after each later round it trains that round's jobs bare, on this thread,
    three times per engine. The bare loops thus see the same machine state as the round they
    are compared with (run one after the other, the bare loop's own time swung by up to 30 %).
    Everything the wrapper does is timed on its own thread (``time.thread_time``) and taken out
    of the pipeline's figures; whatever the pipeline's other threads and Prefect's server do
    meanwhile stays in them.
    """

    def __init__(self, config, rounds: int) -> None:  # type: ignore[no-untyped-def]
        self.config, self.rounds = config, rounds
        self.marks: list[tuple[float, float]] = []  # (process-tree CPU, wall) at each round end
        self.excluded: list[tuple[float, float]] = []  # the wrapper's (CPU, wall) after each mark
        self.bare: dict[str, list[tuple[float, float]]] = {"sequential": [], "batched": []}
        self.engines: dict[str, Any] = {}
        self.jobs: list[Any] = []

    def after_round(self) -> None:
        import torch

        self.marks.append((tree_cpu(), time.perf_counter()))
        cpu, wall = time.thread_time(), time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            done = len(self.marks)
            if done == 1:
                self._prepare()
            elif done - 2 < len(self.jobs):
                for kind, engine in self.engines.items():
                    self.bare[kind].append(_bare_round(engine, self.jobs[done - 2]))
        finally:
            torch.set_num_threads(threads)
        self.excluded.append((time.thread_time() - cpu, time.perf_counter() - wall))

    def _prepare(self) -> None:
        import torch

        from autorank.engine.batched import BatchedBackend
        from autorank.engine.sequential import SequentialBackend
        from autorank.recipe import layer_ranges, lora_settings, train_settings
        from autorank.rounds.checkpoint import DECISION_FILE

        config = self.config
        (decision,) = config.runtime.checkpoint_dir.glob(f"*/{DECISION_FILE}")
        base, self.jobs = _bare_jobs(config, decision, range(2, 2 + self.rounds))
        lora, train = lora_settings(config), train_settings(config)
        cpu_dev = torch.device("cpu")
        self.engines = {
            "sequential": SequentialBackend(base, lora, train, cpu_dev),
            "batched": BatchedBackend(
                base,
                list(layer_ranges(config)),
                lora,
                train,
                cpu_dev,
                max_clients=config.runtime.batch_clients,
            ),
        }

    def pipeline(self) -> tuple[float, float]:
        """The pipeline's mean (CPU, wall) per measured round, the wrapper's own time out."""
        spans = [
            (end[0] - start[0] - out[0], end[1] - start[1] - out[1])
            for start, end, out in zip(self.marks, self.marks[1:], self.excluded, strict=False)
        ]
        return statistics.mean(c for c, _ in spans), statistics.mean(w for _, w in spans)


def _observed_run(config, rounds: int) -> tuple[str, _Interleaved]:  # type: ignore[no-untyped-def]
    """Run the flow with the bare loops interleaved after each of its rounds."""
    import tasks.checkpointing as checkpointing
    from flows.experiment import federated_training

    watch = _Interleaved(config, rounds)
    save = checkpointing.save_checkpoint

    def marked(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = save(*args, **kwargs)
        watch.after_round()
        return out

    checkpointing.save_checkpoint = marked
    try:
        run_id = federated_training(config=config)
    finally:
        checkpointing.save_checkpoint = save
    return str(run_id), watch


def _phases(uri: str, run_id: str, first: int) -> dict[str, float]:
    """Mean wall seconds per round of each phase, over rounds after ``first``."""
    from tasks import tracking

    out = {}
    for phase in ("round", "train", "aggregate", "evaluate"):
        series = tracking.metric_series(uri, run_id, f"time/{phase}_s")[first:]
        out[phase] = sum(series) / len(series)
    return out


def _records(uri: str, run_id: str) -> tuple[int, int, int, int]:
    """What the run left in Prefect and MLflow: (most task runs in one round, task runs not
    completed, rounds with task runs, the MLflow run's metric keys)."""
    import re
    from collections import Counter

    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    flt = FlowRunFilter(id=FlowRunFilterId(any_=[run.data.tags["prefect.flow_run_id"]]))
    with get_client(sync_client=True) as prefect:
        deadline = time.monotonic() + 60
        while True:  # the API server records task runs from events, slightly after the fact
            runs = prefect.read_task_runs(flow_run_filter=flt)
            pending = [r for r in runs if r.state is None or not r.state.is_completed()]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    per_round = Counter(m.group(1) for r in runs if (m := re.match(r"round-(\d+)-", r.name)))
    return max(per_round.values()), len(pending), len(per_round), len(run.data.metrics)


def _bare_jobs(config, decision: Path, rounds: range):  # type: ignore[no-untyped-def]
    """The measured rounds' jobs, rebuilt from the run's rank decision and seeds."""
    import json

    from autorank.lora.targets import expand_ranks
    from autorank.ranking.assignment import RankAssignment
    from autorank.recipe import federation_for, lora_settings, make_base
    from autorank.rounds.cohorts import sample_clients
    from autorank.rounds.steps import client_data, initial_state, round_jobs

    federation = federation_for(config)
    base = make_base(
        config.model,
        federation.data,
        federation.public,
        lr=config.training.lr,
        batch_size=config.training.batch_size,
        seed=config.seed,
    )
    ranks = RankAssignment.from_json(json.loads(decision.read_text())).ranks()
    lora = lora_settings(config)
    global_state = initial_state(base, ranks, lora, seed=config.seed)
    data = client_data(federation)
    per_round = []
    paths = [expand_ranks(base, r) for r in ranks]
    for r in rounds:
        sampled = sample_clients(
            len(data), config.training.clients_per_round, seed=config.seed, round_idx=r
        )
        epochs = config.training.local_epochs
        per_round.append(
            round_jobs(
                data,
                sampled,
                global_state,
                ranks,
                paths,
                lora,
                fresh=False,
                epochs=epochs,
                seed=config.seed,
                round_idx=r,
            )
        )
    return base, per_round


def _bare_round(engine, jobs) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Median thread-CPU and wall seconds of three bare passes over one round's jobs."""
    cpus, walls = [], []
    for _ in range(3):
        cpu, wall = time.thread_time(), time.perf_counter()
        engine.train_clients(jobs)
        cpus.append(time.thread_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(cpus), statistics.median(walls)


def rounds_mode(args: argparse.Namespace) -> None:
    from flows.local import configure_logging

    configure_logging(verbose=False)
    logging.getLogger("autorank.progress").setLevel(logging.WARNING)
    print(f"machine: {psutil.cpu_count()} cores, {os.uname().machine}; rounds timed: {args.rounds}")
    print(
        "clients  per round  pipeline CPU s  wall s | bare seq CPU s  wall s  CPU ratio  "
        "wall ratio | bare batched CPU s  CPU ratio | train  aggregate  evaluate  other "
        "(wall shares) | peak RSS MB | task runs per round (not completed) | metric keys"
    )
    for k in args.clients:
        per = args.per_round if args.per_round and args.per_round < k else None
        tmp = tempfile.mkdtemp(prefix="autorank-bench-")
        common = [f"partition.n_clients={k}", *args.overrides]
        if per:
            common.append(f"training.clients_per_round={per}")
        long = _config(tmp, [*common, f"training.rounds={1 + args.rounds}"])
        run_id, watch = _observed_run(long, args.rounds)
        n = len(watch.marks)
        assert n == 1 + args.rounds, f"saw {n} rounds checkpointed"
        cpu, wall = watch.pipeline()
        phases = _phases(long.tracking.uri, run_id, first=1)
        seq_cpu = statistics.mean(c for c, _ in watch.bare["sequential"])
        seq_wall = statistics.mean(w for _, w in watch.bare["sequential"])
        bat_cpu = statistics.mean(c for c, _ in watch.bare["batched"])
        share = {p: phases[p] / phases["round"] for p in ("train", "aggregate", "evaluate")}
        other = 1 - sum(share.values())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        most, pending, rounds, keys = _records(long.tracking.uri, run_id)
        print(
            f"{k:7d}  {per or k:9d}  {cpu:14.2f}  {wall:6.2f} | "
            f"{seq_cpu:14.2f}  {seq_wall:6.2f}  {cpu / seq_cpu:9.2f}  {wall / seq_wall:10.2f} | "
            f"{bat_cpu:18.2f}  {cpu / bat_cpu:9.2f} | {share['train']:5.0%}  "
            f"{share['aggregate']:9.0%}  {share['evaluate']:8.0%}  {other:5.0%}"
            f"                | {rss:11.0f} | {most:>7d} ({pending}; {rounds} rounds)"
            f"                | {keys:11d}"
        )


BARE = """
import sys, time
start = time.perf_counter()
import torch
from autorank.config import load_config
from autorank.engine.jobs import warmup_jobs
from autorank.engine.sequential import SequentialBackend
from autorank.lora.functional import LoraTemplate, evaluate_state
from autorank.lora.targets import expand_ranks
from autorank.ranking.assignment import RankAssignment
from autorank.recipe import federation_for, layer_ranges, lora_settings, make_base, train_settings
from autorank.rounds.steps import client_data, initial_state, round_jobs, test_data
import json
torch.set_num_threads(1)
config = load_config(None, sys.argv[2:])
ranks = RankAssignment.from_json(json.loads(open(sys.argv[1]).read())).ranks()
federation = federation_for(config)
base = make_base(config.model, federation.data, federation.public, lr=config.training.lr,
                 batch_size=config.training.batch_size, seed=config.seed)
lora, train = lora_settings(config), train_settings(config)
engine = SequentialBackend(base, lora, train, torch.device("cpu"))
data = client_data(federation)
layers = layer_ranges(config)
top = {k: hi for k, (_, hi) in layers.items()}
xs, ys = [d.x for d in data], [d.y for d in data]
epochs = config.training.warmup_epochs
engine.train_clients(warmup_jobs(xs, ys, ranks=top, epochs=epochs, seed=config.seed))
state = initial_state(base, ranks, lora, seed=config.seed)
clients = list(range(len(data)))
for r in range(1, config.training.rounds + 1):
    paths = [expand_ranks(base, rk) for rk in ranks]
    E = config.training.local_epochs
    engine.train_clients(round_jobs(data, clients, state, ranks, paths, lora, fresh=False,
                                    epochs=E, seed=config.seed, round_idx=r))
x, y = test_data(federation)
acc = evaluate_state(LoraTemplate(base, list(layers), lora.head, torch.device("cpu")), state, x, y)
print(f"bare process done in {time.perf_counter() - start:.1f} s")
"""


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (the process and every child it waited for) of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        cmd, env=env, check=True, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def process_mode(args: argparse.Namespace) -> None:
    tmp = tempfile.mkdtemp(prefix="autorank-bench-")
    env = dict(os.environ, PREFECT_HOME=f"{tmp}/prefect")
    sets = [
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"runtime.checkpoint_dir={tmp}/ckpt",
        *args.overrides,
    ]
    flags = [a for s in sets for a in ("--set", s)]
    # The first run creates the MLflow and Prefect stores (a fresh machine), the second reuses
    # them; a bare process runs after each, and both are compared with the mean of the two bare
    # runs (one bare run alone swung by up to 30 % between calls).
    from autorank.config import load_config
    from autorank.rounds.checkpoint import DECISION_FILE

    checkpoints = load_config(None, sets).runtime.checkpoint_dir
    runs: list[tuple[str, float, float]] = []
    bare: list[tuple[float, float]] = []
    for what in ("new stores", "existing stores"):
        runs.append((what, *_timed([sys.executable, "-m", "flows.cli", "run", *flags], env)))
        # Either run's decision: the same seed, data and config give the same ranks.
        decision = next(checkpoints.glob(f"*/{DECISION_FILE}"))
        bare.append(_timed([sys.executable, "-c", BARE, str(decision), *sets], env))
    bare_wall = statistics.mean(w for w, _ in bare)
    bare_cpu = statistics.mean(c for _, c in bare)
    print(f"machine: {psutil.cpu_count()} cores; config overrides: {args.overrides or 'none'}")
    print("process                              wall s   CPU s   ratio (wall, CPU)")
    for i, (w, c) in enumerate(bare, 1):
        print(f"bare torch+peft loop, run {i}        {w:7.1f}  {c:6.1f}")
    print(f"bare torch+peft loop, mean         {bare_wall:7.1f}  {bare_cpu:6.1f}")
    for what, w, c in runs:
        print(
            f"autorank run, {what:<20} {w:7.1f}  {c:6.1f}   "
            f"{w / bare_wall:.2f}x, {c / bare_cpu:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    rounds = sub.add_parser("rounds", help="CPU per round against bare loops")
    rounds.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    rounds.add_argument("--per-round", type=int, default=None, help="clients sampled per round")
    rounds.add_argument("--rounds", type=int, default=3, help="rounds timed")
    rounds.add_argument("--set", dest="overrides", action="append", default=[])
    process = sub.add_parser("process", help="the whole autorank run process against a bare one")
    process.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="autorank-bench-prefect-"))
    sys.path.insert(0, str(HERE))
    (rounds_mode if args.mode == "rounds" else process_mode)(args)


if __name__ == "__main__":
    main()
