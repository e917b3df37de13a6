"""Server-side task: aggregate the round's updates and evaluate the global model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from autorank.adapters import AdapterState
from autorank.backend import ClientOutcome, limit_threads
from autorank.batched import LoraTemplate
from autorank.config import AggregatorName
from autorank.rounds import ServerStep, server_step


@task(
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name="round-{round_idx}-aggregate-evaluate",
)
def server_round(
    method: AggregatorName,
    outcomes: Sequence[ClientOutcome],
    *,
    previous: AdapterState,
    base: nn.Module,
    template: LoraTemplate,
    x: torch.Tensor,
    y: torch.Tensor,
    round_idx: int,
    threads: int,
) -> ServerStep:
    """Merge the clients' heterogeneous-rank adapters and test the global model."""
    limit_threads(threads)
    return server_step(
        method,
        outcomes,
        previous=previous,
        base=base,
        template=template,
        x=x,
        y=y,
        round_idx=round_idx,
    )
