"""Multi-criteria decision analysis: CRITIC criterion weights and TOPSIS closeness (AutoRank 3-4).

Both functions take a decision matrix ``X: [n_alternatives, n_criteria]`` (for AutoRank the
alternatives are clients, the criteria their complexity measures) and a per-criterion ``benefit``
flag (True: higher is better; False: a cost, lower is better).

Conventions match pymcdm 1.4 (``pymcdm.weights.critic_weights``, and ``pymcdm.methods.TOPSIS``
with ``vector_normalization``) to floating-point precision on well-posed input, and differ only
where pymcdm returns NaN: constant columns, identical alternatives and all-zero columns get a
documented, finite answer here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

_CONSTANT_RTOL = 1e-12
"""A column whose range is at most this fraction of its largest magnitude counts as constant."""

_DEGENERATE_RTOL = 1e-12
"""CRITIC contrast below this fraction of ``sum(sigma)`` means the columns are fully redundant."""

NEUTRAL_CLOSENESS = 0.5
"""TOPSIS closeness given when every alternative is at the ideal and the anti-ideal at once."""


def critic_weights(matrix: np.ndarray, benefit: Sequence[bool] | None = None) -> np.ndarray:
    """Objective criterion weights by CRITIC (Diakoulaki, Mavrotas & Papayannakis, 1995).

    Each column is min-max normalised (benefit ``(x - min) / (max - min)``, cost
    ``(max - x) / (max - min)``); then

        c_j = sigma_j * sum_k (1 - rho_jk),        w_j = c_j / sum_k c_k,

    where ``sigma_j`` is the *sample* standard deviation (``ddof=1``, as pymcdm uses) of normalised
    column j and ``rho`` the Pearson correlation between normalised columns. A criterion scores
    high when it varies a lot and disagrees with the others. (The ``ddof`` only rescales every
    ``sigma_j`` by the same factor, so it cannot change the normalised weights.)

    Degenerate cases (pymcdm gives NaN for all of them):
      * a constant column carries no information: weight 0, and it is left out of the
        correlations, so adding a constant criterion never changes the other weights;
      * every column constant (including a single alternative): equal weights ``1 / n_criteria``;
      * informative columns all perfectly correlated (every ``c_j`` is 0, e.g. one informative
        column, or two alternatives with criteria that agree): equal weights over the informative
        columns, 0 for the constant ones.

    Args:
        matrix: decision matrix, ``[n_alternatives, n_criteria]``, finite.
        benefit: one flag per criterion, ``[n_criteria]``; None means every criterion is a benefit.

    Returns:
        Weights, ``[n_criteria]``, non-negative, summing to 1.

    Raises:
        ValueError: a malformed ``matrix`` or ``benefit``.
    """
    X = _as_matrix(matrix)
    is_benefit = _as_benefit(benefit, X.shape[1])
    n_criteria = X.shape[1]
    informative = ~_constant_columns(X)
    if not informative.any():
        logger.info("CRITIC: every criterion is constant; using equal weights")
        return np.full(n_criteria, 1.0 / n_criteria)
    N = _minmax(X[:, informative], is_benefit[informative])  # [n_alt, n_informative]
    sigma = N.std(axis=0, ddof=1)  # [n_informative]
    rho = np.clip(np.atleast_2d(np.corrcoef(N, rowvar=False)), -1.0, 1.0)
    contrast = sigma * (1.0 - rho).sum(axis=1)  # [n_informative]
    weights = np.zeros(n_criteria)
    if contrast.sum() <= _DEGENERATE_RTOL * sigma.sum():
        logger.info("CRITIC: informative criteria are fully redundant; using equal weights")
        weights[informative] = 1.0 / informative.sum()
    else:
        weights[informative] = contrast / contrast.sum()
    return weights


def topsis(
    matrix: np.ndarray, weights: np.ndarray, benefit: Sequence[bool] | None = None
) -> np.ndarray:
    """Relative closeness to the ideal by TOPSIS (Hwang & Yoon, 1981), vector normalisation.

        r_ij = x_ij / sqrt(sum_i x_ij^2),          v_ij = w_j r_ij,
        A+_j = max_i v_ij,  A-_j = min_i v_ij      (swapped for cost criteria),
        D+_i = ||v_i - A+||_2,  D-_i = ||v_i - A-||_2,   C_i = D-_i / (D+_i + D-_i).

    pymcdm's ``vector_normalization`` writes a cost column as ``1 - r_ij`` and always takes the
    column maximum as ideal; that is a reflection of the same column, so the distances, and hence
    the closeness, are identical to the swapped-ideal form used here. Weights are used as given
    (the closeness does not change when all weights are scaled by the same factor).

    Degenerate cases (pymcdm gives NaN for them):
      * an all-zero column normalises to zeros (it cannot separate alternatives);
      * when ``D+_i + D-_i = 0`` every alternative coincides with both the ideal and the
        anti-ideal (identical rows, a single alternative, or only zero-weight columns vary); each
        then gets the neutral closeness 0.5 (``NEUTRAL_CLOSENESS``), since none is better.

    Args:
        matrix: decision matrix, ``[n_alternatives, n_criteria]``, finite.
        weights: criterion weights, ``[n_criteria]``, non-negative with a positive sum.
        benefit: one flag per criterion, ``[n_criteria]``; None means every criterion is a benefit.

    Returns:
        Closeness, ``[n_alternatives]``, each in [0, 1]; higher is closer to the ideal.

    Raises:
        ValueError: a malformed ``matrix``, ``weights`` or ``benefit``.
    """
    X = _as_matrix(matrix)
    w = _as_weights(weights, X.shape[1])
    is_benefit = _as_benefit(benefit, X.shape[1])
    norms = np.sqrt((X**2).sum(axis=0))  # [n_crit]
    R = np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)
    V = R * w  # [n_alt, n_crit]
    ideal = np.where(is_benefit, V.max(axis=0), V.min(axis=0))
    anti_ideal = np.where(is_benefit, V.min(axis=0), V.max(axis=0))
    d_plus = np.linalg.norm(V - ideal, axis=1)  # [n_alt]
    d_minus = np.linalg.norm(V - anti_ideal, axis=1)
    total = d_plus + d_minus
    closeness: np.ndarray = np.divide(
        d_minus, total, out=np.full_like(total, NEUTRAL_CLOSENESS), where=total > 0
    )
    return closeness


def _as_matrix(matrix: np.ndarray) -> np.ndarray:
    try:
        X = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"matrix must hold numbers, got {matrix!r}") from err
    if X.ndim != 2:
        raise ValueError(f"matrix must be 2-D [n_alternatives, n_criteria], got shape {X.shape}")
    if X.size == 0:
        raise ValueError(f"matrix must have at least one row and one column, got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = [tuple(int(i) for i in idx) for idx in np.argwhere(~np.isfinite(X))[:5]]
        raise ValueError(f"matrix must be finite, got NaN or inf at (row, column) {bad}")
    return X


def _as_benefit(benefit: Sequence[bool] | None, n_criteria: int) -> np.ndarray:
    if benefit is None:
        return np.ones(n_criteria, dtype=bool)
    flags = list(benefit)
    if len(flags) != n_criteria:
        raise ValueError(
            f"benefit must have one flag per criterion ({n_criteria}), got {len(flags)}: {flags}"
        )
    if not all(isinstance(f, bool | np.bool_) for f in flags):
        raise ValueError(f"benefit must hold booleans (True = benefit, False = cost), got {flags}")
    return np.asarray(flags, dtype=bool)


def _as_weights(weights: np.ndarray, n_criteria: int) -> np.ndarray:
    try:
        w = np.asarray(weights, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"weights must hold numbers, got {weights!r}") from err
    if w.shape != (n_criteria,):
        raise ValueError(
            f"weights must have shape ({n_criteria},), one per criterion, got shape {w.shape}"
        )
    if not np.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if (w < 0).any():
        raise ValueError(f"weights must be non-negative, got {w.tolist()}")
    if w.sum() <= 0:
        raise ValueError(f"weights must have a positive sum, got {w.tolist()}")
    return w


def _constant_columns(X: np.ndarray) -> np.ndarray:
    """``[n_criteria]`` bool: columns whose spread is only rounding noise."""
    spread = X.max(axis=0) - X.min(axis=0)
    scale = np.abs(X).max(axis=0)
    constant: np.ndarray = spread <= _CONSTANT_RTOL * scale
    return constant


def _minmax(X: np.ndarray, is_benefit: np.ndarray) -> np.ndarray:
    """Min-max normalise non-constant columns to [0, 1]; cost columns reversed."""
    low, high = X.min(axis=0), X.max(axis=0)
    N = (X - low) / (high - low)
    return np.where(is_benefit, N, 1.0 - N)
