"""One federated round, as pure steps: downloads, jobs, global evaluation, round metrics.

The flow maps client training over a task runner; everything around it is here so that the
arithmetic of a round lives in one place and is testable without Prefect.

Conventions [choice]: the warm-up round only profiles clients (its adapters are discarded);
training starts from one common seeded LoRA init at the maximum ranks, each client downloading
its first ``r_i`` components. Personalised accuracy is the client's locally trained model on its
own held-out split, measured right after local training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from autorank.adapters import AdapterState, AggregationResult, LoraFactors, resize
from autorank.backend import ClientJob, LoraSettings, build_client_model
from autorank.evaluation import EvalResult, evaluate
from autorank.federation import Federation
from autorank.lora import expand_ranks, get_adapter_state, scale_for
from autorank.training import LocalResult, client_seed


@dataclass(frozen=True)
class ClientData:
    """One client's tensors: training ``x [n, ...]``, ``y [n]``, and its local test split."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def client_data(federation: Federation) -> list[ClientData]:
    """Each client's training and local-test tensors, gathered once from the training split."""
    x_np, y_np = federation.data.arrays("train")
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    return [
        ClientData(x[c.train], y[c.train], x[c.local_test], y[c.local_test])
        for c in federation.clients
    ]


def test_data(federation: Federation) -> tuple[torch.Tensor, torch.Tensor]:
    """The global test split as tensors."""
    x, y = federation.data.arrays("test")
    return torch.from_numpy(x), torch.from_numpy(y)


def max_ranks(ranks: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """Per target, the largest rank any client holds."""
    return {key: max(r[key] for r in ranks) for key in ranks[0]}


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
        scale = scale_for(r, policy=lora.policy, alpha=lora.alpha, alpha_ratio=lora.alpha_ratio)
        factors[path] = resize(global_state.lora[path], r, scale)
    return AdapterState(factors, dict(global_state.extra))


def initial_states(
    base: nn.Module, ranks: Sequence[Mapping[str, int]], lora: LoraSettings, *, seed: int
) -> tuple[AdapterState, list[AdapterState]]:
    """The common starting adapter at the maximum ranks and each client's download of it."""
    top = max_ranks(ranks)
    global_state = get_adapter_state(build_client_model(base, top, None, lora, seed))
    clients = [download(global_state, expand_ranks(base, dict(r)), lora) for r in ranks]
    return global_state, clients


def round_jobs(
    data: Sequence[ClientData],
    states: Sequence[AdapterState],
    ranks: Sequence[Mapping[str, int]],
    *,
    epochs: int,
    seed: int,
    round_idx: int,
) -> list[ClientJob]:
    """One training job per client for round ``round_idx`` (1-based)."""
    return [
        ClientJob(i, dict(r), s, d.x, d.y, epochs, client_seed(seed, round_idx, i))
        for i, (d, s, r) in enumerate(zip(data, states, ranks, strict=True))
    ]


def global_eval(
    base: nn.Module,
    global_state: AdapterState,
    *,
    merged: bool,
    lora: LoraSettings,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
) -> EvalResult:
    """Accuracy of the server's model on the test split.

    When the round's update was merged into the base (FLoRA), the global adapter is already
    inside ``base``: only the averaged head is loaded, on a zero (fresh) adapter.
    """
    ranks = global_state.ranks()
    if merged:
        # A zero (fresh) adapter leaves the merged base as it is; only the head is loaded.
        state = AdapterState({}, dict(global_state.extra))
        model = build_client_model(base, dict.fromkeys(ranks, 1), state, lora, seed=0)
    else:
        model = build_client_model(base, ranks, global_state, lora, seed=0)
    return evaluate(model, x, y, device=device)


class DivergenceError(RuntimeError):
    """A round produced a non-finite loss: the run cannot recover from NaN weights."""


def check_finite(
    round_idx: int, results: Sequence[LocalResult], global_loss: float | None = None
) -> None:
    """Stop at the first round whose training or test loss is not finite.

    Raises:
        DivergenceError: naming the round, the client (or the global model) and what to change.
    """
    hint = "lower training.lr, set training.grad_clip, or lower lora.alpha_ratio"
    for res in results:
        bad = [x for x in res.epoch_losses if not np.isfinite(x)]
        if bad:
            raise DivergenceError(
                f"training diverged in round {round_idx}: client {res.client}'s loss is "
                f"{bad[0]}; {hint}"
            )
    if global_loss is not None and not np.isfinite(global_loss):
        raise DivergenceError(
            f"training diverged in round {round_idx}: the global test loss is {global_loss}; {hint}"
        )


@dataclass(frozen=True)
class RoundReport:
    """What one round measured; ``metrics()`` names it for tracking."""

    round_idx: int
    global_eval: EvalResult
    personal: list[EvalResult | None]
    results: list[LocalResult]
    bytes_up: list[int]
    bytes_down: list[int]
    seconds: float

    def metrics(self) -> dict[str, float]:
        """Round metrics (MLflow keys); per-client keys are ``clients/cNN/<name>``."""
        personal = [e.accuracy for e in self.personal if e is not None]
        out = {
            "global/accuracy": self.global_eval.accuracy,
            "global/loss": self.global_eval.loss,
            "clients/mean_accuracy": float(np.mean(personal)) if personal else float("nan"),
            "comm/bytes_up": float(sum(self.bytes_up)),
            "comm/bytes_down": float(sum(self.bytes_down)),
            "time/round_s": self.seconds,
            "time/client_train_s": float(sum(r.seconds for r in self.results)),
        }
        for res, ev in zip(self.results, self.personal, strict=True):
            key = f"clients/c{res.client:02d}"
            out[f"{key}/train_loss"] = res.epoch_losses[-1]
            out[f"{key}/trainable_params"] = float(res.state.num_parameters())
            if ev is not None:
                out[f"{key}/accuracy"] = ev.accuracy
        return out


def communication(
    results: Sequence[LocalResult], agg: AggregationResult
) -> tuple[list[int], list[int]]:
    """Bytes each client sent up and received down this round.

    Under FLoRA the clients receive the stacked global factors (to merge themselves), not a
    slice of them.
    """
    up = [r.state.num_bytes() for r in results]
    if agg.base_delta:
        down = [agg.global_state.num_bytes()] * len(results)
    else:
        down = [s.num_bytes() for s in agg.client_states]
    return up, down
