"""The registry of rank assigners: who gets which LoRA rank (AutoRank step 5 and its baselines).

Every assigner is a small function registered under a name (``ranking.assigner`` in the config);
``assign_ranks`` validates the inputs once and dispatches. Each returns a ``RankAssignment``: one
``RankDecision`` per client with the rank on the global ``[r_min, r_max]`` scale and one rank per
adapted layer, each inside that layer's own range. Caps and a parameter budget
(``autorank.ranking.budget``) then apply to whatever the assigner gave.

Rounding is half up everywhere (``floor(x + 0.5)``), never Python's round-half-to-even, so a
midpoint such as 2.5 always becomes 3.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import get_args

import numpy as np

from autorank.config import AssignerName, Criterion, RankingConfig
from autorank.ranking.assignment import RankAssignment, RankDecision
from autorank.ranking.budget import check_limits, draw_caps, limit_ranks
from autorank.ranking.mapping import (
    clamp,
    closeness_positions,
    log_position,
    position_to_rank,
    rank_levels,
    round_half_up,
)
from autorank.ranking.mcda import critic_weights, topsis
from autorank.ranking.profiling import ClientProfile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Request:
    """Validated inputs shared by every assigner."""

    assigner: str
    profiles: tuple[ClientProfile, ...]
    settings: RankingConfig
    r_min: int
    r_max: int
    layers: Mapping[str, tuple[int, int]]
    n_classes: int
    seed: int


Assigner = Callable[[_Request], RankAssignment]


def assigner_names() -> tuple[str, ...]:
    """The registered assigner names, sorted."""
    return tuple(sorted(ASSIGNERS))


def assign_ranks(
    assigner: AssignerName,
    profiles: Sequence[ClientProfile],
    *,
    settings: RankingConfig,
    r_min: int,
    r_max: int,
    layers: Mapping[str, tuple[int, int]],
    n_classes: int,
    seed: int,
    layer_sizes: Mapping[str, int] | None = None,
) -> RankAssignment:
    """Give every client a LoRA rank with the named assigner, then apply caps and budget.

    Args:
        assigner: a registered name (see ``assigner_names()``).
        profiles: one per client, ``[n_clients]``; the decisions keep this order.
        settings: the ``ranking`` section of the config.
        r_min: smallest rank on the global scale, >= 1.
        r_max: largest rank on the global scale, >= r_min.
        layers: adapted layer name -> its own ``(r_min, r_max)``.
        n_classes: classes in the task (the ``manual`` assigner's denominator).
        seed: seeds the ``random`` and ``heavy_tail`` draws and the ``cap_tiers`` draw.
        layer_sizes: adapted layer name -> ``d_in + d_out`` summed over its modules (a rank-r
            adapter there trains ``r`` times as many parameters); needed with
            ``settings.budget_params``, else it only fills in ``total_params``.

    Returns:
        One decision per client, with per-layer ranks, capped and fitted to the budget
        (``autorank.ranking.budget``).

    Raises:
        ValueError: an unknown assigner, no profiles, bad bounds or a bad layer range, a cap
            below an r_min, a budget without layer sizes or below every rank at its r_min.
    """
    if assigner not in ASSIGNERS:
        raise ValueError(f"assigner {assigner!r} is unknown; expected one of {assigner_names()}")
    _check_bounds(r_min, r_max, n_classes, seed)
    _check_layers(layers)
    _check_profiles(profiles, n_classes)
    check_limits(settings, [p.client for p in profiles], r_min, layers, layer_sizes)
    request = _Request(
        assigner, tuple(profiles), settings, r_min, r_max, dict(layers), n_classes, seed
    )
    result = apply_limits(
        ASSIGNERS[assigner](request),
        settings,
        r_min=r_min,
        r_max=r_max,
        layers=request.layers,
        sizes=layer_sizes,
        seed=seed,
    )
    logger.info("%s ranks: %s", assigner, [d.rank for d in result.decisions])
    return result


def _by_bounds(
    req: _Request,
    rule: Callable[[int, int, int], int],
    criteria: Sequence[dict[str, float]] | None = None,
    closeness: Sequence[float] | None = None,
    weights: dict[str, float] | None = None,
) -> RankAssignment:
    """Apply ``rule(client_position, lo, hi)`` with the global bounds and with each layer's."""
    decisions = []
    for k, p in enumerate(req.profiles):
        layer_ranks = {name: rule(k, lo, hi) for name, (lo, hi) in req.layers.items()}
        values = _measured(p) if criteria is None else criteria[k]
        close = None if closeness is None else closeness[k]
        rank = rule(k, req.r_min, req.r_max)
        decisions.append(
            RankDecision(p.client, p.n_samples, p.labels_held, values, close, rank, layer_ranks)
        )
    return RankAssignment(req.assigner, tuple(decisions), weights or {})


def _measured(profile: ClientProfile) -> dict[str, float]:
    """Every criterion measured for a client, recorded even by assigners that ignore them."""
    out = {"entropy": profile.entropy, "gini_simpson": profile.gini_simpson}
    out["n_samples"] = float(profile.n_samples)
    if profile.learning_difficulty is not None:
        out["learning_difficulty"] = profile.learning_difficulty
    return out


def _autorank(req: _Request) -> RankAssignment:
    """AutoRank (Chen et al., arXiv 2412.15553): CRITIC weights, TOPSIS closeness, min-max ranks.

    ``X: [n_clients, n_criteria]`` holds ``settings.criteria`` (all benefits); per layer,
    ``layer_mapping="scale"`` maps the position into the layer's own range and ``"clamp"`` clamps
    the global rank into it.
    """
    names, X = _criteria_matrix(req.profiles, req.settings.criteria)
    weights = critic_weights(X)  # [n_criteria]
    closeness = topsis(X, weights)  # [n_clients]
    t = closeness_positions(closeness, req.settings.equal_policy).tolist()  # [n_clients]

    def rule(k: int, lo: int, hi: int) -> int:
        if req.settings.layer_mapping == "scale":
            return position_to_rank(t[k], lo, hi)
        return clamp(position_to_rank(t[k], req.r_min, req.r_max), lo, hi)

    values = [dict(zip(names, row, strict=True)) for row in X.tolist()]
    named_weights = dict(zip(names, weights.tolist(), strict=True))
    return _by_bounds(req, rule, values, closeness.tolist(), named_weights)


def _criteria_matrix(
    profiles: Sequence[ClientProfile], criteria: Sequence[Criterion]
) -> tuple[list[str], np.ndarray]:
    """The decision matrix ``[n_clients, n_criteria]`` over the criteria every client has."""
    kept: list[Criterion] = []
    for name in criteria:
        missing = [
            p.client
            for p in profiles
            if name == "learning_difficulty" and p.learning_difficulty is None
        ]
        if missing and len(missing) == len(profiles):
            logger.info("criterion %r is not measured for any client (no warm-up); dropped", name)
            continue
        if missing:
            raise ValueError(
                f"criterion {name!r} is missing for clients {missing} but present for others; "
                "measure it for every client or for none"
            )
        kept.append(name)
    if not kept:
        raise ValueError(f"settings.criteria {list(criteria)} leaves no measured criterion")
    X = np.array([[p.criterion(name) for name in kept] for p in profiles], dtype=float)
    bad = np.argwhere(~np.isfinite(X))
    if bad.size:
        k, j = bad[0]
        raise ValueError(
            f"criterion {kept[j]!r} of client {profiles[k].client} must be finite, got {X[k, j]}"
        )
    return list(kept), X


def _uniform(req: _Request) -> RankAssignment:
    """Everyone gets ``settings.uniform_rank`` (default ``r_max``), clamped per layer."""
    rank = req.r_max if req.settings.uniform_rank is None else req.settings.uniform_rank
    if not req.r_min <= rank <= req.r_max:
        raise ValueError(
            f"settings.uniform_rank ({rank}) must lie in [r_min, r_max] = "
            f"[{req.r_min}, {req.r_max}]"
        )
    return _by_bounds(req, lambda _k, lo, hi: clamp(rank, lo, hi))


def _manual(req: _Request) -> RankAssignment:
    """Proportional to labels held: ``r = clamp(round(r_max * labels_held / n_classes))``."""
    return _proportional(req, [p.labels_held / req.n_classes for p in req.profiles])


def _size(req: _Request) -> RankAssignment:
    """Proportional to data size: ``r = clamp(round(r_max * n_i / max_k n_k))``."""
    largest = max(p.n_samples for p in req.profiles)
    if largest == 0:
        raise ValueError("profiles: every client has n_samples 0; the size assigner needs data")
    return _proportional(req, [p.n_samples / largest for p in req.profiles])


def _proportional(req: _Request, shares: Sequence[float]) -> RankAssignment:
    """``r = clamp(round(hi * share_i), lo, hi)`` for the global and every layer's bounds."""
    return _by_bounds(req, lambda k, lo, hi: clamp(round_half_up(hi * shares[k]), lo, hi))


def _random(req: _Request) -> RankAssignment:
    """FlexLoRA's uniform resource setting (Bai et al., 2024): levels drawn uniformly."""
    return _by_levels(req, exponent=0.0)


def _heavy_tail(req: _Request) -> RankAssignment:
    """FlexLoRA's heavy-tail resource setting (Bai et al., 2024): ``P(level k) ~ (k + 1)^-a``.

    With ``a = settings.heavy_tail_exponent`` most clients get the lowest levels, few the highest.
    """
    return _by_levels(req, exponent=req.settings.heavy_tail_exponent)


def _by_levels(req: _Request, exponent: float) -> RankAssignment:
    """Draw a level per client with ``P(k) ~ (k + 1)^-exponent`` (0: uniform), seeded.

    The global rank is the level itself; per layer, the level's position on the log scale of
    ``[r_min, r_max]`` is carried into the layer's range: ``round(lo (hi / lo)^t)``.
    """
    levels = rank_levels(req.r_min, req.r_max)
    p = np.arange(1, len(levels) + 1, dtype=float) ** -exponent
    rng = np.random.default_rng(req.seed)
    drawn = rng.choice(len(levels), size=len(req.profiles), p=p / p.sum())  # [n_clients]
    positions = [log_position(levels[i], req.r_min, req.r_max) for i in drawn]

    def rule(k: int, lo: int, hi: int) -> int:
        return clamp(round_half_up(lo * (hi / lo) ** positions[k]), lo, hi)

    return _by_bounds(req, rule)


# ``ranking.assigner`` -> its function (the names are ``config.AssignerName``).
ASSIGNERS: dict[str, Assigner] = {
    "autorank": _autorank,
    "uniform": _uniform,
    "manual": _manual,
    "size": _size,
    "random": _random,
    "heavy_tail": _heavy_tail,
}


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_bounds(r_min: int, r_max: int, n_classes: int, seed: int) -> None:
    least = {"r_min": 1, "r_max": 1, "n_classes": 1, "seed": 0}
    for name, value in zip(least, (r_min, r_max, n_classes, seed), strict=True):
        if not _is_int(value) or value < least[name]:
            raise ValueError(f"{name} must be an integer >= {least[name]}, got {value!r}")
    if r_min > r_max:
        raise ValueError(f"r_min ({r_min}) must not exceed r_max ({r_max})")


def _check_layers(layers: Mapping[str, tuple[int, int]]) -> None:
    for name, bounds in layers.items():
        ok = isinstance(bounds, tuple | list) and len(bounds) == 2 and all(map(_is_int, bounds))
        if not ok or not 1 <= bounds[0] <= bounds[1]:
            raise ValueError(
                f"layers[{name!r}] must be (r_min, r_max) integers with 1 <= r_min <= r_max, "
                f"got {bounds!r}"
            )


def _check_profiles(profiles: Sequence[ClientProfile], n_classes: int) -> None:
    if len(profiles) == 0:
        raise ValueError("profiles must hold at least one client, got none")
    clients = [p.client for p in profiles]
    if len(set(clients)) != len(clients):
        raise ValueError(f"profiles must have distinct client indices, got {clients}")
    for p in profiles:
        if p.n_samples < 0:
            raise ValueError(f"client {p.client}: n_samples must be >= 0, got {p.n_samples}")
        if p.labels_held > n_classes:
            raise ValueError(
                f"client {p.client} holds {p.labels_held} labels but n_classes is {n_classes}"
            )


assert set(ASSIGNERS) == set(get_args(AssignerName)), "registry and AssignerName disagree"


def apply_limits(
    result: RankAssignment,
    settings: RankingConfig,
    *,
    r_min: int,
    r_max: int,
    layers: Mapping[str, tuple[int, int]],
    sizes: Mapping[str, int] | None,
    seed: int,
) -> RankAssignment:
    """An assigner's result with the caps and the budget of ``settings`` applied
    (``limit_ranks``); the caps, the budget, ``P`` and ``s`` are recorded in it."""
    budget = settings.budget_params
    clients = [d.client for d in result.decisions]
    caps = draw_caps(clients, settings.rank_caps, settings.cap_tiers, seed)
    limited = limit_ranks(
        [d.rank for d in result.decisions],
        [d.layer_ranks for d in result.decisions],
        caps,
        r_min=r_min,
        r_max=r_max,
        layers=layers,
        sizes=sizes,
        budget=budget,
    )
    if budget is not None:
        logger.info(
            "budget of %d LoRA parameters: ranks scaled by %.4g, %s used",
            budget,
            limited.scale,
            limited.total_params,
        )
    decisions = zip(result.decisions, limited.ranks, limited.layer_ranks, caps, strict=True)
    return replace(
        result,
        decisions=tuple(replace(d, rank=r, layer_ranks=lr, cap=c) for d, r, lr, c in decisions),
        budget_params=budget,
        total_params=limited.total_params,
        scale=limited.scale,
    )
