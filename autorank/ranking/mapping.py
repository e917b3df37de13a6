"""From scores to ranks: min-max closeness positions, rounding, and resource levels.

The arithmetic shared by the rank assigners of ``autorank.ranking.assigners``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

N_LEVELS = 5  # resource levels the random and heavy_tail assigners draw from
_EQUAL_ATOL = 1e-12  # closeness scores spread over less than this count as all equal
_ROUND_SLACK = 1e-9  # so that a half computed as 2.4999999999 still rounds up


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: halves go up, unlike Python's round-half-to-even."""
    return math.floor(x + 0.5 + _ROUND_SLACK)


def round_half_up_array(x: np.ndarray) -> np.ndarray:
    """``round_half_up`` of every element, as integers of ``x``'s shape."""
    return np.floor(np.asarray(x, dtype=float) + 0.5 + _ROUND_SLACK).astype(np.int64)


def position_to_rank(t: float, lo: int, hi: int) -> int:
    """Linear map of a position ``t`` in [0, 1] onto ``[lo, hi]``: ``round(lo + t (hi - lo))``."""
    return round_half_up(lo + t * (hi - lo))


def clamp(rank: int, lo: int, hi: int) -> int:
    """``rank`` limited to ``[lo, hi]``."""
    return max(lo, min(hi, rank))


def closeness_positions(
    closeness: np.ndarray, equal_policy: Literal["max", "mid"] = "max"
) -> np.ndarray:
    """Min-max normalised closeness ``t_i = (C_i - min C) / (max C - min C)``, ``[n_clients]``.

    0 marks the least and 1 the most complex client. When all scores are equal (spread below
    1e-12, or one client) everyone gets 1 (``equal_policy="max"``) or 0.5 (``"mid"``).
    """
    C = np.asarray(closeness, dtype=float)
    spread = float(C.max() - C.min())
    if spread <= _EQUAL_ATOL:
        return np.full(C.shape, 1.0 if equal_policy == "max" else 0.5)
    positions: np.ndarray = (C - C.min()) / spread
    return positions


def map_closeness(
    closeness: np.ndarray, r_min: int, r_max: int, *, equal_policy: Literal["max", "mid"] = "max"
) -> list[int]:
    """AutoRank's rank rule: ``r_i = round(r_min + t_i (r_max - r_min))``, ``[n_clients]``.

    ``t_i`` are the ``closeness_positions``; all scores equal gives everyone ``r_max``
    (``equal_policy="max"``) or the rounded midpoint. A higher closeness never gets a lower rank.
    """
    return [position_to_rank(t, r_min, r_max) for t in closeness_positions(closeness, equal_policy)]


def rank_levels(r_min: int, r_max: int, n_levels: int = N_LEVELS) -> tuple[int, ...]:
    """Geometric resource levels ``round(r_min (r_max / r_min)^(k / (n_levels - 1)))``, unique.

    Each level roughly multiplies the previous one by a constant, like the doubling resource
    budgets of FlexLoRA (Bai et al., 2024); ``[2, 32]`` gives exactly ``2, 4, 8, 16, 32``.

    Raises:
        ValueError: ``r_min`` below 1 or above ``r_max``, or ``n_levels`` below 1.
    """
    if not 1 <= r_min <= r_max:
        raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    if r_min == r_max or n_levels == 1:
        return (r_max,)
    ratio = r_max / r_min
    levels = {round_half_up(r_min * ratio ** (k / (n_levels - 1))) for k in range(n_levels)}
    return tuple(sorted(levels))


def log_position(rank: int, r_min: int, r_max: int) -> float:
    """Where ``rank`` sits in ``[r_min, r_max]`` on a log scale, in [0, 1] (1 if one rank wide)."""
    if r_min == r_max:
        return 1.0
    return math.log(rank / r_min) / math.log(r_max / r_min)
