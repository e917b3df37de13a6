"""Client-side task: one cohort of clients trained for one round (or the warm-up)."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from autorank.engine.jobs import ClientBackend, ClientJob, ClientOutcome, LocalSplit, limit_threads


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="{label}")
def train_cohort(
    engine: ClientBackend,
    jobs: Sequence[ClientJob],
    tests: Sequence[LocalSplit | None] | None,
    base: nn.Module,
    base_version: int,
    threads: int,
    label: str,
) -> list[ClientOutcome]:
    """Train a cohort of clients' LoRA adapters and evaluate each on its own local split."""
    limit_threads(threads)
    engine.sync_base(base, base_version)  # FLoRA merges into the base between rounds
    return engine.train_clients(jobs, tests)
