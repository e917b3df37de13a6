"""Client-side tasks: one client's warm-up or one client's round, mapped over the clients."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from autorank.backend import (
    ClientJob,
    DevicePreference,
    LoraSettings,
    limit_threads,
    personalised_eval,
    pick_device,
    run_client_job,
)
from autorank.evaluation import EvalResult
from autorank.rounds import ClientData
from autorank.training import LocalResult, TrainSettings


@dataclass(frozen=True)
class ClientOutcome:
    """A client's trained update and its personalised accuracy (None without a local split)."""

    result: LocalResult
    personal: EvalResult | None


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="train-client-{job.client}")
def train_client(
    base: nn.Module,
    job: ClientJob,
    data: ClientData,
    lora: LoraSettings,
    train: TrainSettings,
    device: DevicePreference,
    threads: int,
) -> ClientOutcome:
    """Train one client's LoRA adapter for one round and evaluate it on its own local split."""
    limit_threads(threads)
    where = pick_device(device, job.client)
    result = run_client_job(base, job, lora, train, where)
    personal = None
    if data.x_test.shape[0] > 0:
        personal = personalised_eval(
            base, result.state, job.ranks, data.x_test, data.y_test, lora=lora, device=where
        )
    return ClientOutcome(result, personal)


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="warm-up-client-{job.client}")
def warm_up_client(
    base: nn.Module,
    job: ClientJob,
    lora: LoraSettings,
    train: TrainSettings,
    device: DevicePreference,
    threads: int,
) -> tuple[float, ...]:
    """Train one client at the maximum rank from the common init; return its loss curve."""
    limit_threads(threads)
    return run_client_job(base, job, lora, train, pick_device(device, job.client)).epoch_losses
