"""Splitting sample indices among clients (AutoRank step 1).

Every scheme returns one sorted ``int64`` index array per client; each index is used exactly once,
the union is every index, and the same seed always gives the same split. Randomness comes from one
``np.random.default_rng(seed)``, never from global state.

Schemes and their parameters:

- ``iid``: a shuffle cut into near-equal parts.
- ``dirichlet(alpha, min_size=1)``: label skew (Hsu et al. 2019, arXiv 1909.06335; Yurochkin et
  al. 2019); smaller ``alpha`` means fewer classes per client.
- ``shards(shards_per_client=2)``: the pathological split of McMahan et al. 2017 (arXiv 1602.05629).
- ``quantity_skew(sigma=1.0)``: IID labels, log-normal client sizes.
- ``double_imbalance``: the AutoRank paper's split (Chen et al. 2024, arXiv 2412.15553), where
  both the number of classes and the size grow with the client index. Client ``i`` holds class
  rank ``c`` iff ``(c mod K) <= (i mod C)``: with ``K == C`` that is ``{0..i}``; with ``K > C``
  the pattern repeats every ``C`` clients; with ``K < C`` the classes wrap onto the clients.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, get_args

import numpy as np

from autorank.config import Scheme

logger = logging.getLogger(__name__)

MAX_DIRICHLET_DRAWS = 100
"""How many Dirichlet draws ``dirichlet`` tries before it gives up on ``min_size``."""

Parts = list[np.ndarray]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as a 1-D non-negative ``int64`` array, or ValueError."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels: expected at least one sample, got an empty array")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels: expected integer class ids, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"labels: expected non-negative class ids, got {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, *, allow_zero: bool) -> float:
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def _check_fraction(name: str, value: Any) -> float:
    fraction = _check_float(name, value, allow_zero=True)
    if fraction >= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    return fraction


def _check_indices(indices: np.ndarray) -> np.ndarray:
    arr = np.asarray(indices)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(
            f"indices: expected a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr.astype(np.int64, copy=False)


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` items into integer counts proportional to ``weights`` (largest remainder).

    ``counts_k = floor(total * w_k / sum w)`` plus one for the largest fractional parts, so the
    counts sum to ``total`` exactly and each is the floor or ceiling of its ideal share.

    Args:
        total: items to distribute, ``>= 0``.
        weights: non-negative shares with a positive sum, ``[n]``.

    Returns:
        ``int64`` counts, ``[n]``.
    """
    ideal = total * weights / weights.sum()
    counts = np.floor(ideal).astype(np.int64)
    short = total - int(counts.sum())
    # Stable sort: ties go to the lower index, so the result is deterministic.
    order = np.argsort(-(ideal - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def _cut(indices: np.ndarray, counts: np.ndarray) -> Parts:
    """Cut ``indices`` into consecutive pieces of the given sizes."""
    return np.split(indices, np.cumsum(counts)[:-1])


def _merge(pieces: Sequence[Parts], n_clients: int) -> Parts:
    """Per client, the sorted union of its pieces over all classes."""
    return [
        np.sort(np.concatenate([p[k] for p in pieces])).astype(np.int64) for k in range(n_clients)
    ]


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _iid(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> Parts:
    """A random permutation cut into ``n_clients`` parts whose sizes differ by at most one."""
    return [np.sort(p) for p in np.array_split(rng.permutation(labels.size), n_clients)]


def _dirichlet_draw(
    labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator
) -> Parts:
    """One draw: per class ``c``, ``p_c ~ Dir(alpha * 1_K)`` and class ``c`` is cut by ``p_c``."""
    pieces = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(n_clients, alpha))
        pieces.append(_cut(members, _apportion(members.size, shares)))
    return _merge(pieces, n_clients)


def _dirichlet(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, *, alpha: Any, min_size: Any = 1
) -> Parts:
    """Label skew by a per-class Dirichlet(alpha) draw, redrawn until every client has ``min_size``.

    Hsu, Qi & Brown 2019 (arXiv 1909.06335); Yurochkin et al. 2019 (ICML). Class ``c``'s samples,
    shuffled, go to the clients in proportions ``p_c ~ Dir(alpha, ..., alpha)`` (``[n_clients]``).
    """
    alpha = _check_float("alpha", alpha, allow_zero=False)
    min_size = _check_int("min_size", min_size, 1)
    if min_size * n_clients > labels.size:
        raise ValueError(
            f"min_size: {min_size} samples for each of {n_clients} clients needs "
            f"{min_size * n_clients}, but there are {labels.size}; lower min_size or n_clients"
        )
    smallest = 0
    for draw in range(MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_draw(labels, n_clients, alpha, rng)
        smallest = min(p.size for p in parts)
        if smallest >= min_size:
            logger.debug("dirichlet(alpha=%s) accepted draw %d", alpha, draw + 1)
            return parts
    raise ValueError(
        f"dirichlet: no draw in {MAX_DIRICHLET_DRAWS} gave every client >= min_size={min_size} "
        f"samples (smallest got {smallest}); raise alpha (got {alpha}), lower n_clients "
        f"(got {n_clients}) or lower min_size"
    )


def _shards(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, *, shards_per_client: Any = 2
) -> Parts:
    """Sort by label, cut ``n_clients * shards_per_client`` shards, deal them out at random.

    McMahan et al. 2017 (arXiv 1602.05629). Shards differ in size by at most one sample; the
    order within a label is shuffled first so that the seed also decides which samples share a
    shard.
    """
    per_client = _check_int("shards_per_client", shards_per_client, 1)
    n_shards = n_clients * per_client
    if n_shards > labels.size:
        raise ValueError(
            f"shards_per_client: {n_clients} clients x {per_client} shards = {n_shards} shards "
            f"but only {labels.size} samples; lower shards_per_client or n_clients"
        )
    shuffled = rng.permutation(labels.size)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, n_shards)
    dealt = rng.permutation(n_shards).reshape(n_clients, per_client)  # [K, shards_per_client]
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in dealt]


def _quantity_skew(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, *, sigma: Any = 1.0
) -> Parts:
    """IID labels with log-normal sizes: ``s_k ~ LogNormal(0, sigma)``, ``n_k = 1 + share of rest``.

    Every client gets one sample, then the other ``N - K`` are apportioned by ``s_k / sum s``.
    ``sigma = 0`` gives equal sizes; larger ``sigma`` gives more skew.
    """
    sigma = _check_float("sigma", sigma, allow_zero=True)
    shares = rng.lognormal(0.0, sigma, size=n_clients)
    sizes = 1 + _apportion(labels.size - n_clients, shares)
    return [np.sort(p) for p in _cut(rng.permutation(labels.size), sizes)]


def _holds_class(client: int, cls: int, n_clients: int, n_classes: int) -> bool:
    """Whether ``client`` holds class rank ``cls`` under ``double_imbalance``.

    The rule is ``(cls mod K) <= (client mod C)``. With ``K == C`` it is the paper's rule,
    client ``i`` holds classes ``{0..i}``. With ``K > C`` the pattern repeats in blocks of ``C``
    clients (client ``C`` holds class 0 only, like client 0). With ``K < C`` the classes wrap onto
    the clients (client 0 holds ``{0, K, 2K, ...}``) so that no class is left out. Every class is
    held by at least one client and every client holds class 0.
    """
    return cls % n_clients <= client % n_classes


def _double_imbalance(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> Parts:
    """The paper's double imbalance: client ``i`` holds classes ``{0..i}``, each split evenly.

    Chen et al. 2024 (AutoRank, arXiv 2412.15553). Class rank ``c`` is the ``c``-th smallest
    distinct label, ``C`` their number; membership follows ``_holds_class``. Each class is shuffled
    and cut evenly among its holders (sizes differ by at most one; the lower client indices get
    the extra samples), so with ``K == C`` both the label count ``i + 1`` and the size grow with
    ``i``.
    """
    classes = np.unique(labels)
    pieces = []
    for c, label in enumerate(classes):
        holders = [k for k in range(n_clients) if _holds_class(k, c, n_clients, classes.size)]
        members = rng.permutation(np.flatnonzero(labels == label))
        split = np.array_split(members, len(holders))
        own = [np.empty(0, dtype=np.int64)] * n_clients
        for k, chunk in zip(holders, split, strict=True):
            own[k] = chunk
        pieces.append(own)
    return _merge(pieces, n_clients)


def _natural(labels: np.ndarray, n_clients: int, rng: np.random.Generator, *, keys: Any) -> Parts:
    """One client per distinct key (``keys [N]``: a user, a book), in sorted key order.

    Flower's ``NaturalIdPartitioner`` and FederatedScope's meta splitter do the same: the data
    says who holds what, so the number of clients is the number of keys.
    """
    keys = np.asarray(keys)
    if keys.shape != labels.shape:
        raise ValueError(f"keys: expected one per sample ({labels.size}), got {keys.shape}")
    names, owner = np.unique(keys, return_inverse=True)
    if len(names) != n_clients:
        raise ValueError(
            f"partition.n_clients ({n_clients}) must equal the {len(names)} distinct values of "
            "data.key_column for scheme 'natural'"
        )
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=len(names)))[:-1])


Split = Callable[..., Parts]  # (labels [N], n_clients, rng, **params) -> K index arrays

# ``partition.scheme`` -> its split (the names are ``config.Scheme``); a split's keyword-only
# parameters are the scheme's settings, those without a default required.
SCHEMES: dict[str, Split] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "shards": _shards,
    "quantity_skew": _quantity_skew,
    "double_imbalance": _double_imbalance,
    "natural": _natural,
}
# Parameters the data gives, not the config (``scheme_params`` leaves them out).
DATA_PARAMS = frozenset({"keys"})
# What to change when a split leaves a client without samples.
_EMPTY_HINTS = {
    "dirichlet": "raise alpha or min_size, or lower n_clients",
    "quantity_skew": "lower sigma or n_clients",
    "double_imbalance": "lower n_clients or use more samples per class",
}


def scheme_params(scheme: Scheme) -> tuple[str, ...]:
    """The keyword parameters of ``scheme`` that are settings (not the data's, ``DATA_PARAMS``)."""
    return tuple(k for k in _keywords(_split(scheme)) if k not in DATA_PARAMS)


def _split(scheme: str) -> Split:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown scheme {scheme!r}; expected one of {get_args(Scheme)}")
    return SCHEMES[scheme]


def _keywords(split: Split) -> dict[str, bool]:
    """A split's keyword-only parameters -> whether each is required (has no default)."""
    return {
        name: p.default is inspect.Parameter.empty
        for name, p in inspect.signature(split).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _check_params(scheme: str, split: Split, params: dict[str, Any]) -> None:
    accepted = _keywords(split)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"partition: unknown parameter(s) {unknown} for scheme {scheme!r}; "
            f"it accepts {list(accepted) or 'none'}"
        )
    missing = [name for name, required in accepted.items() if required and name not in params]
    if missing:
        raise ValueError(
            f"partition: scheme {scheme!r} needs parameter(s) {missing}; "
            f"it accepts {list(accepted)}"
        )


def partition(
    labels: np.ndarray, scheme: Scheme, n_clients: int, *, seed: int, **params: Any
) -> list[np.ndarray]:
    """Split the sample indices ``0..N-1`` among ``n_clients`` clients.

    Args:
        labels: class id of every sample, ``[N]``, non-negative integers.
        scheme: ``iid``, ``dirichlet``, ``shards``, ``quantity_skew`` or ``double_imbalance``.
        n_clients: ``K``, ``1 <= K <= N``.
        seed: seeds the one generator the split uses; the same seed gives the same split.
        **params: the scheme's parameters (see the module docstring and ``scheme_params``).

    Returns:
        ``K`` sorted ``int64`` index arrays; disjoint, non-empty, and together all of ``0..N-1``.

    Raises:
        ValueError: bad labels, scheme, ``n_clients``, seed or parameters, or a split that leaves
            a client without samples (the message says which parameters to change).
    """
    labels = _check_labels(labels)
    split = _split(scheme)
    n_clients = _check_int("n_clients", n_clients, 1)
    if n_clients > labels.size:
        raise ValueError(
            f"n_clients: expected at most {labels.size} (the samples), got {n_clients}"
        )
    seed = _check_int("seed", seed, 0)
    _check_params(scheme, split, params)
    parts = split(labels, n_clients, np.random.default_rng(seed), **params)
    empty = [k for k, p in enumerate(parts) if p.size == 0]
    if empty:
        raise ValueError(
            f"partition: scheme {scheme!r} left client(s) {empty} without samples "
            f"(n_clients={n_clients}, N={labels.size}); "
            f"{_EMPTY_HINTS.get(scheme, 'lower n_clients')}"
        )
    logger.debug("partition %s K=%d sizes=%s", scheme, n_clients, [p.size for p in parts])
    return parts


def label_histogram(labels: np.ndarray, parts: Sequence[np.ndarray], n_classes: int) -> np.ndarray:
    """Samples per class per client: ``h[k, c] = |{j in parts[k] : labels[j] == c}|``.

    Args:
        labels: class ids, ``[N]``.
        parts: per-client index arrays into ``labels``.
        n_classes: ``C``; every label must be below it.

    Returns:
        ``int64`` counts, ``[n_clients, n_classes]``.
    """
    labels = _check_labels(labels)
    n_classes = _check_int("n_classes", n_classes, 1)
    if labels.max() >= n_classes:
        raise ValueError(
            f"n_classes: expected more than the largest label {labels.max()}, got {n_classes}"
        )
    rows = []
    for k, part in enumerate(parts):
        idx = _check_indices(part)
        if idx.size and (idx.min() < 0 or idx.max() >= labels.size):
            raise ValueError(
                f"parts[{k}]: expected indices in [0, {labels.size}), got out of range"
            )
        rows.append(np.bincount(labels[idx], minlength=n_classes))
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), n_classes)


def split_local(
    indices: np.ndarray, fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A client's own held-out split: ``(train, local_test)``, both sorted.

    ``n_test = min(round_half_up(fraction * n), n - 1)``, so ``fraction = 0`` gives an empty test
    set and a client always keeps at least one training sample.

    Args:
        indices: the client's sample indices, ``[n]``, ``n >= 1``.
        fraction: test share in ``[0, 1)``.
        seed: seeds the draw of the test samples.
    """
    idx = _check_indices(indices)
    if idx.size == 0:
        raise ValueError("indices: expected at least one sample, got an empty array")
    fraction = _check_fraction("fraction", fraction)
    seed = _check_int("seed", seed, 0)
    n_test = min(_round_half_up(fraction * idx.size), idx.size - 1)
    shuffled = np.random.default_rng(seed).permutation(idx)
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])


def split_public(
    labels: np.ndarray, fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified ``(public, private)`` split of ``0..N-1``, both sorted.

    The public share is held by the server for pre-training the base model; the private rest is
    what ``partition`` divides. ``n_public = min(round_half_up(fraction * N), N - 1)`` is
    apportioned over the classes by their sizes (largest remainder), so class ``c`` gives the floor
    or the ceiling of ``n_public * n_c / N``, about ``fraction * n_c``.

    Args:
        labels: class ids, ``[N]``.
        fraction: public share in ``[0, 1)``; ``0`` gives an empty public set.
        seed: seeds which samples of each class become public.
    """
    labels = _check_labels(labels)
    fraction = _check_fraction("fraction", fraction)
    seed = _check_int("seed", seed, 0)
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    n_public = min(_round_half_up(fraction * labels.size), labels.size - 1)
    per_class = _apportion(n_public, sizes.astype(np.float64))
    public = [
        rng.permutation(np.flatnonzero(labels == c))[:take]
        for c, take in zip(classes, per_class, strict=True)
    ]
    chosen = np.sort(np.concatenate(public)).astype(np.int64)
    private = np.setdiff1d(np.arange(labels.size, dtype=np.int64), chosen, assume_unique=True)
    return chosen, private
