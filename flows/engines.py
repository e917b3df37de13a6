"""The run's training engines: one backend per cohort slot, built once and kept for every round."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from torch import nn

from autorank.config import ExperimentConfig
from autorank.engine.factory import cohort_count, make_backend, why_not_batched
from autorank.engine.jobs import ClientBackend, ClientJob, ClientOutcome, pick_device
from autorank.engine.local import TrainingStoppedError
from autorank.lora.functional import LoraTemplate
from autorank.lora.targets import expand_ranks
from autorank.models.text import CausalLM, TextClassifier
from autorank.recipe import layer_ranges, lora_settings, train_settings
from autorank.rounds.cohorts import participants, split_cohorts
from autorank.rounds.steps import ClientData
from flows.runners import client_task_resources, opaque, signals_deferred
from tasks.clients import train_cohort

progress = logging.getLogger("autorank.progress")
T = TypeVar("T")


def _same(value: T) -> T:
    return value


@dataclass(eq=False)  # one run's engines: hashable by identity (runs_ending's set)
class Engines:
    """Where a run's cohorts train, and what the server evaluates with.

    Attributes:
        runner: the task runner cohort tasks are submitted to.
        backends: one engine per cohort slot (cohort i of a round uses backend i).
        evaluator: the base with pluggable LoRA factors, for the global model.
        paths: each client's module path -> rank, once ranks are decided (``set_ranks``).
    """

    runner: TaskRunner[Any]
    backends: list[ClientBackend]
    evaluator: LoraTemplate
    paths: list[dict[str, int]] = field(default_factory=list)
    in_flight: list[PrefectFuture[Any]] = field(default_factory=list)

    def stop(self, wait_s: float = 60) -> None:
        """Every engine stops at its next local step (``autorank.engine.local.StopSignal``); the
        cohort tasks in flight in this process are then waited for (up to ``wait_s`` each), so
        that Prefect records their end while the flow run still stands (a task ending after it
        printed a traceback). A Dask worker holds a copy of its engine, which no flag reaches:
        its cohort is not waited for."""
        self.raise_stop()
        if isinstance(self.runner, ThreadPoolTaskRunner):
            for future in self.in_flight:
                future.wait(timeout=wait_s)
        self.in_flight.clear()

    def raise_stop(self) -> None:
        """Every engine stops at its next local step (nothing is waited for)."""
        for engine in self.backends:
            engine.stop.set()

    def train(
        self,
        config: ExperimentConfig,
        jobs: Sequence[ClientJob],
        data: Sequence[ClientData] | None,
        base: nn.Module,
        base_version: int,
        label: str,
    ) -> list[ClientOutcome]:
        """Split the jobs into cohorts, one task each on the configured runner; outcomes in order.

        With ``data`` each client is also evaluated on its local split (not in the warm-up).
        """
        # Balanced by mini-batches trained, so that parallel cohorts finish together.
        t = config.training
        steps = [j.epochs * j.batches_per_epoch(t.batch_size, t.grad_accumulation) for j in jobs]
        chunks = split_cohorts(jobs, len(self.backends), steps)
        # Dask ships parameters itself (and would unpack Prefect's quote as a plain tuple).
        wrap = opaque if config.runtime.task_runner == "threads" else _same
        futures = self.in_flight  # what Engines.stop waits for if the run is interrupted
        with client_task_resources(config.runtime):
            for i, chunk in enumerate(chunks):
                parameters = {
                    "engine": self.backends[i],
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
                    futures.append(self.runner.submit(train_cohort, parameters))
        done = {o.result.client: o for f in futures for o in f.result()}
        futures.clear()
        return [done[j.client] for j in jobs]  # the jobs' order, whatever the cohorts were

    def set_ranks(self, ranks: Sequence[Mapping[str, int]]) -> None:
        """Expand every client's target ranks to module paths (once per distinct pattern)."""
        self.paths = [self.evaluator.expand(r) for r in ranks]

    def update_ranks(self, changed: Mapping[int, Mapping[str, int]]) -> None:
        """Expand the ranks of the clients in ``changed`` only (client -> target ranks)."""
        for client, ranks in changed.items():
            self.paths[client] = self.evaluator.expand(ranks)


def backend_kind(
    config: ExperimentConfig, base: nn.Module, data: Sequence[ClientData]
) -> Literal["sequential", "batched"]:
    """``batched`` where asked (or ``auto``) and the model allows it, else ``sequential``.

    ``auto`` keeps LoRA on convolutions sequential on a CPU: there the batched engine's
    per-client convolutions ran 2-4x slower than one client after another
    (``benchmarks/engine_throughput.py``, docs/performance.md).
    """
    asked = config.runtime.backend
    if asked == "sequential":
        return "sequential"
    targets = list(layer_ranges(config))
    convs = [p for p in expand_ranks(base, dict.fromkeys(targets, 1))
             if isinstance(base.get_submodule(p), nn.Conv2d)]  # fmt: skip
    on_cpu = pick_device(config.runtime.device).type == "cpu"
    if asked == "auto" and convs and on_cpu:
        progress.info(
            "runtime.backend auto: training sequentially (LoRA on convolutions %s batches "
            "slower than sequentially on a CPU)",
            ", ".join(convs),
        )
        return "sequential"
    if asked == "auto" and isinstance(base, TextClassifier | CausalLM) and on_cpu:
        progress.info(
            "runtime.backend auto: training sequentially (a transformer's attention runs "
            "example by example under the batched engine's vmap on a CPU)"
        )
        return "sequential"
    reason = why_not_batched(base, targets, lora_settings(config), data[0].x)
    if reason is None:
        return "batched"
    progress.warning("runtime.backend %s: training sequentially, %s", asked, reason)
    return "sequential"


def build_engines(
    config: ExperimentConfig, base: nn.Module, data: Sequence[ClientData], runner: TaskRunner[Any]
) -> Engines:
    """One engine per cohort slot: ``runtime.cohort_size``, else one per worker."""
    runtime = config.runtime
    kind = backend_kind(config, base, data)
    n = participants(len(data), config.training.clients_per_round)
    workers = runtime.max_workers or os.cpu_count() or 1
    # Threads of one process share the GIL (Dask workers are processes of their own).
    shared_gil = runtime.task_runner == "threads" and pick_device(runtime.device).type == "cpu"
    work = (
        n * sum(p.numel() for p in base.parameters()) if kind == "batched" and shared_gil else None
    )
    count = cohort_count(n, workers=workers, cohort_size=runtime.cohort_size, grain_work=work)
    lora, train = lora_settings(config), train_settings(config)
    targets = list(layer_ranges(config))
    backends = [
        make_backend(
            kind,
            base,
            targets,
            lora,
            train,
            pick_device(runtime.device, i),
            max_clients=runtime.batch_clients,
        )
        for i in range(count)
    ]
    evaluator = LoraTemplate(base, targets, lora.head, pick_device(runtime.device))
    progress.info(
        "%d cohort(s) of up to %d clients per round, %s engine", count, -(-n // count), kind
    )
    engines = Engines(runner, backends, evaluator)
    with _LIVE_LOCK:
        _LIVE.add(engines)
        ending = _ENDING.is_set()
    if ending:
        raise TrainingStoppedError("training stopped: the run is ending")
    return engines


_LIVE: weakref.WeakSet[Engines] = weakref.WeakSet()  # every run's engines in this process
_LIVE_LOCK = threading.Lock()
_ENDING = threading.Event()


def runs_ending(futures: Sequence[PrefectFuture[Any]]) -> None:
    """Every run of this process stops at its next local step, and a run that has not built
    its engines yet stops when it does, until each of ``futures`` is done.

    Ctrl-C and SIGTERM reach the main thread only. A run trained in another thread (a grid's
    parallel cell, one of ``futures``) would train on to its last round, its caller waiting
    for it. Its ``TrainingStoppedError`` ends it as an interrupted run (KILLED, resumable).
    """
    if not futures:
        return
    remaining = [len(futures)]

    def ended(_: PrefectFuture[Any]) -> None:
        with _LIVE_LOCK:
            remaining[0] -= 1
            if remaining[0] == 0:
                _ENDING.clear()

    with _LIVE_LOCK:
        _ENDING.set()
        live = list(_LIVE)
    for engines in live:
        engines.raise_stop()
    for future in futures:
        future.add_done_callback(ended)
