"""Per-layer merge rules: how one adapted layer's client factors become the global factors.

Every aggregator maps the clients' updates of one round to an ``AggregationResult``. Per adapted
layer the work happens in the product-preserving space of ``autorank.lora.adapters``: component k of
client i contributes ``s_i * B_i[:, k] A_i[k]``, so each client's scale is first folded into its up
factor (``B~_i = s_i B_i``, scale 1). A *layer rule* merges the folded factors into global factors
``A_g: [r_max, d_in]``, ``B~_g: [d_out, r_max]`` at scale 1, and ``resize`` hands every client its
own rank ``r_i`` and its own scale ``s_i`` (``B_i' = B~_g[:, :r_i] / s_i``). The alpha policy
therefore never changes what aggregation means.

Sample weights are ``p_i = n_i / sum_j n_j``. Non-LoRA trainable tensors (``state.extra``) always
use sample-weighted FedAvg (McMahan et al., AISTATS 2017).

Each rule maps the folded factors of one layer (scale 1, one per client) and the sample weights
``p [K]`` to global factors at the largest client rank; the SVD re-factoring of an exact product
(``refactor``) serves the product rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from autorank.lora.adapters import (
    ClientUpdate,
    LoraFactors,
    resize,
)

# (folded factors of one layer, one per client, scale 1; sample weights p [K]) -> merged factors
# at the largest client rank, scale 1.
LayerRule = Callable[[Sequence[LoraFactors], torch.Tensor], LoraFactors]


# --- validation -------------------------------------------------------------------------------


def _check_same_names(updates: Sequence[ClientUpdate]) -> None:
    lora0, extra0 = sorted(updates[0].state.lora), sorted(updates[0].state.extra)
    for i, update in enumerate(updates[1:], start=1):
        lora, extra = sorted(update.state.lora), sorted(update.state.extra)
        if lora != lora0:
            raise ValueError(f"client {i} has LoRA layers {lora}, expected {lora0} (as client 0)")
        if extra != extra0:
            raise ValueError(
                f"client {i} has extra tensors {extra}, expected {extra0} (as client 0)"
            )


def _check_shapes(updates: Sequence[ClientUpdate]) -> None:
    first = updates[0].state
    for i, update in enumerate(updates):
        for name, f in update.state.lora.items():
            if not (math.isfinite(f.scale) and f.scale > 0):
                raise ValueError(f"client {i} layer {name!r}: scale must be > 0, got {f.scale}")
            ref = first.lora[name]
            got, want = [f.B.shape[0], f.A.shape[1]], [ref.B.shape[0], ref.A.shape[1]]
            if got != want:
                raise ValueError(
                    f"client {i} layer {name!r}: [d_out, d_in] is {got}, "
                    f"expected {want} (as client 0)"
                )
        for name, t in update.state.extra.items():
            if t.shape != first.extra[name].shape:
                raise ValueError(
                    f"client {i} extra {name!r}: shape {list(t.shape)}, "
                    f"expected {list(first.extra[name].shape)} (as client 0)"
                )


def validate(updates: Sequence[ClientUpdate]) -> None:
    """Raise ``ValueError`` unless all clients share layer names, extra names and shapes."""
    if len(updates) == 0:
        raise ValueError("updates must hold at least one ClientUpdate, got an empty sequence")
    _check_same_names(updates)
    _check_shapes(updates)


def check_equal_ranks(updates: Sequence[ClientUpdate]) -> None:
    for name in updates[0].state.lora:
        ranks = [u.state.lora[name].rank for u in updates]
        if len(set(ranks)) > 1:
            raise ValueError(
                f"fedavg needs equal client ranks per layer; layer {name!r} has ranks {ranks} "
                "(use zeropad, hetlora, rbla, rbla_svd, rbla_product, rbla_tiered, flexlora or "
                "flora for heterogeneous ranks)"
            )


# --- small pure helpers -----------------------------------------------------------------------


def sample_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """FedAvg weights ``p_i = n_i / sum_j n_j``, float64 ``[K]``."""
    n = torch.tensor([u.n_samples for u in updates], dtype=torch.float64)
    return n / n.sum()


def fold(factors: LoraFactors) -> LoraFactors:
    """The same product at scale 1: ``(A, s B, 1)``."""
    return resize(factors, factors.rank, 1.0)


def _componentwise_mean(factors: Sequence[LoraFactors], weights: torch.Tensor) -> LoraFactors:
    """Average zero-padded factors component by component.

    ``A_g[k] = sum_i w_ik A_i[k]`` and ``B~_g[:, k] = sum_i w_ik B~_i[:, k]``.

    Args:
        factors: folded factors (scale 1), client i at rank ``r_i``.
        weights: ``w: [K, r_max]``, the weight of client i on component k.

    Returns:
        Factors at rank ``r_max`` and scale 1.
    """
    r_max = weights.shape[1]
    padded = [resize(f, r_max, 1.0) for f in factors]
    w = weights.to(padded[0].A)
    A = torch.einsum("kr,krd->rd", w, torch.stack([f.A for f in padded]))  # [r_max, d_in]
    B = torch.einsum("kr,kor->or", w, torch.stack([f.B for f in padded]))  # [d_out, r_max]
    return LoraFactors(A, B, 1.0)


def _max_rank(factors: Sequence[LoraFactors]) -> int:
    return max(f.rank for f in factors)


# --- layer rules (one per aggregator that works on factors) --------------------------------------


def zeropad_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Zero-pad to ``r_max``, average with ``p_i`` over all clients (HetLoRA-style padding)."""
    return _componentwise_mean(factors, p[:, None].expand(-1, _max_rank(factors)))


def hetlora_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Zero-pad, weights ``w_i = ||B~_i A_i||_F / sum_j ||B~_j A_j||_F`` (``p_i`` if all are 0)."""
    # ||B A||_F^2 = sum((A A^T) * (B^T B)): an r x r product instead of the dense d_out x d_in one.
    sq = torch.stack([((f.A @ f.A.T) * (f.B.T @ f.B)).sum() for f in factors])
    norms = sq.clamp_min(0).sqrt().to(torch.float64)
    w = norms / norms.sum() if float(norms.sum()) > 0 else p
    return _componentwise_mean(factors, w[:, None].expand(-1, _max_rank(factors)))


def _rbla_weights(factors: Sequence[LoraFactors], p: torch.Tensor) -> torch.Tensor:
    """RBLA's weights ``w_ik = p_i / P_k`` if ``r_i > k`` else 0; ``[K, r_max]``.

    ``P_k = sum_{j: r_j > k} p_j`` is the weight of the clients whose rank covers slot k.
    """
    ranks = torch.tensor([f.rank for f in factors])
    covers = torch.arange(_max_rank(factors))[None, :] < ranks[:, None]  # [K, r_max]
    w = covers.to(p) * p[:, None]
    # Every column is covered by a client of the largest rank, so no column sum is zero.
    return w / w.sum(dim=0, keepdim=True)


def rbla_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Average component k over the clients whose rank covers it, weighted by ``n_i``."""
    return _componentwise_mean(factors, _rbla_weights(factors, p))


def stack(factors: Sequence[LoraFactors], w: torch.Tensor) -> LoraFactors:
    """Stacked factors ``A_s = concat_i A_i`` (rows), ``B_s = concat_i B~_i diag(w_i)`` (columns).

    ``B_s A_s = sum_i sum_{k < r_i} w_ik B~_i[:, k] A_i[k]`` exactly (``w: [K, r_max]``); rank
    ``sum_i r_i``, scale 1.
    """
    A_s = torch.cat([f.A for f in factors], dim=0)  # [sum r_i, d_in]
    B_s = torch.cat([f.B * w[i, : f.rank].to(f.B) for i, f in enumerate(factors)], dim=1)
    return LoraFactors(A_s, B_s, 1.0)  # B_s: [d_out, sum r_i]


def per_client(p: torch.Tensor, factors: Sequence[LoraFactors]) -> torch.Tensor:
    """``w_ik = p_i`` for every component: ``[K, r_max]``."""
    return p[:, None].expand(-1, _max_rank(factors))


def _upcast(f: LoraFactors) -> LoraFactors:
    """The factors in float32 if they are half precision (torch's QR and SVD want float32/64)."""
    work = f.A.dtype if f.A.dtype in (torch.float32, torch.float64) else torch.float32
    return LoraFactors(f.A.to(work), f.B.to(work), f.scale)


def _svd_of_product(
    B: torch.Tensor, A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``B A = U diag(S) V^T`` of a product of thin factors, with fixed signs.

    ``B: [d_out, R]``, ``A: [R, d_in]``. For ``R < min(d_out, d_in)`` the dense product is never
    formed: reduced QR ``B = Q_b R_b``, ``A^T = Q_a R_a`` give ``B A = Q_b (R_b R_a^T) Q_a^T``, so
    the SVD ``U_c S V_c^T`` of the ``R x R`` core yields ``U = Q_b U_c``, ``V = Q_a V_c`` exactly,
    in ``O((d_out + d_in) R^2)`` work (standard: Golub & Van Loan, *Matrix Computations*; FLoRIST,
    Ramesh & Dass, arXiv 2506.09199, likewise decomposes stacked adapters without the product).
    Otherwise the dense product is no larger than the factors and is decomposed directly.
    An SVD fixes each pair ``(u_k, v_k)`` only up to a common sign; the largest-magnitude entry
    of each ``u_k`` (the first on ties) is made positive, so a rerun gives the same bits.

    Returns:
        ``U: [d_out, m]``, ``S: [m]`` (non-increasing), ``Vh: [m, d_in]``,
        ``m = min(R, d_out, d_in)``.
    """
    R = A.shape[0]
    if min(B.shape[0], A.shape[1]) > R:
        Q_b, R_b = torch.linalg.qr(B)  # [d_out, R], [R, R]
        Q_a, R_a = torch.linalg.qr(A.T)  # [d_in, R], [R, R]
        U_c, S, Vh_c = torch.linalg.svd(R_b @ R_a.T)
        U, Vh = Q_b @ U_c, Vh_c @ Q_a.T
    else:
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    peak = U.gather(0, U.abs().argmax(dim=0, keepdim=True))  # [1, m]
    sign = torch.where(peak < 0, -1.0, 1.0).to(U)
    return U * sign, S, Vh * sign.T


# Row norm of LoRA's initial down-projection: Kaiming-uniform with a = sqrt(5) draws from
# U(-1/sqrt(d_in), 1/sqrt(d_in)), variance 1/(3 d_in), so a row's expected squared norm is 1/3
# whatever d_in is (autorank.lora.targets.fresh_down_projections, peft's default).
INIT_ROW_NORM = 3**-0.5


def refactor(
    f: LoraFactors, rank: int, dtype: torch.dtype, *, split: Literal["sqrt", "init"]
) -> LoraFactors:
    """``B A`` (scale 1) in its SVD basis ``U S V^T``, truncated to ``rank`` slots.

    Slot k carries the k-th strongest direction, so every prefix of k slots is the best rank-k
    approximation of the product (Eckart-Young). ``split`` says how ``S`` is shared between the
    factors (the product is the same either way):

    - ``"sqrt"``: ``B' = U_r sqrt(S_r)``, ``A' = sqrt(S_r) V_r^T`` (FlexLoRA's balanced form).
      A weak direction gets small ``A`` and ``B`` rows together, and since each factor's
      gradient is proportional to the other (``dL/dB = g (A x)^T``, ``dL/dA = B^T g x^T``) it
      learns slowly next round; a direction with ``S_k = 0`` never learns again.
    - ``"init"``: balanced, but no row of ``A`` below the norm of LoRA's initialisation:
      ``n_k = max(sqrt(S_k), 1/sqrt(3))`` (``INIT_ROW_NORM``), ``A'[k] = n_k v_k^T``,
      ``B'[:, k] = (S_k / n_k) u_k``. A weak slot starts the next round as trainable as a fresh
      LoRA slot; a strong one is split as FlexLoRA does. (Every row at ``1/sqrt(3)``, all the
      strength in ``B``, trained faster on digits but diverged with uniform ranks on MNIST-5k
      in 3 of 5 seeds: ``A``'s gradient grows with ``B``.)

    Returns rank ``rank``, scale 1, ``dtype``.
    """
    U, S, Vh = _svd_of_product(f.B, f.A)
    k = min(rank, S.numel())
    if split == "init":
        norm = S[:k].sqrt().clamp(min=INIT_ROW_NORM)
        A, B = norm[:, None] * Vh[:k], U[:, :k] * (S[:k] / norm)
    else:
        root = S[:k].sqrt()
        A, B = root[:, None] * Vh[:k], U[:, :k] * root
    top = LoraFactors(A.to(dtype), B.to(dtype), 1.0)
    # A layer thinner than the rank has fewer triplets: the missing components are zero.
    return resize(top, rank, 1.0)


def _product_rule(
    factors: Sequence[LoraFactors], w: torch.Tensor, split: Literal["sqrt", "init"]
) -> LoraFactors:
    """Top ``r_max`` SVD slots of ``sum_i sum_{k < r_i} w_ik B~_i[:, k] A_i[k]`` (w: [K, r_max])."""
    stacked = stack([_upcast(f) for f in factors], w)
    return refactor(stacked, _max_rank(factors), factors[0].A.dtype, split=split)


def flexlora_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Top ``r_max`` SVD slots of ``W = sum_i p_i B~_i A_i``."""
    return _product_rule(factors, per_client(p, factors), "sqrt")


def rbla_product_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Top ``r_max`` SVD slots of ``W = sum_k sum_{i: r_i > k} (p_i / P_k) B~_i[:, k] A_i[k]``."""
    return _product_rule(factors, _rbla_weights(factors, p), "init")


def rank_tiers(ranks: Sequence[int]) -> list[tuple[int, int, list[int]]]:
    """Slot ranges ``[lo, hi)`` between consecutive distinct client ranks, from slot 0 to r_max,
    each with its clients: the positions in ``ranks`` with ``r_i >= hi``, which cover every
    slot of the tier."""
    distinct = sorted(set(ranks))
    bounds = zip([0, *distinct[:-1]], distinct, strict=True)
    return [(lo, hi, [i for i, r in enumerate(ranks) if r >= hi]) for lo, hi in bounds]


def rbla_tiered_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Per rank tier, the top slots of that tier's rank-weighted product (see the aggregator)."""
    w = _rbla_weights(factors, p)
    tiers: list[LoraFactors] = []
    for lo, hi, members in rank_tiers([f.rank for f in factors]):
        part = [
            _upcast(LoraFactors(factors[i].A[lo:hi], factors[i].B[:, lo:hi], 1.0)) for i in members
        ]
        stacked = stack(part, w[members, lo:hi])
        tiers.append(refactor(stacked, hi - lo, factors[0].A.dtype, split="init"))
    return LoraFactors(
        torch.cat([t.A for t in tiers], dim=0), torch.cat([t.B for t in tiers], dim=1), 1.0
    )


def rbla_svd_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """RBLA's merge, re-expressed in the SVD basis of its product (rank ``r_max``)."""
    merged = rbla_rule(factors, p)
    return refactor(_upcast(merged), merged.rank, merged.A.dtype, split="init")
