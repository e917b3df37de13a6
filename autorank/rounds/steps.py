"""One federated round, as pure steps: downloads, jobs, global evaluation, round metrics.

The flow maps client training over a task runner; everything around it is here so that the
arithmetic of a round lives in one place and is testable without Prefect.

Conventions [choice]: the warm-up round only profiles clients (its adapters are discarded);
training starts from one common seeded LoRA init at the maximum ranks, each client downloading
its first ``r_i`` components. A client keeps no state of its own between rounds: when sampled it
downloads the current global adapter cut to its ranks (or starts fresh adapters on the merged
base under FLoRA), so a run's state is the base and the global adapter alone. Components of the
global adapter that no client of a round covers keep their previous values. Personalised accuracy
is the client's locally trained model on its own held-out split, measured right after local
training.
"""

from __future__ import annotations

import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torch import nn

from autorank.config import AggregatorName
from autorank.data.federation import Federation
from autorank.data.synthetic import SyntheticPopulation
from autorank.engine.jobs import ClientJob, ClientOutcome, LocalSplit
from autorank.engine.local import LocalResult, client_seed
from autorank.lora.adapters import (
    AdapterState,
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    resize,
)
from autorank.lora.functional import LoraTemplate, evaluate_state
from autorank.lora.settings import LoraSettings
from autorank.lora.targets import (
    expand_ranks,
    fresh_down_projections,
    head_parameter_names,
    merge_base_delta,
    target_dims,
)
from autorank.merge.aggregators import aggregate
from autorank.models.evaluation import EvalResult
from autorank.ranking.assignment import max_ranks

# Deciding the ranks (profiles, the warm-up, CRITIC and TOPSIS), logged once at step 0 beside
# each round's ``time/*`` (RoundReport); ``compare --dry-run`` reads it back.
RANKING_TIME = "time/ranking_s"


@dataclass(frozen=True)
class ClientData:
    """One client's tensors: training ``x [n, ...]``, ``y [n]``, and its local test split."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def local_split(self) -> LocalSplit | None:
        """The held-out split for personalised accuracy, None when the client has none."""
        return LocalSplit(self.x_test, self.y_test) if self.x_test.shape[0] > 0 else None


class ClientsOnDemand(Sequence[ClientData]):
    """Every client's ``ClientData``, made when indexed; the last ``keep`` made are kept (a
    round asks for its clients more than once: jobs, local tests), so that memory follows the
    clients in use, not the population."""

    def __init__(self, n_clients: int, keep: int = 4096) -> None:
        self.n_clients, self.keep = n_clients, keep
        self._kept: OrderedDict[int, ClientData] = OrderedDict()
        self._lock = threading.Lock()

    def _make(self, k: int) -> ClientData:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n_clients

    @overload
    def __getitem__(self, k: int) -> ClientData: ...

    @overload
    def __getitem__(self, k: slice) -> Sequence[ClientData]: ...

    def __getitem__(self, k: int | slice) -> ClientData | Sequence[ClientData]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = operator.index(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < self.n_clients:
            raise IndexError(f"client {k} is not one of the {self.n_clients} clients")
        with self._lock:
            if k in self._kept:
                self._kept.move_to_end(k)
                return self._kept[k]
        data = self._make(k)
        with self._lock:
            self._kept[k] = data
            while len(self._kept) > self.keep:
                self._kept.popitem(last=False)
        return data


class GeneratedClients(ClientsOnDemand):
    """A generated population's clients, each drawn when indexed."""

    def __init__(self, population: SyntheticPopulation, keep: int = 4096) -> None:
        super().__init__(population.n_clients, keep)
        self.population = population

    def _make(self, k: int) -> ClientData:
        x, y, x_test, y_test = (torch.from_numpy(a) for a in self.population.client(k))
        return ClientData(x, y, x_test, y_test)


class IndexedClients(ClientsOnDemand):
    """A partitioned data set's clients: the training split once, each client's rows gathered
    from its index arrays when indexed (no copy per client of the whole population)."""

    def __init__(self, federation: Federation, keep: int = 4096) -> None:
        super().__init__(federation.n_clients, keep)
        x_np, y_np = federation.data.arrays("train")
        self.x, self.y = torch.from_numpy(x_np), torch.from_numpy(y_np)
        self.splits = federation.clients

    def _make(self, k: int) -> ClientData:
        c, x, y = self.splits[k], self.x, self.y
        return ClientData(x[c.train], y[c.train], x[c.local_test], y[c.local_test])


def client_data(federation: Federation) -> Sequence[ClientData]:
    """Each client's training and local-test tensors, made when asked for: gathered from the
    training split by the client's indices, or for a generated population drawn."""
    if federation.population is not None:
        return GeneratedClients(federation.population)
    return IndexedClients(federation)


def test_data(federation: Federation) -> tuple[torch.Tensor, torch.Tensor]:
    """The global test split as tensors."""
    x, y = federation.data.arrays("test")
    return torch.from_numpy(x), torch.from_numpy(y)


def download(
    global_state: AdapterState, paths: Mapping[str, int], lora: LoraSettings
) -> AdapterState:
    """The first ``r`` components of each global layer, at the client's own scale.

    Args:
        global_state: the server's adapter (per layer at the largest rank).
        paths: module path -> the client's rank (``expand_ranks`` of its target ranks).
        lora: the alpha policy, to compute each rank's scale.
    """
    factors: dict[str, LoraFactors] = {}
    for path, r in paths.items():
        scale = lora.scale(r)
        factors[path] = resize(global_state.lora[path], r, scale)
    return AdapterState(factors, dict(global_state.extra))


def initial_state(
    base: nn.Module, ranks: Sequence[Mapping[str, int]], lora: LoraSettings, *, seed: int
) -> AdapterState:
    """The common starting adapter at the maximum ranks: fresh ``A`` from ``seed``, ``B = 0``.

    Each client starts from its ``download``; the head is the base's own.
    """
    paths = expand_ranks(base, max_ranks(ranks))
    dims = target_dims(base, list(paths))
    factors = {
        path: LoraFactors(A, A.new_zeros(dims[path][0], paths[path]), lora.scale(paths[path]))
        for path, A in fresh_down_projections(dims, paths, seed).items()
    }
    own = dict(base.named_parameters())
    head = {
        n: own[n].detach().to("cpu", torch.float32, copy=True)
        for n in head_parameter_names(base, lora.head)
    }
    return AdapterState(factors, head)


def start_state(
    global_state: AdapterState, paths: Mapping[str, int], lora: LoraSettings, *, fresh: bool
) -> AdapterState:
    """What a sampled client starts its round from: its ``download``, or, when the last update
    was merged into the base (FLoRA), fresh adapters and the global head."""
    if fresh:
        return AdapterState({}, dict(global_state.extra))
    return download(global_state, paths, lora)


def round_jobs(
    data: Sequence[ClientData],
    clients: Sequence[int],
    global_state: AdapterState,
    ranks: Sequence[Mapping[str, int]],
    paths: Sequence[Mapping[str, int]],
    lora: LoraSettings,
    *,
    fresh: bool,
    epochs: int,
    seed: int,
    round_idx: int,
    max_steps: int | None = None,
) -> list[ClientJob]:
    """One training job for each of ``clients`` in round ``round_idx`` (1-based).

    Args:
        data, ranks, paths: every client's tensors, target ranks and module-path ranks
            (``expand_ranks``), indexed by client.
        clients: the clients training this round; each starts from ``start_state``.
        fresh: the last update was merged into the base (FLoRA).
        max_steps: at most this many steps per local epoch (None: every batch).
    """
    return [
        ClientJob(
            c,
            dict(ranks[c]),
            start_state(global_state, paths[c], lora, fresh=fresh),
            data[c].x,
            data[c].y,
            epochs,
            client_seed(seed, round_idx, c),
            max_steps,
        )
        for c in clients
    ]


def keep_uncovered(previous: AdapterState, merged: AdapterState) -> AdapterState:
    """The merged global adapter, with the components no sampled client covered kept as before.

    When the round's sampled clients all hold ranks below the global rank of a layer, the merge
    yields fewer components; components ``k >= r_merged`` of ``previous`` carry over unchanged
    (in product space: ``scale * B[:, k] A[k]`` is kept) so that a high-rank client not sampled
    this round still finds its components next time.
    """
    lora: dict[str, LoraFactors] = {}
    for path, new in merged.lora.items():
        old = previous.lora.get(path)
        if old is None or old.rank <= new.rank:
            lora[path] = new
            continue
        grown = resize(new, old.rank, old.scale)
        A, B = grown.A.clone(), grown.B.clone()
        A[new.rank :] = old.A[new.rank :]
        B[:, new.rank :] = old.B[:, new.rank :]
        lora[path] = LoraFactors(A, B, old.scale)
    return AdapterState(lora, merged.extra)


def residual_after_keeping(agg: AggregationResult, kept: AdapterState) -> dict[str, torch.Tensor]:
    """``agg.base_delta`` less the product of the components ``keep_uncovered`` carried over, so
    that base plus ``kept`` is base plus ``agg.global_state`` plus the residual."""
    out: dict[str, torch.Tensor] = {}
    for path, delta in agg.base_delta.items():
        merged, final = agg.global_state.lora[path], kept.lora[path]
        if final.rank == merged.rank:
            out[path] = delta
            continue
        extra = final.delta().double() - merged.delta().double()
        out[path] = (delta.double() - extra).to(delta.dtype)
    return out


def client_parameters(global_state: AdapterState, paths: Sequence[Mapping[str, int]]) -> list[int]:
    """Trainable parameters of each client (LoRA at its ranks plus the head)."""
    head = sum(t.numel() for t in global_state.extra.values())
    out = []
    for own in paths:
        lora = 0
        for path, r in own.items():
            f = global_state.lora[path]
            lora += r * (f.A.shape[1] + f.B.shape[0])
        out.append(lora + head)
    return out


class DivergenceError(RuntimeError):
    """A round produced a non-finite loss: the run cannot recover from NaN weights."""


def check_finite(
    round_idx: int, results: Sequence[LocalResult], global_loss: float | None = None
) -> None:
    """Stop at the first round (0: the warm-up) whose training or test loss is not finite.

    Raises:
        DivergenceError: naming the round, the client (or the global model) and what to change.
    """
    hint = "lower training.lr, set training.grad_clip, or lower lora.alpha_ratio"
    where = f"round {round_idx}" if round_idx > 0 else "the warm-up"
    for res in results:
        bad = [x for x in res.epoch_losses if not np.isfinite(x)]
        if bad:
            raise DivergenceError(
                f"training diverged in {where}: client {res.client}'s loss is {bad[0]}; {hint}"
            )
    if global_loss is not None and not np.isfinite(global_loss):
        raise DivergenceError(
            f"training diverged in {where}: the global test loss is {global_loss}; {hint}"
        )


def _spread(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """``mean``, ``min``, ``p10``, ``median``, ``p90``, ``max`` of a per-client quantity."""
    if not values:
        return {}
    v = np.asarray(values, dtype=np.float64)
    return {
        f"{prefix}_mean": float(v.mean()),
        f"{prefix}_min": float(v.min()),
        f"{prefix}_p10": float(np.percentile(v, 10)),
        f"{prefix}_median": float(np.median(v)),
        f"{prefix}_p90": float(np.percentile(v, 90)),
        f"{prefix}_max": float(v.max()),
    }


@dataclass(frozen=True)
class RoundReport:
    """What one round measured; ``metrics()`` names it for tracking.

    Attributes:
        outcomes: the round's sampled clients, ascending by client.
        n_clients: clients in the federation (sampled or not).
        timings: seconds of the round's phases (``train``, ``aggregate``, ``evaluate``).
    """

    round_idx: int
    global_eval: EvalResult
    outcomes: list[ClientOutcome]
    n_clients: int
    bytes_up: list[int]
    bytes_down: list[int]
    seconds: float
    timings: Mapping[str, float]

    def metrics(self, *, keyed_clients: bool) -> dict[str, float]:
        """Round metrics (MLflow keys): global, the clients' spread, communication, time.

        With ``keyed_clients`` each sampled client also gets ``per_client/cNN/<name>`` keys; without
        it the number of metric keys does not grow with the number of clients (per-client values
        go to ``client_table`` instead).
        """
        personal = [o.personal.accuracy for o in self.outcomes if o.personal is not None]
        losses = [o.result.epoch_losses[-1] for o in self.outcomes]
        params = [float(o.result.state.num_parameters()) for o in self.outcomes]
        out = {
            "global/accuracy": self.global_eval.accuracy,
            "global/loss": self.global_eval.loss,
            "per_client/accuracy_mean": float("nan"),  # no client held a local split
            **_spread("per_client/accuracy", personal),
            **_spread("per_client/train_loss", losses),
            "per_client/sampled": float(len(self.outcomes)),
            "per_client/trainable_params": float(sum(params)),
            "traffic/bytes_up": float(sum(self.bytes_up)),
            "traffic/bytes_down": float(sum(self.bytes_down)),
            "time/round_s": self.seconds,
            "time/client_train_s": float(sum(o.result.seconds for o in self.outcomes)),
            **{f"time/{k}_s": float(v) for k, v in self.timings.items()},
        }
        if self.global_eval.per_token:
            out["global/perplexity"] = self.global_eval.perplexity
        if keyed_clients:
            for o in self.outcomes:
                key = f"per_client/c{o.result.client:02d}"
                out[f"{key}/train_loss"] = o.result.epoch_losses[-1]
                out[f"{key}/trainable_params"] = float(o.result.state.num_parameters())
                if o.personal is not None:
                    out[f"{key}/accuracy"] = o.personal.accuracy
        return out

    def client_table(self) -> dict[str, list[float | int | None]]:
        """One row per sampled client: id, samples, ranks per layer, loss, accuracy, bytes."""
        rows = self.outcomes
        table: dict[str, list[float | int | None]] = {
            "client": [o.result.client for o in rows],
            "n_samples": [o.result.n_samples for o in rows],
        }
        for layer in rows[0].result.state.lora if rows else ():
            table[f"rank/{layer}"] = [o.result.state.lora[layer].rank for o in rows]
        table["train_loss"] = [o.result.epoch_losses[-1] for o in rows]
        table["accuracy"] = [o.personal.accuracy if o.personal else None for o in rows]
        table["trainable_params"] = [o.result.state.num_parameters() for o in rows]
        table["bytes_up"] = list(self.bytes_up)
        table["bytes_down"] = list(self.bytes_down)
        table["steps"] = [o.result.steps for o in rows]
        return table


def communication(
    results: Sequence[LocalResult], agg: AggregationResult
) -> tuple[list[int], list[int]]:
    """Bytes each client sent up and received down this round.

    Under FLoRA the clients receive the stacked global factors (to merge themselves), not a
    slice of them. Under FedEx-LoRA each also receives the dense residual of every adapted layer
    (``[d_out, d_in]``), which it adds to its copy of the base.
    """
    up = [r.state.num_bytes() for r in results]
    if agg.fresh:
        return up, [agg.global_state.num_bytes()] * len(results)
    # A client's download has the shapes of its upload: its ranks and the head.
    down = [s.num_bytes() for s in agg.client_states]
    dense = sum(t.numel() * t.element_size() for t in agg.base_delta.values())
    return up, [d + dense for d in down]


@dataclass(frozen=True)
class ServerStep:
    """The server's half of a round: the merge, the new global adapter, its test metrics.

    Attributes:
        aggregation: the aggregator's result over the sampled clients.
        global_state: the global adapter for the next round (uncovered components kept).
        evaluation: the global model on the test split.
        timings: seconds spent aggregating and evaluating.
    """

    aggregation: AggregationResult
    global_state: AdapterState
    evaluation: EvalResult
    timings: Mapping[str, float]

    def report(
        self,
        round_idx: int,
        outcomes: Sequence[ClientOutcome],
        *,
        n_clients: int,
        seconds: float,
        train_seconds: float,
    ) -> RoundReport:
        """The round's report once the clients' outcomes and the wall times are known."""
        up, down = communication([o.result for o in outcomes], self.aggregation)
        return RoundReport(
            round_idx,
            self.evaluation,
            list(outcomes),
            n_clients,
            up,
            down,
            seconds,
            {"train": train_seconds, **self.timings},
        )


def server_step(
    method: AggregatorName,
    outcomes: Sequence[ClientOutcome],
    *,
    previous: AdapterState,
    base: nn.Module,
    template: LoraTemplate,
    x: torch.Tensor,
    y: torch.Tensor,
    round_idx: int,
) -> ServerStep:
    """Aggregate the round's updates, merge into the base if the method does, evaluate.

    Raises:
        DivergenceError: a client's loss or the global test loss is not finite.
    """
    results = [o.result for o in outcomes]
    check_finite(round_idx, results)  # before NaN reaches the aggregator (SVD would fail)
    start = time.perf_counter()
    agg = aggregate(method, [ClientUpdate(r.state, r.n_samples) for r in results])
    if agg.fresh:
        merge_base_delta(base, agg.base_delta)
        template.sync_base(base)
        global_state = agg.global_state
        evaluated = AdapterState({}, dict(agg.global_state.extra))  # already inside the base
    else:
        global_state = keep_uncovered(previous, agg.global_state)
        if agg.base_delta:  # FedEx-LoRA's residual, less what the kept components add
            merge_base_delta(base, residual_after_keeping(agg, global_state))
            template.sync_base(base)
        evaluated = global_state
    aggregated = time.perf_counter()
    ev = evaluate_state(template, evaluated, x, y)
    check_finite(round_idx, results, ev.loss)  # an aggregate of finite factors can still blow up
    timings = {"aggregate": aggregated - start, "evaluate": time.perf_counter() - aggregated}
    return ServerStep(agg, global_state, ev, timings)
