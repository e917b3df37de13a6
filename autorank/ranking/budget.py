"""Rank caps and the parameter budget: the step after every assigner (``ranking.assigners``).

Caps. A client whose device holds at most rank ``c_k`` (``ranking.rank_caps``, else the tier
drawn for it from ``ranking.cap_tiers``) gets ``min(r, c_k)`` in every layer and on the global
scale. A cap below a layer's ``r_min`` is refused (``check_limits``), so no rank leaves its range.

Budget. With ``B`` trainable LoRA parameters over all clients (``ranking.budget_params``), the
rank ``r_kl`` the assigner gave client k in layer l is scaled by one common factor ``s``::

    r'_kl(s) = clamp(round_half_up(s * r_kl), lo_l, min(hi_l, c_k))
    P(s)     = sum_k sum_l r'_kl(s) * n_l          n_l = sum of d_in + d_out over l's modules

and ``s`` is the largest factor with ``P(s) <= B`` (the head is not counted). Each ``r'_kl`` is a
non-decreasing step function of ``s`` that steps up by one at ``s = (m - 1/2) / r_kl`` for
``lo_l < m <= min(hi_l, c_k)``, so ``P`` is non-decreasing and constant between those
breakpoints: the search bisects the sorted breakpoints (with ``s = 0``, where every rank is its
layer's ``r_min``, and ``s = 1``, the assigner's own ranks) for the largest one where ``P``
fits. The global-scale rank (``lo = r_min``, ``hi = r_max``) follows the same ``s``; its
breakpoints are searched too, weighing nothing, so it takes its largest value under the same
layer ranks.

Uniform ranks stay equal: the largest common rank that fits, or with caps water-filling (capped
clients stay at their cap, the others share the rest). AutoRank's ranks keep their proportions up
to rounding and the clamps. An ample budget gives ``s > 1``: ranks grow up to each layer's
``r_max``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from autorank.config import CapTier, RankingConfig
from autorank.ranking.mapping import round_half_up_array

_TIER_STREAM = 0x7131  # keeps the tier draws apart from the random assigners' draws of the seed


@dataclass(frozen=True)
class LimitedRanks:
    """Ranks after caps and budget, ``[n_clients]`` in the order given.

    Attributes:
        ranks: the global-scale rank of each client.
        layer_ranks: each client's adapted layer name -> rank.
        scale: the factor ``s`` the budget search found; None without a budget.
        total_params: ``P`` at these ranks; None without layer sizes.
    """

    ranks: list[int]
    layer_ranks: list[dict[str, int]]
    scale: float | None
    total_params: int | None


def draw_caps(
    clients: Sequence[int], rank_caps: Mapping[int, int], tiers: Sequence[CapTier], seed: int
) -> list[int | None]:
    """Each client's cap: its ``rank_caps`` entry, else its drawn tier's rank, else None.

    Client ``k`` draws ``u_k``, the k-th uniform of a generator seeded by ``seed``, and falls in
    tier ``j`` when ``cumsum(share)[j - 1] <= u_k < cumsum(share)[j]``: its tier depends only on
    the seed and its index, not on how many clients there are.
    """
    drawn: list[int | None] = [None] * len(clients)
    if tiers and clients:
        u = np.random.default_rng([seed, _TIER_STREAM]).random(max(clients) + 1)
        edges = np.cumsum([t.share for t in tiers])
        picks = np.searchsorted(edges, u[list(clients)], side="right")
        drawn = [tiers[min(int(j), len(tiers) - 1)].rank for j in picks]
    return [rank_caps.get(k, cap) for k, cap in zip(clients, drawn, strict=True)]


def check_limits(
    settings: RankingConfig,
    clients: Sequence[int],
    r_min: int,
    layers: Mapping[str, tuple[int, int]],
    sizes: Mapping[str, int] | None,
) -> None:
    """Refuse caps below an r_min, ``rank_caps`` of unknown clients, and layer sizes that do not
    name exactly the adapted layers or a budget without them."""
    settings.check_caps(clients, floor=max([r_min, *(lo for lo, _ in layers.values())]))
    if sizes is None:
        if settings.budget_params is not None:
            raise ValueError("ranking.budget_params needs layer_sizes (d_in + d_out per layer)")
        return
    if set(sizes) != set(layers):
        raise ValueError(
            f"layer_sizes names {sorted(sizes)}; expected the adapted layers {sorted(layers)}"
        )
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or int(v) != v or v < 1}
    if bad:
        raise ValueError(f"layer_sizes must be integers >= 1 (d_in + d_out), got {bad}")


def scaled_ranks(R: np.ndarray, s: float, lo: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``clamp(round_half_up(s R), lo, up)``; ``R, up: [n_clients, n_cols]``, ``lo: [n_cols]``."""
    return np.clip(round_half_up_array(s * R), lo[None, :], up)


def breakpoints(R: np.ndarray, lo: np.ndarray, up: np.ndarray) -> np.ndarray:
    """0, 1 and every ``s = (m - 1/2) / r`` where a scaled rank steps up to ``m``, sorted, distinct.

    Equal breakpoints of different ranks are equal floats: ``m - 1/2`` and ``r`` are exact and
    the quotient is correctly rounded.
    """
    cells = {(int(R[k, j]), int(lo[j]), int(up[k, j])) for k, j in np.ndindex(R.shape)}
    steps = [np.array([0.0, 1.0])] + [(np.arange(a + 1, b + 1) - 0.5) / r for r, a, b in cells]
    return np.unique(np.concatenate(steps))


def fit_scale(
    R: np.ndarray, lo: np.ndarray, up: np.ndarray, weights: np.ndarray, budget: int
) -> float:
    """The largest breakpoint ``s`` with ``P(s) = sum(scaled_ranks(R, s, lo, up) @ weights)``
    at most ``budget``; ``weights: [n_cols]`` are the parameters per rank of each column.

    Raises:
        ValueError: even every rank at its floor (``s = 0``) exceeds the budget.
    """

    def params(s: float) -> int:
        return int((scaled_ranks(R, s, lo, up) @ weights).sum())

    least = params(0.0)
    if least > budget:
        raise ValueError(
            f"ranking.budget_params ({budget}) is below {least}, the LoRA parameters of the "
            f"{len(R)} clients with every layer at its r_min; expected at least {least}"
        )
    s = breakpoints(R, lo, up)
    fits, breaks = 0, len(s)  # P(s[fits]) <= budget < P(s[breaks]) (past the end: never)
    while breaks - fits > 1:
        mid = (fits + breaks) // 2
        fits, breaks = (mid, breaks) if params(float(s[mid])) <= budget else (fits, mid)
    return float(s[fits])


def limit_ranks(
    ranks: Sequence[int],
    layer_ranks: Sequence[Mapping[str, int]],
    caps: Sequence[int | None],
    *,
    r_min: int,
    r_max: int,
    layers: Mapping[str, tuple[int, int]],
    sizes: Mapping[str, int] | None,
    budget: int | None,
) -> LimitedRanks:
    """Cap every client's ranks and, with a ``budget``, scale them to fit it (module docstring).

    Args:
        ranks: the assigner's global-scale rank per client, ``[n_clients]``.
        layer_ranks: the assigner's layer name -> rank per client, ``[n_clients]``.
        caps: the largest rank of each client's device, None for no cap, ``[n_clients]``;
            each at least every ``r_min`` (``check_limits``).
        r_min: smallest rank on the global scale.
        r_max: largest rank on the global scale.
        layers: adapted layer name -> its ``(r_min, r_max)``.
        sizes: layer name -> ``n_l``, ``d_in + d_out`` summed over its modules; needed for a
            budget, else only for ``total_params``.
        budget: ``B``, trainable LoRA parameters over all clients; None: no scaling.
    """
    names = list(layers)  # columns: the layers, then the global scale (weighing nothing)
    rows = zip(layer_ranks, ranks, strict=True)
    R = np.array([[lr[n] for n in names] + [g] for lr, g in rows])  # [n_clients, n_cols]
    lo = np.array([layers[n][0] for n in names] + [r_min])  # [n_cols]
    hi = np.array([layers[n][1] for n in names] + [r_max])  # [n_cols]
    cap = np.array([hi.max() if c is None else c for c in caps])  # [n_clients]
    up = np.minimum(hi[None, :], cap[:, None])  # [n_clients, n_cols]
    weights = None if sizes is None else np.array([sizes[n] for n in names] + [0])
    s = 1.0 if budget is None or weights is None else fit_scale(R, lo, up, weights, budget)
    out = scaled_ranks(R, s, lo, up)  # [n_clients, n_cols]
    total = None if weights is None else int((out @ weights).sum())
    return LimitedRanks(
        ranks=[int(r) for r in out[:, -1]],
        layer_ranks=[{n: int(r) for n, r in zip(names, row[:-1], strict=True)} for row in out],
        scale=None if budget is None else s,
        total_params=total,
    )
