"""Dynamic rank assignment: deciding the ranks again during training (``ranking.rerank_every``).

AutoRank's abstract speaks of *dynamic* rank assignment; its learning-difficulty criterion is the
normalised entropy of a client's loss curve, which changes as the model learns. With
``rerank_every = T`` the ranks are decided again after rounds ``T, 2T, ...`` (never after the
last): each client trained in that round gets its learning difficulty from that round's loss
curve over its local epochs; a client not sampled keeps the value of the decision in force. The
other criteria (label entropy, Gini-Simpson, size) depend only on the partition and do not move.

The new ranks take effect from the next round. Clients download the first ``r`` components of
the global adapter, so a client that now holds a rank above the global adapter's would find zero
components there, which never learn (``A = 0`` and ``B = 0`` give both factors zero gradients).
``fit_global`` therefore grows the global adapter with fresh down-projections and zero
up-projections, which leaves its product unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autorank.lora.adapters import AdapterState, LoraFactors, resize
from autorank.lora.settings import LoraSettings
from autorank.lora.targets import expand_ranks, fresh_down_projections
from autorank.profiling import ClientProfile, learning_difficulty
from autorank.ranks import RankAssignment
from autorank.rounds import max_ranks

# Offsets the seed of the components a re-ranking adds, away from the initial adapter's draw.
_GROWTH_SEED = 7_919


def rerank_due(round_idx: int, every: int, rounds: int) -> bool:
    """Whether the ranks are decided again after ``round_idx`` (rounds ``T, 2T, ...`` before the
    last one; never with ``every = 0``)."""
    return every > 0 and round_idx % every == 0 and round_idx < rounds


def remeasured_profiles(
    profiles: Sequence[ClientProfile],
    in_force: RankAssignment,
    losses: Mapping[int, Sequence[float]],
) -> list[ClientProfile]:
    """The clients' profiles with learning difficulty measured again where a new curve exists.

    Args:
        profiles: every client's profile from the partition (``learning_difficulty`` unused).
        in_force: the decision the round was trained under; a client without a new curve keeps
            its ``criteria["learning_difficulty"]`` from there.
        losses: client -> its per-epoch mean losses of the round just trained (``E >= 2``).

    Raises:
        ValueError: a client has neither a new curve nor a learning difficulty in ``in_force``.
    """
    before = {d.client: d.criteria.get("learning_difficulty") for d in in_force.decisions}
    out = []
    for p in profiles:
        if p.client in losses:
            value: float | None = learning_difficulty(losses[p.client])
        else:
            value = before.get(p.client)
        if value is None:
            raise ValueError(
                f"client {p.client}: no loss curve this round and no learning difficulty in the "
                "decision in force"
            )
        out.append(dataclasses.replace(p, learning_difficulty=float(value)))
    return out


def fit_global(
    global_state: AdapterState,
    base: nn.Module,
    ranks: Sequence[Mapping[str, int]],
    lora: LoraSettings,
    *,
    seed: int,
) -> AdapterState:
    """The global adapter grown so that every layer holds the largest rank any client now has.

    A layer at rank ``r`` that must reach ``r' > r`` keeps its product: ``B`` gains ``r' - r``
    zero columns, ``A`` gains ``r' - r`` fresh rows (Kaiming-uniform like the initial adapter,
    drawn from ``seed``), and the scale becomes the alpha policy's at ``r'`` with ``B`` rescaled
    by ``scale(r) / scale(r')`` (``adapters.resize``). Layers already large enough, and a global
    adapter without LoRA factors (FLoRA merged them into the base), are returned as they are;
    when nothing grows the same object is returned.

    Args:
        global_state: the server's adapter, per module path.
        base: the base model (resolves each target to its module paths).
        ranks: per client, target -> rank (the decision in force).
        lora: the alpha policy.
        seed: seeds the new down-projections (the caller passes one per re-ranking).
    """
    needed = expand_ranks(base, max_ranks(ranks))
    grow = {
        path: r
        for path, r in needed.items()
        if path in global_state.lora and r > global_state.lora[path].rank
    }
    if not grow:
        return global_state
    dims = {
        path: (global_state.lora[path].B.shape[0], global_state.lora[path].A.shape[1])
        for path in grow
    }
    extra = {path: r - global_state.lora[path].rank for path, r in grow.items()}
    fresh = fresh_down_projections(dims, extra, seed + _GROWTH_SEED)
    lora_out: dict[str, LoraFactors] = dict(global_state.lora)
    for path, r in grow.items():
        old = global_state.lora[path]
        grown = resize(old, r, lora.scale(r))
        A = torch.cat([grown.A[: old.rank], fresh[path].to(grown.A.dtype)], 0)
        lora_out[path] = LoraFactors(A, grown.B, grown.scale)
    return AdapterState(lora_out, global_state.extra)
