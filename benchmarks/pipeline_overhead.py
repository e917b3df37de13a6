"""The pipeline against bare loops doing the same training: per round, whole process, memory.

Prints measured figures only (nothing asserted):

    .venv/bin/python benchmarks/pipeline_overhead.py rounds --clients 10 100 1000 \\
        [--per-round 100] [--rounds 3] [--set key=value ...]
    .venv/bin/python benchmarks/pipeline_overhead.py process [--set key=value ...]

``rounds``: the flow runs 1+R rounds in this process; the CPU seconds of this process and its
children (Prefect's temporary API server) between the checkpoints of round 1 and round 1+R,
over R, are the pipeline's CPU per round: start-up, pre-training and the warm-up are left out
(wall likewise). The bare
loops then train exactly the same clients (the run's ranks, the same sampled cohorts, data order
and epochs) with nothing around them: no Prefect, MLflow, evaluation, aggregation or checkpoints.
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


def _observed_run(config) -> tuple[str, list[tuple[float, float]]]:  # type: ignore[no-untyped-def]
    """Run the flow; (CPU, wall) of the process tree as each round's checkpoint is written.

    The marks come from a wrapper around the checkpoint write (a polling thread would take the
    GIL from the run it measures).
    """
    import tasks.checkpointing as checkpointing
    from flows.experiment import federated_training

    marks: list[tuple[float, float]] = []
    save = checkpointing.save_checkpoint

    def marked(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = save(*args, **kwargs)
        marks.append((tree_cpu(), time.perf_counter()))
        return out

    checkpointing.save_checkpoint = marked  # type: ignore[assignment]
    try:
        run_id = federated_training(config=config)
    finally:
        checkpointing.save_checkpoint = save  # type: ignore[assignment]
    return str(run_id), marks


def _phases(uri: str, run_id: str, first: int) -> dict[str, float]:
    """Mean wall seconds per round of each phase, over rounds after ``first``."""
    from tasks import tracking

    out = {}
    for phase in ("round", "train", "aggregate", "evaluate"):
        series = tracking.metric_series(uri, run_id, f"time/{phase}_s")[first:]
        out[phase] = sum(series) / len(series)
    return out


def _bare_jobs(config, run_id: str, rounds: range):  # type: ignore[no-untyped-def]
    """The measured rounds' jobs, rebuilt from the run's rank decision and seeds."""
    import json

    from autorank.base import make_base
    from autorank.checkpoint import DECISION_FILE
    from autorank.cohorts import sample_clients
    from autorank.ranks import RankAssignment
    from autorank.rounds import client_data, initial_state, round_jobs
    from autorank.targets import expand_ranks
    from flows.engines import lora_settings
    from flows.ranking import federation_for

    federation = federation_for(config)
    base = make_base(
        config.model,
        federation.data,
        federation.public,
        lr=config.training.lr,
        batch_size=config.training.batch_size,
        seed=config.seed,
    )
    decision = config.runtime.checkpoint_dir / run_id / DECISION_FILE
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


def _bare(config, base, per_round, kind: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """CPU and wall seconds per round of a bare loop over the same jobs, on one thread.

    Each round's jobs run three times and the median counts (this machine's timings vary by
    tens of percent from one run to the next); the mean over rounds is returned.
    """
    import torch

    from autorank.batched import BatchedBackend
    from autorank.sequential import SequentialBackend
    from autorank.training import TrainSettings
    from flows.engines import lora_settings
    from flows.ranking import layer_ranges

    torch.set_num_threads(1)
    lora, train = lora_settings(config), TrainSettings.from_config(config.training)
    cpu_dev = torch.device("cpu")
    if kind == "sequential":
        engine = SequentialBackend(base, lora, train, cpu_dev)
    else:
        engine = BatchedBackend(
            base,
            list(layer_ranges(config)),
            lora,
            train,
            cpu_dev,
            max_clients=config.runtime.batch_clients,
        )
    cpus, walls = [], []
    for jobs in per_round * 3:  # every round three times: the median of each is kept
        cpu, wall = time.process_time(), time.perf_counter()
        engine.train_clients(jobs)
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    n = len(per_round)
    per_cpu = [statistics.median(cpus[r::n]) for r in range(n)]
    per_wall = [statistics.median(walls[r::n]) for r in range(n)]
    return statistics.mean(per_cpu), statistics.mean(per_wall)


def rounds_mode(args: argparse.Namespace) -> None:
    from flows.local import configure_logging

    configure_logging(verbose=False)
    logging.getLogger("autorank.progress").setLevel(logging.WARNING)
    print(f"machine: {psutil.cpu_count()} cores, {os.uname().machine}; rounds timed: {args.rounds}")
    print(
        "clients  per round  pipeline CPU s  wall s | bare seq CPU s  wall s  CPU ratio  "
        "wall ratio | bare batched CPU s  CPU ratio | train  aggregate  evaluate  other "
        "(wall shares) | peak RSS MB"
    )
    for k in args.clients:
        per = args.per_round if args.per_round and args.per_round < k else None
        tmp = tempfile.mkdtemp(prefix="autorank-bench-")
        common = [f"partition.n_clients={k}", *args.overrides]
        if per:
            common.append(f"training.clients_per_round={per}")
        long = _config(tmp, [*common, f"training.rounds={1 + args.rounds}"])
        run_id, marks = _observed_run(long)
        assert len(marks) == 1 + args.rounds, f"saw {len(marks)} rounds checkpointed"
        cpu = (marks[-1][0] - marks[0][0]) / args.rounds
        wall = (marks[-1][1] - marks[0][1]) / args.rounds
        phases = _phases(long.tracking.uri, run_id, first=1)
        base, jobs = _bare_jobs(long, run_id, range(2, 2 + args.rounds))
        seq_cpu, seq_wall = _bare(long, base, jobs, "sequential")
        bat_cpu, _ = _bare(long, base, jobs, "batched")
        share = {p: phases[p] / phases["round"] for p in ("train", "aggregate", "evaluate")}
        other = 1 - sum(share.values())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"{k:7d}  {per or k:9d}  {cpu:14.2f}  {wall:6.2f} | "
            f"{seq_cpu:14.2f}  {seq_wall:6.2f}  {cpu / seq_cpu:9.2f}  {wall / seq_wall:10.2f} | "
            f"{bat_cpu:18.2f}  {cpu / bat_cpu:9.2f} | {share['train']:5.0%}  "
            f"{share['aggregate']:9.0%}  {share['evaluate']:8.0%}  {other:5.0%}"
            f"                | {rss:11.0f}"
        )


BARE = """
import sys, time
start = time.perf_counter()
import torch
from autorank.backend import warmup_jobs
from autorank.base import make_base
from autorank.config import load_config
from autorank.rounds import client_data, initial_state, round_jobs, test_data
from autorank.sequential import SequentialBackend
from autorank.batched import LoraTemplate, evaluate_state
from autorank.training import TrainSettings
from autorank.targets import expand_ranks
from autorank.ranks import RankAssignment
from flows.engines import lora_settings
from flows.ranking import federation_for, layer_ranges
import json
torch.set_num_threads(1)
config = load_config(None, sys.argv[2:])
ranks = RankAssignment.from_json(json.loads(open(sys.argv[1]).read())).ranks()
federation = federation_for(config)
base = make_base(config.model, federation.data, federation.public, lr=config.training.lr,
                 batch_size=config.training.batch_size, seed=config.seed)
lora, train = lora_settings(config), TrainSettings.from_config(config.training)
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
    # The first run creates the MLflow and Prefect stores (a fresh machine), the second reuses them.
    cold_wall, cold_cpu = _timed([sys.executable, "-m", "flows.cli", "run", *flags], env)
    wall, cpu = _timed([sys.executable, "-m", "flows.cli", "run", *flags], env)
    from autorank.config import load_config

    config = load_config(None, sets)
    decision = sorted(config.runtime.checkpoint_dir.glob("*/rank_decision.json"))[-1]
    bare_wall, bare_cpu = _timed([sys.executable, "-c", BARE, str(decision), *sets], env)
    print(f"machine: {psutil.cpu_count()} cores; config overrides: {args.overrides or 'none'}")
    print("process                              wall s   CPU s   ratio (wall, CPU)")
    print(f"bare torch+peft loop               {bare_wall:7.1f}  {bare_cpu:6.1f}")
    for what, w, c in (("new stores", cold_wall, cold_cpu), ("existing stores", wall, cpu)):
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
