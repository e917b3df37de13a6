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

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from autorank.adapters import AdapterState, LoraFactors
from autorank.backend import (
    ClientJob,
    ClientOutcome,
    LocalSplit,
    LoraSettings,
    substreams,
)
from autorank.models.evaluation import EvalResult
from autorank.optim import ClientOptimizer
from autorank.targets import (
    expand_ranks,
    fresh_down_projections,
    head_parameter_names,
    layer_dims,
    matches,
)
from autorank.training import LocalResult, StopSignal, TrainSettings

Params = dict[str, torch.Tensor]


class _LoraSlot(nn.Module):
    """A base layer plus LoRA placeholders that ``functional_call`` fills per client.

    ``lora_A: [r, d_in]``, ``lora_B: [d_out, r]`` and ``scale`` are buffers (never trained
    here): each call brings one client's tensors.
    """

    lora_A: torch.Tensor  # noqa: N815  (peft's names)
    lora_B: torch.Tensor  # noqa: N815
    scale: torch.Tensor

    def __init__(self, base: nn.Module, path: str) -> None:
        super().__init__()
        self.base = base
        d_out, d_in = layer_dims(base, path)
        w = cast(torch.Tensor, base.weight)
        self.register_buffer("lora_A", w.new_zeros(1, d_in), persistent=False)
        self.register_buffer("lora_B", w.new_zeros(d_out, 1), persistent=False)
        self.register_buffer("scale", w.new_zeros(()), persistent=False)


class _LoraLinear(_LoraSlot):
    """``base(x) + scale * (x A^T) B^T``, peft's order of operations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return cast(torch.Tensor, self.base(x)) + lora * self.scale


class _LoraConv2d(_LoraSlot):
    """A conv's LoRA as peft builds it: ``A`` a conv of the base's kernel, ``B`` a 1x1 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = cast(nn.Conv2d, self.base)
        A = self.lora_A.reshape(self.lora_A.shape[0], c.in_channels, *c.kernel_size)
        B = self.lora_B.reshape(c.out_channels, -1, 1, 1)
        h = F.conv2d(x, A, None, c.stride, c.padding)
        return c(x) + F.conv2d(h, B) * self.scale


def _wrap(module: nn.Module, path: str) -> nn.Module:
    if isinstance(module, nn.Linear):
        return _LoraLinear(module, path)
    if isinstance(module, nn.Conv2d):
        return _LoraConv2d(module, path)
    raise TypeError(f"cannot batch LoRA on a {type(module).__name__}")


class LoraTemplate:
    """A frozen copy of the base whose LoRA targets take their factors per call.

    Args:
        base: the frozen base model.
        targets: target keys (``fc1``, ``q_proj``), expanded to module paths as peft does.
        head: modules trained in full next to LoRA (their parameters are per-client too).
        device: where the template lives.
    """

    def __init__(
        self, base: nn.Module, targets: Sequence[str], head: Sequence[str], device: torch.device
    ) -> None:
        self.paths = sorted(expand_ranks(base, dict.fromkeys(targets, 1)))
        self.dims = {p: layer_dims(base.get_submodule(p), p) for p in self.paths}
        self.head_names = head_parameter_names(base, head)
        shared = device.type == "cpu" and all(t.device.type == "cpu" for t in base.parameters())
        # On CPU the template shares the base's tensors: no copy, and FLoRA's in-place merge
        # into the base is seen at once. Elsewhere it holds its own copy (``sync_base``).
        memo = {id(t): t for t in [*base.parameters(), *base.buffers()]} if shared else {}
        model = copy.deepcopy(base, memo)
        for path in self.paths:
            parent, _, leaf = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, _wrap(owner.get_submodule(leaf), path))
        model.requires_grad_(False)
        self.model = model.to(device).eval()
        self.device = device
        own = dict(self.model.state_dict(keep_vars=True))
        self._base_tensors = {name: own[self._template_name(name)] for name in base.state_dict()}
        self.head_init = {n: own[n].detach() for n in self.head_names}
        self._expanded: dict[tuple[tuple[str, int], ...], dict[str, int]] = {}

    def _template_name(self, name: str) -> str:
        module, _, leaf = name.rpartition(".")
        return f"{module}.base.{leaf}" if module in self.paths else name

    def sync_base(self, base: nn.Module) -> None:
        """Copy the base's weights in (after FLoRA merged into it); shared tensors are skipped."""
        with torch.no_grad():
            for name, t in base.state_dict().items():
                own = self._base_tensors[name]
                if own.data_ptr() != t.data_ptr():
                    own.copy_(t)

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One client's logits: ``params`` holds ``<path>.lora_A/lora_B/scale`` and the head."""
        return cast(torch.Tensor, functional_call(self.model, params, (x,)))

    def expand(self, ranks: Mapping[str, int]) -> dict[str, int]:
        """A job's target ranks as module path -> rank (``expand_ranks``), cached per pattern."""
        key = tuple(sorted(ranks.items()))
        if key not in self._expanded:
            out: dict[str, int] = {}
            for path in self.paths:
                hit = [k for k in ranks if matches(path, k)]
                if not hit:
                    raise ValueError(f"job ranks {dict(ranks)} do not cover LoRA target '{path}'")
                out[path] = int(ranks[hit[0]])
            self._expanded[key] = out
        return self._expanded[key]

    def start(self, job: ClientJob, lora: LoraSettings) -> tuple[dict[str, int], Params]:
        """The job's starting factors (``B`` at the job's scale) and head, unpadded, on CPU."""
        ranks = self.expand(job.ranks)
        state = job.state
        params: Params = {}
        if state is None or not state.lora:
            init_seed, _ = substreams(job.seed)
            for path, A in fresh_down_projections(self.dims, ranks, init_seed).items():
                params[f"{path}.lora_A"] = A
                params[f"{path}.lora_B"] = A.new_zeros(self.dims[path][0], ranks[path])
        else:
            _check_state(state, ranks)
            for path, f in state.lora.items():
                # Keep the product scale * B @ A if the state was made at another scale.
                ratio = f.scale / lora.scale(ranks[path])
                params[f"{path}.lora_A"] = f.A
                params[f"{path}.lora_B"] = f.B * ratio
        extra = state.extra if state is not None and state.extra else self.head_init
        if sorted(extra) != sorted(self.head_names):
            raise ValueError(
                f"adapter state does not fit the model: head tensors {sorted(extra)}, "
                f"expected {sorted(self.head_names)}"
            )
        params |= {n: extra[n] for n in self.head_names}
        return ranks, params


def _check_state(state: AdapterState, ranks: Mapping[str, int]) -> None:
    if sorted(state.lora) != sorted(ranks):
        raise ValueError(
            f"adapter state does not fit the model: LoRA layers {sorted(state.lora)}, "
            f"expected {sorted(ranks)}"
        )
    for path, f in state.lora.items():
        if f.rank != ranks[path]:
            raise ValueError(
                f"adapter state of '{path}' has rank {f.rank}, the client has {ranks[path]}"
            )


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
    """Every client's mini-batches: ``idx [K, T, b]`` into the cohort's samples, ``mask``."""

    idx: torch.Tensor
    mask: torch.Tensor
    epoch: torch.Tensor  # [K, T]: the epoch of each step
    active: list[int]  # clients still training at step t (a prefix of the stack)


def _schedule(jobs: Sequence[ClientJob], batch_size: int, offsets: Sequence[int]) -> _Schedule:
    """The sequential engine's data order, one ``torch.Generator`` per client."""
    b = batch_size
    per_client = []
    for job, offset in zip(jobs, offsets, strict=True):
        n = int(job.x.shape[0])
        nb = math.ceil(n / b)
        gen = torch.Generator().manual_seed(substreams(job.seed)[1])
        rows = []
        for _ in range(job.epochs):
            order = torch.randperm(n, generator=gen) + offset
            rows.append(F.pad(order, (0, nb * b - n), value=-1).reshape(nb, b))
        per_client.append((torch.cat(rows), nb))
    T = max(r.shape[0] for r, _ in per_client)
    idx = torch.full((len(jobs), T, b), -1, dtype=torch.long)
    epoch = torch.zeros(len(jobs), T, dtype=torch.long)
    for i, (batches, nb) in enumerate(per_client):
        idx[i, : batches.shape[0]] = batches
        epoch[i, : batches.shape[0]] = torch.arange(batches.shape[0]) // nb
    steps = [r.shape[0] for r, _ in per_client]
    active = [sum(s > t for s in steps) for t in range(T)]
    mask = idx >= 0
    return _Schedule(idx.clamp_min(0), mask, epoch, active)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of ``[K, b, C]`` logits, ``[K, b]``."""
    K, b, C = logits.shape
    return F.cross_entropy(logits.reshape(K * b, C), y.reshape(K * b), reduction="none").view(K, b)


class BatchedBackend:
    """Trains a cohort's clients together on one device (``autorank.backend.ClientBackend``).

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
        steps = [job.epochs * math.ceil(job.x.shape[0] / b) for job in jobs]
        order = sorted(range(len(jobs)), key=lambda i: -steps[i])  # stable: ties keep job order
        sorted_jobs = [jobs[i] for i in order]
        stack = _stack(
            self.template, [self.template.start(j, self.lora) for j in sorted_jobs], self.lora
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
        sched = _schedule(jobs, self.train_settings.batch_size, offsets)
        X = torch.cat([j.x for j in jobs]).to(dev)
        Y = torch.cat([j.y for j in jobs]).to(device=dev, dtype=torch.long)
        idx, mask, epoch = sched.idx.to(dev), sched.mask.to(dev), sched.epoch.to(dev)
        E = max(j.epochs for j in jobs)
        totals = torch.zeros(len(jobs), E, device=dev, dtype=torch.float32)
        opt = ClientOptimizer(list(stack.params.values()), self.train_settings, stacked=True)
        params = list(stack.params.values())
        for t, k in enumerate(sched.active):
            self.stop.check()
            rows, keep = idx[:k, t], mask[:k, t]
            logits = self._batched(stack.view(k), X[rows])
            ce = torch.where(keep, _cross_entropy(logits, Y[rows]), 0.0)
            count = keep.sum(dim=1)
            loss = ce.sum(dim=1) / count  # [k]: each client's mean over its own batch
            for p in params:
                p.grad = None
            loss.sum().backward()
            opt.clip(k)
            opt.step(k)
            ep = epoch[:k, t]
            totals[torch.arange(k, device=dev), ep] += loss.detach() * count
        n = torch.tensor(sizes, device=dev, dtype=torch.float32)
        per_epoch = (totals / n[:, None]).cpu()
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
        ce = torch.where(keep, _cross_entropy(logits, y), 0.0).to(torch.float64).sum(dim=1)
        correct = ((logits.argmax(dim=2) == y) & keep).sum(dim=1)
        n = keep.sum(dim=1)
        return [
            EvalResult(accuracy=int(c) / int(m), loss=float(s) / int(m), n=int(m))
            for c, s, m in zip(correct.cpu(), ce.cpu(), n.cpu(), strict=True)
        ]

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


def bind_state(template: LoraTemplate, state: AdapterState) -> nn.Module:
    """``base + state`` as a plain ``x -> logits`` module over the template's frozen base.

    A state with no LoRA factors (FLoRA after merging them into the base) gives the base with
    the state's head; a state with no head keeps the base's.
    """
    params: Params = {}
    dev = template.device
    for path in template.paths:
        f = state.lora.get(path)
        d_out, d_in = template.dims[path]
        if f is None:
            f = LoraFactors(torch.zeros(1, d_in), torch.zeros(d_out, 1), 0.0)
        params[f"{path}.lora_A"] = f.A.to(dev)
        params[f"{path}.lora_B"] = f.B.to(dev)
        params[f"{path}.scale"] = torch.tensor(f.scale, device=dev)
    extra = state.extra or template.head_init
    params |= {n: extra[n].to(dev) for n in template.head_names}
    return _Bound(template, params)


def evaluate_state(
    template: LoraTemplate,
    state: AdapterState,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1024,
) -> EvalResult:
    """Accuracy and mean cross-entropy of ``base + state`` (``bind_state``) on ``x``, ``y``."""
    from autorank.models.evaluation import evaluate

    model = bind_state(template, state)
    return evaluate(model, x, y, batch_size=batch_size, device=template.device)


class _Bound(nn.Module):
    """The template with one state bound to it, as a plain ``x -> logits`` module."""

    def __init__(self, template: LoraTemplate, params: Params) -> None:
        super().__init__()
        self.template = template
        self.bound = params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.template.forward(self.bound, x)
