"""The sequential engine: a cohort's clients one after another on persistent peft models.

A peft model is built once per rank pattern the cohort meets (ranks are fixed after the warm-up,
so a handful of patterns serve every round) and every job reloads its state into it, instead of
wrapping a fresh copy of the base per client per round. The wrapped models share the base's
weight tensors (``wrap_lora(share_base=True)``), so they cost one base in memory and see
FLoRA's in-place merges into it. This is the reference the batched engine is tested against.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence

import torch
from peft import PeftModel
from torch import nn

from autorank.engine.jobs import ClientJob, ClientOutcome, LocalSplit, substreams
from autorank.engine.local import LocalResult, StopSignal, TrainSettings, train_local
from autorank.lora.adapters import AdapterState
from autorank.lora.peft import (
    get_adapter_state,
    reset_head,
    seed_lora_init,
    set_adapter_state,
    wrap_lora,
)
from autorank.lora.settings import LoraSettings
from autorank.models.evaluation import EvalResult, evaluate

logger = logging.getLogger(__name__)


def build_client_model(
    base: nn.Module,
    ranks: dict[str, int],
    state: AdapterState | None,
    lora: LoraSettings,
    seed: int,
    *,
    share_base: bool = False,
) -> PeftModel:
    """A wrapped copy of ``base`` at ``ranks`` holding ``state`` (fresh LoRA if None)."""
    model = wrap_lora(
        base,
        ranks,
        policy=lora.policy,
        alpha=lora.alpha,
        alpha_ratio=lora.alpha_ratio,
        dropout=lora.dropout,
        head=lora.head,
        seed=seed,
        share_base=share_base,
    )
    if state is not None:
        set_adapter_state(model, state)
    return model


def _load_job(model: PeftModel, job: ClientJob, init_seed: int) -> None:
    """Put the job's starting state into a reused model: fresh LoRA and base head where absent."""
    state = job.state
    if state is None or not state.lora:
        seed_lora_init(model, init_seed)
    if state is None or not state.extra:
        reset_head(model)
    if state is not None:
        set_adapter_state(model, state)


def _train_job(
    model: PeftModel,
    job: ClientJob,
    train: TrainSettings,
    device: torch.device,
    stop: StopSignal | None = None,
) -> LocalResult:
    start = time.perf_counter()
    init_seed, order_seed = substreams(job.seed)
    _load_job(model, job, init_seed)
    losses, steps = train_local(
        model,
        job.x,
        job.y,
        train,
        epochs=job.epochs,
        seed=order_seed,
        device=device,
        stop=stop,
        max_steps=job.max_steps,
    )
    state = get_adapter_state(model)
    seconds = time.perf_counter() - start
    logger.debug("client %d: %d steps in %.3f s, losses %s", job.client, steps, seconds, losses)
    return LocalResult(job.client, state, int(job.x.shape[0]), tuple(losses), seconds, steps)


def run_client_job(
    base: nn.Module, job: ClientJob, lora: LoraSettings, train: TrainSettings, device: torch.device
) -> LocalResult:
    """One job on a freshly wrapped copy of ``base`` (the engines reuse their models instead)."""
    model = build_client_model(base, job.ranks, None, lora, seed=0)
    return _train_job(model, job, train, device)


class SequentialBackend:
    """Runs a cohort's jobs one after another on one device (``engine.jobs.ClientBackend``).

    Args:
        base: the frozen base model.
        lora: adapter settings shared by all clients.
        train: optimiser settings shared by all clients.
        device: where the cohort trains.
    """

    name = "sequential"

    def __init__(
        self, base: nn.Module, lora: LoraSettings, train: TrainSettings, device: torch.device
    ) -> None:
        on_device = all(p.device == device for p in base.parameters())
        self.base = base if on_device else copy.deepcopy(base).to(device)
        self.lora, self.train_settings, self.device = lora, train, device
        self._models: dict[tuple[tuple[str, int], ...], PeftModel] = {}
        self._seen: int | None = None
        self.stop = StopSignal()

    def sync_base(self, base: nn.Module, version: int) -> None:
        """See the base's weights as of ``version``; a no-op when the models share the base."""
        if self.base is base or version == self._seen:
            return
        self._seen = version
        own = self.base.state_dict()
        with torch.no_grad():
            for name, t in base.state_dict().items():
                own[name].copy_(t)

    def model_for(self, ranks: dict[str, int]) -> PeftModel:
        """The persistent wrapped model of one rank pattern."""
        key = tuple(sorted(ranks.items()))
        if key not in self._models:
            model = build_client_model(self.base, ranks, None, self.lora, 0, share_base=True)
            self._models[key] = model.to(self.device)
        return self._models[key]

    def train_clients(
        self, jobs: Sequence[ClientJob], tests: Sequence[LocalSplit | None] | None = None
    ) -> list[ClientOutcome]:
        """Train every job, then evaluate it on its local split; outcomes in the jobs' order."""
        tests = list(tests) if tests is not None else [None] * len(jobs)
        out = []
        for job, test in zip(jobs, tests, strict=True):
            model = self.model_for(job.ranks)
            result = _train_job(model, job, self.train_settings, self.device, self.stop)
            personal: EvalResult | None = None
            if test is not None and test.x.shape[0] > 0:
                personal = evaluate(model, test.x, test.y, device=self.device)
            out.append(ClientOutcome(result, personal))
        return out
