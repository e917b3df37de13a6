"""Server-side tasks: aggregate the round's updates, evaluate the global model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from autorank.adapters import AdapterState, AggregationResult, ClientUpdate
from autorank.aggregation import aggregate
from autorank.backend import DevicePreference, LoraSettings, pick_device
from autorank.config import AggregatorName
from autorank.evaluation import EvalResult
from autorank.rounds import global_eval
from autorank.training import LocalResult


@task(cache_policy=NO_CACHE, persist_result=False)
def aggregate_round(method: AggregatorName, results: Sequence[LocalResult]) -> AggregationResult:
    """Merge the clients' heterogeneous-rank adapters with the configured aggregator."""
    return aggregate(method, [ClientUpdate(r.state, r.n_samples) for r in results])


@task(cache_policy=NO_CACHE, persist_result=False)
def evaluate_global(
    base: nn.Module,
    global_state: AdapterState,
    *,
    merged: bool,
    lora: LoraSettings,
    x: torch.Tensor,
    y: torch.Tensor,
    device: DevicePreference,
) -> EvalResult:
    """Global accuracy and loss of the server's model on the test split."""
    return global_eval(
        base, global_state, merged=merged, lora=lora, x=x, y=y, device=pick_device(device)
    )
