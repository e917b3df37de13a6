"""Growing the global adapter after a re-ranking (``ranking.rerank_every``).

Clients download the first ``r`` components of the global adapter, so a client that now holds a
rank above the global adapter's would find zero components there, which never learn (``A = 0``
and ``B = 0`` give both factors zero gradients). ``fit_global`` therefore grows the global adapter
with fresh down-projections and zero up-projections, which leaves its product unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autorank.lora.adapters import (
    AdapterState,
    LoraFactors,
    resize,
)
from autorank.lora.settings import LoraSettings
from autorank.lora.targets import (
    expand_ranks,
    fresh_down_projections,
)
from autorank.ranking.assignment import max_ranks

# Offsets the seed of the components a re-ranking adds, away from the initial adapter's draw.
_GROWTH_SEED = 7_919


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
