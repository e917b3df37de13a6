"""The batched engine: a cohort's LoRA adapters trained in one forward/backward per local step.

Each client keeps what the sequential engine gives it: its own mini-batches in the same order
(one ``torch.Generator`` per client, seeded from its job), its own scale, optimiser state, weight
decay and gradient clipping. Its factors are stacked along a leading client axis and zero-padded
to the cohort's largest rank, ``A: [K, R, d_in]``, ``B: [K, d_out, R]``, ``scale: [K]``, the head
``[K, ...]``, and ``torch.func.vmap`` maps one functional forward of the shared frozen base over
the clients. A padded component k has ``A[k] = 0`` and ``B[:, k] = 0``, so both its gradients are
exactly zero and SGD, momentum, weight decay and Adam all leave it at zero.

Clients are sorted by their number of steps, longest first, so the clients still training at
step t are a prefix ``[:k_t]`` of the stack: a step works on views, and a client that has run out
of batches is neither computed nor updated. A short last batch is padded with masked rows.
Everything runs in eval mode (no dropout, frozen normalisation statistics).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from autorank.engine.jobs import ClientJob, ClientOutcome, LocalSplit, substreams
from autorank.engine.local import LocalResult, StopSignal, TrainSettings
from autorank.engine.optim import ClientOptimizer
from autorank.lora.adapters import AdapterState, LoraFactors
from autorank.lora.functional import LoraTemplate, Params, check_state
from autorank.lora.settings import LoraSettings
from autorank.lora.targets import (
    fresh_down_projections,
)
from autorank.models.evaluation import EvalResult
from autorank.models.objectives import objective_of, per_sample


def job_start(
    template: LoraTemplate, job: ClientJob, lora: LoraSettings
) -> tuple[dict[str, int], Params]:
    """The job's starting factors (``B`` at the job's scale) and head, unpadded, on CPU."""
    ranks = template.expand(job.ranks)
    state = job.state
    params: Params = {}
    if state is None or not state.lora:
        init_seed, _ = substreams(job.seed)
        for path, A in fresh_down_projections(template.dims, ranks, init_seed).items():
            params[f"{path}.lora_A"] = A
            params[f"{path}.lora_B"] = A.new_zeros(template.dims[path][0], ranks[path])
    else:
        check_state(state, ranks)
        for path, f in state.lora.items():
            # Keep the product scale * B @ A if the state was made at another scale.
            ratio = f.scale / lora.scale(ranks[path])
            params[f"{path}.lora_A"] = f.A
            params[f"{path}.lora_B"] = f.B * ratio
    extra = state.extra if state is not None and state.extra else template.head_init
    if sorted(extra) != sorted(template.head_names):
        raise ValueError(
            f"adapter state does not fit the model: head tensors {sorted(extra)}, "
            f"expected {sorted(template.head_names)}"
        )
    params |= {n: extra[n] for n in template.head_names}
    return ranks, params


@dataclass
class _Stack:
    """A cohort's stacked trainable tensors, clients in step order (longest first)."""

    ranks: list[dict[str, int]]
    params: Params  # leaf tensors that require grad: A, B per path, head
    scales: Params  # ``<path>.scale`` -> [K]

    def view(self, k: int) -> Params:
        """The first ``k`` clients' tensors (views), as one ``functional_call`` mapping."""
        return {n: t[:k] for n, t in self.params.items()} | {
            n: t[:k] for n, t in self.scales.items()
        }


def _stack(
    template: LoraTemplate, starts: Sequence[tuple[dict[str, int], Params]], lora: LoraSettings
) -> _Stack:
    dev = template.device
    K = len(starts)
    params: Params = {}
    scales: Params = {}
    for path in template.paths:
        d_out, d_in = template.dims[path]
        R = max(r[path] for r, _ in starts)
        A = torch.zeros(K, R, d_in, device=dev)
        B = torch.zeros(K, d_out, R, device=dev)
        for i, (ranks, p) in enumerate(starts):
            r = ranks[path]
            A[i, :r] = p[f"{path}.lora_A"].to(dev)
            B[i, :, :r] = p[f"{path}.lora_B"].to(dev)
        params[f"{path}.lora_A"] = A.requires_grad_(True)
        params[f"{path}.lora_B"] = B.requires_grad_(True)
        scales[f"{path}.scale"] = torch.tensor(
            [lora.scale(ranks[path]) for ranks, _ in starts], device=dev
        )
    for name in template.head_names:
        head = torch.stack([p[name].to(dev) for _, p in starts])
        params[name] = head.requires_grad_(True)
    return _Stack([r for r, _ in starts], params, scales)


@dataclass(frozen=True)
class _Schedule:
    """Every client's optimiser steps, each ``A`` mini-batches: ``idx [K, T, A, b]`` into the
    cohort's samples and its ``mask``; ``micro [K, T]`` the mini-batches a step takes (fewer
    at an epoch's end, 0 past the client's last step)."""

    idx: torch.Tensor
    mask: torch.Tensor
    epoch: torch.Tensor  # [K, T]: the epoch of each step
    micro: torch.Tensor
    active: list[int]  # clients still training at step t (a prefix of the stack)


def _schedule(
    jobs: Sequence[ClientJob], batch_size: int, offsets: Sequence[int], accumulation: int = 1
) -> _Schedule:
    """The sequential engine's data order, one ``torch.Generator`` per client, in steps of
    ``accumulation`` mini-batches that do not cross an epoch."""
    b, A = batch_size, accumulation
    per_client = []
    for job, offset in zip(jobs, offsets, strict=True):
        n = int(job.x.shape[0])
        nb, used = math.ceil(n / b), job.batches_per_epoch(b, A)
        gen = torch.Generator().manual_seed(substreams(job.seed)[1])
        steps = []
        for e in range(job.epochs):
            order = torch.randperm(n, generator=gen) + offset
            rows = F.pad(order, (0, nb * b - n), value=-1).reshape(nb, b)[:used]
            steps += [(e, rows[i : i + A]) for i in range(0, used, A)]
        per_client.append(steps)
    T = max(len(steps) for steps in per_client)
    idx = torch.full((len(jobs), T, A, b), -1, dtype=torch.long)
    epoch = torch.zeros(len(jobs), T, dtype=torch.long)
    micro = torch.zeros(len(jobs), T, dtype=torch.long)
    for i, steps in enumerate(per_client):
        for t, (e, rows) in enumerate(steps):
            idx[i, t, : rows.shape[0]] = rows
            epoch[i, t], micro[i, t] = e, rows.shape[0]
    active = [sum(len(steps) > t for steps in per_client) for t in range(T)]
    mask = idx >= 0
    return _Schedule(idx.clamp_min(0), mask, epoch, micro, active)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of ``[K, b, C]`` logits, ``[K, b]``."""
    K, b, C = logits.shape
    return F.cross_entropy(logits.reshape(K * b, C), y.reshape(K * b), reduction="none").view(K, b)


class BatchedBackend:
    """Trains a cohort's clients together on one device (``autorank.engine.jobs.ClientBackend``).

    Args:
        base: the frozen base model.
        targets: LoRA target keys of the experiment.
        lora: adapter settings (dropout must be 0: the batched forward draws no dropout masks).
        train: optimiser settings shared by all clients.
        device: where the cohort trains.
        max_clients: clients trained together at most; a larger cohort goes in chunks (memory:
            one step holds ``max_clients * batch_size`` samples' activations).
    """

    name = "batched"

    def __init__(
        self,
        base: nn.Module,
        targets: Sequence[str],
        lora: LoraSettings,
        train: TrainSettings,
        device: torch.device,
        *,
        max_clients: int = 64,
    ) -> None:
        if lora.dropout != 0:
            raise ValueError(f"the batched engine needs lora.dropout 0, got {lora.dropout}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}")
        self.template = LoraTemplate(base, targets, lora.head, device)
        self.objective = objective_of(base)
        self.lora, self.train_settings, self.device = lora, train, device
        self.max_clients = max_clients
        self._seen: int | None = None
        self.stop = StopSignal()

    def _batched(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Every client's logits ``[K, b, C]`` from its own params and inputs ``x [K, b, ...]``.

        On CUDA, attention runs on PyTorch's math kernel: the fused kernels' backward refuses
        the strides that vmap hands them ("LSE is not correctly aligned", seen on an H200).
        """
        if self.device.type != "cuda":
            return cast(torch.Tensor, vmap(self.template.forward)(params, x))
        with sdpa_kernel(SDPBackend.MATH):
            return cast(torch.Tensor, vmap(self.template.forward)(params, x))

    def sync_base(self, base: nn.Module, version: int) -> None:
        """See the base's weights as of ``version`` (FLoRA merges into it between rounds)."""
        if version != self._seen:
            self.template.sync_base(base)
            self._seen = version

    def train_clients(
        self, jobs: Sequence[ClientJob], tests: Sequence[LocalSplit | None] | None = None
    ) -> list[ClientOutcome]:
        """Train every job, ``max_clients`` at a time; outcomes in the jobs' order."""
        tests = list(tests) if tests is not None else [None] * len(jobs)
        out: list[ClientOutcome] = []
        for start in range(0, len(jobs), self.max_clients):
            chunk = slice(start, start + self.max_clients)
            out += self._train_chunk(jobs[chunk], tests[chunk])
        return out

    def _train_chunk(
        self, jobs: Sequence[ClientJob], tests: Sequence[LocalSplit | None]
    ) -> list[ClientOutcome]:
        begin = time.perf_counter()
        b = self.train_settings.batch_size
        for job in jobs:
            if job.x.shape[0] == 0 or job.x.shape[0] != job.y.shape[0] or job.epochs < 1:
                raise ValueError(
                    f"client {job.client}: x and y must hold the same positive number of "
                    f"samples and epochs must be >= 1, got {job.x.shape[0]}, {job.y.shape[0]}, "
                    f"{job.epochs}"
                )
        A = self.train_settings.accumulation
        steps = [job.epochs * job.steps_per_epoch(b, A) for job in jobs]
        order = sorted(range(len(jobs)), key=lambda i: -steps[i])  # stable: ties keep job order
        sorted_jobs = [jobs[i] for i in order]
        stack = _stack(
            self.template, [job_start(self.template, j, self.lora) for j in sorted_jobs], self.lora
        )
        losses = self._fit(sorted_jobs, stack)
        personal = self._evaluate(stack, [tests[i] for i in order])
        seconds = time.perf_counter() - begin
        total_steps = sum(steps)
        outcomes: list[ClientOutcome | None] = [None] * len(jobs)
        for pos, i in enumerate(order):
            job = jobs[i]
            result = LocalResult(
                job.client,
                self._state(stack, pos),
                int(job.x.shape[0]),
                tuple(losses[pos]),
                seconds * steps[i] / total_steps,
                steps[i],
            )
            outcomes[i] = ClientOutcome(result, personal[pos])
        return [o for o in outcomes if o is not None]

    def _fit(self, jobs: Sequence[ClientJob], stack: _Stack) -> list[list[float]]:
        dev = self.device
        sizes = [int(j.x.shape[0]) for j in jobs]
        offsets = [sum(sizes[:i]) for i in range(len(jobs))]
        A = self.train_settings.accumulation
        sched = _schedule(jobs, self.train_settings.batch_size, offsets, A)
        X = torch.cat([j.x for j in jobs]).to(dev)
        Y = torch.cat([j.y for j in jobs]).to(device=dev, dtype=torch.long)
        idx, mask, epoch = sched.idx.to(dev), sched.mask.to(dev), sched.epoch.to(dev)
        micro = sched.micro.to(dev)
        E = max(j.epochs for j in jobs)
        totals = torch.zeros(len(jobs), E, device=dev, dtype=torch.float32)
        weights = torch.zeros(len(jobs), E, device=dev, dtype=torch.float32)
        opt = ClientOptimizer(list(stack.params.values()), self.train_settings, stacked=True)
        params = list(stack.params.values())
        for t, k in enumerate(sched.active):
            ep, at = epoch[:k, t], torch.arange(k, device=dev)
            for p in params:
                p.grad = None
            for j in range(int(sched.micro[:k, t].max())):  # a step's mini-batches
                self.stop.check()
                rows, keep = idx[:k, t, j], mask[:k, t, j]
                logits = self._batched(stack.view(k), X[rows])
                ce, count = self._scored(logits, Y[rows], X[rows], keep)
                loss = ce.sum(dim=1) / count.clamp_min(1)  # [k]: each client's batch mean
                (loss / micro[:k, t].clamp_min(1)).sum().backward()  # / 1 is exact
                totals[at, ep] += loss.detach() * count
                weights[at, ep] += count
            opt.clip(k)
            opt.step(k)
        if self.objective == "classification":  # samples seen: as the sequential engine divides
            b = self.train_settings.batch_size
            seen = [min(n, j.batches_per_epoch(b, A) * b) for n, j in zip(sizes, jobs, strict=True)]
            weights = torch.tensor(seen, device=dev, dtype=torch.float32)[:, None]
        per_epoch = (totals / weights.clamp_min(1.0)).cpu()
        return [per_epoch[i, : j.epochs].tolist() for i, j in enumerate(jobs)]

    @torch.no_grad()
    def _evaluate(
        self, stack: _Stack, tests: Sequence[LocalSplit | None], samples: int = 16384
    ) -> list[EvalResult | None]:
        """Each client's trained model on its own held-out split (None without one)."""
        have = [i for i, t in enumerate(tests) if t is not None and t.x.shape[0] > 0]
        out: list[EvalResult | None] = [None] * len(tests)
        if not have:
            return out
        M = max(cast(LocalSplit, tests[i]).x.shape[0] for i in have)
        group = max(1, samples // M)
        for g in range(0, len(have), group):
            members = have[g : g + group]
            for i, res in zip(members, self._evaluate_group(stack, tests, members), strict=True):
                out[i] = res
        return out

    def _evaluate_group(
        self, stack: _Stack, tests: Sequence[LocalSplit | None], members: Sequence[int]
    ) -> list[EvalResult]:
        dev = self.device
        splits = [cast(LocalSplit, tests[i]) for i in members]
        M = max(s.x.shape[0] for s in splits)
        x = torch.stack(
            [F.pad(s.x, (0, 0) * (s.x.ndim - 1) + (0, M - s.x.shape[0])) for s in splits]
        )
        y = torch.stack([F.pad(s.y.long(), (0, M - s.y.shape[0])) for s in splits]).to(dev)
        keep = torch.stack([torch.arange(M) < s.x.shape[0] for s in splits]).to(dev)
        index = torch.tensor(list(members), device=dev)
        params = {n: t.index_select(0, index) for n, t in stack.view(len(stack.ranks)).items()}
        logits = self._batched(params, x.to(dev)).float()
        n = keep.sum(dim=1)
        if self.objective == "classification":
            ce = torch.where(keep, _cross_entropy(logits, y), 0.0).to(torch.float64).sum(dim=1)
            correct = ((logits.argmax(dim=2) == y) & keep).sum(dim=1)
            return [
                EvalResult(accuracy=int(c) / int(m), loss=float(s) / int(m), n=int(m))
                for c, s, m in zip(correct.cpu(), ce.cpu(), n.cpu(), strict=True)
            ]
        summed, weight, hits = per_sample(self.objective, logits, y, x.to(dev))
        w = torch.where(keep, weight, 0.0).sum(dim=1).clamp_min(1.0)
        ce = torch.where(keep, summed, 0.0).sum(dim=1)
        correct = torch.where(keep, hits, 0.0).sum(dim=1)
        return [
            EvalResult(accuracy=float(c / t), loss=float(s / t), n=int(m))
            for c, s, t, m in zip(correct.cpu(), ce.cpu(), w.cpu(), n.cpu(), strict=True)
        ]

    def _scored(
        self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each kept sample's summed loss ``[k, b]`` and each client's weight ``[k]``: its
        samples (classification) or its scored tokens (causal LM)."""
        if self.objective == "classification":
            return torch.where(keep, _cross_entropy(logits, y), 0.0), keep.sum(dim=1)
        summed, weight, _ = per_sample(self.objective, logits, y, x)
        count = torch.where(keep, weight, 0.0).sum(dim=1).clamp_min(1.0)
        return torch.where(keep, summed, 0.0), count

    def _state(self, stack: _Stack, pos: int) -> AdapterState:
        """Client ``pos``'s trained factors at its own rank and scale, on CPU."""
        ranks = stack.ranks[pos]
        lora = {}
        for path in self.template.paths:
            r = ranks[path]
            A = stack.params[f"{path}.lora_A"][pos, :r]
            B = stack.params[f"{path}.lora_B"][pos, :, :r]
            lora[path] = LoraFactors(_cpu(A), _cpu(B), self.lora.scale(r))
        extra = {n: _cpu(stack.params[n][pos]) for n in self.template.head_names}
        return AdapterState(lora, extra)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True)
