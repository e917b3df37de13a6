"""Aggregators for heterogeneous-rank LoRA adapters: a registry of small pure functions.

Every aggregator maps the clients' updates of one round to an ``AggregationResult``. Per adapted
layer the work happens in the product-preserving space of ``autorank.lora.adapters``: component k of
client i contributes ``s_i * B_i[:, k] A_i[k]``, so each client's scale is first folded into its up
factor (``B~_i = s_i B_i``, scale 1). A *layer rule* merges the folded factors into global factors
``A_g: [r_max, d_in]``, ``B~_g: [d_out, r_max]`` at scale 1, and ``resize`` hands every client its
own rank ``r_i`` and its own scale ``s_i`` (``B_i' = B~_g[:, :r_i] / s_i``). The alpha policy
therefore never changes what aggregation means.

Sample weights are ``p_i = n_i / sum_j n_j``. Non-LoRA trainable tensors (``state.extra``) always
use sample-weighted FedAvg (McMahan et al., AISTATS 2017).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from autorank.config import AggregatorName
from autorank.lora.adapters import (
    AdapterState,
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    resize,
)

Aggregator = Callable[[Sequence[ClientUpdate]], AggregationResult]
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


def _validate(updates: Sequence[ClientUpdate]) -> None:
    """Raise ``ValueError`` unless all clients share layer names, extra names and shapes."""
    if len(updates) == 0:
        raise ValueError("updates must hold at least one ClientUpdate, got an empty sequence")
    _check_same_names(updates)
    _check_shapes(updates)


def _check_equal_ranks(updates: Sequence[ClientUpdate]) -> None:
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


def _fold(factors: LoraFactors) -> LoraFactors:
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


def _zeropad_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Zero-pad to ``r_max``, average with ``p_i`` over all clients (HetLoRA-style padding)."""
    return _componentwise_mean(factors, p[:, None].expand(-1, _max_rank(factors)))


def _hetlora_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
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


def _rbla_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Average component k over the clients whose rank covers it, weighted by ``n_i``."""
    return _componentwise_mean(factors, _rbla_weights(factors, p))


def _stack(factors: Sequence[LoraFactors], w: torch.Tensor) -> LoraFactors:
    """Stacked factors ``A_s = concat_i A_i`` (rows), ``B_s = concat_i B~_i diag(w_i)`` (columns).

    ``B_s A_s = sum_i sum_{k < r_i} w_ik B~_i[:, k] A_i[k]`` exactly (``w: [K, r_max]``); rank
    ``sum_i r_i``, scale 1.
    """
    A_s = torch.cat([f.A for f in factors], dim=0)  # [sum r_i, d_in]
    B_s = torch.cat([f.B * w[i, : f.rank].to(f.B) for i, f in enumerate(factors)], dim=1)
    return LoraFactors(A_s, B_s, 1.0)  # B_s: [d_out, sum r_i]


def _per_client(p: torch.Tensor, factors: Sequence[LoraFactors]) -> torch.Tensor:
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
# whatever d_in is (autorank.targets.fresh_down_projections, peft's default).
INIT_ROW_NORM = 3**-0.5


def _refactor(
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
    stacked = _stack([_upcast(f) for f in factors], w)
    return _refactor(stacked, _max_rank(factors), factors[0].A.dtype, split=split)


def _flexlora_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Top ``r_max`` SVD slots of ``W = sum_i p_i B~_i A_i``."""
    return _product_rule(factors, _per_client(p, factors), "sqrt")


def _rbla_product_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Top ``r_max`` SVD slots of ``W = sum_k sum_{i: r_i > k} (p_i / P_k) B~_i[:, k] A_i[k]``."""
    return _product_rule(factors, _rbla_weights(factors, p), "init")


def _rank_tiers(ranks: Sequence[int]) -> list[tuple[int, int, list[int]]]:
    """Slot ranges ``[lo, hi)`` between consecutive distinct client ranks, from slot 0 to r_max,
    each with its clients: the positions in ``ranks`` with ``r_i >= hi``, which cover every
    slot of the tier."""
    distinct = sorted(set(ranks))
    bounds = zip([0, *distinct[:-1]], distinct, strict=True)
    return [(lo, hi, [i for i, r in enumerate(ranks) if r >= hi]) for lo, hi in bounds]


def _rbla_tiered_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """Per rank tier, the top slots of that tier's rank-weighted product (see the aggregator)."""
    w = _rbla_weights(factors, p)
    tiers: list[LoraFactors] = []
    for lo, hi, members in _rank_tiers([f.rank for f in factors]):
        part = [
            _upcast(LoraFactors(factors[i].A[lo:hi], factors[i].B[:, lo:hi], 1.0)) for i in members
        ]
        stacked = _stack(part, w[members, lo:hi])
        tiers.append(_refactor(stacked, hi - lo, factors[0].A.dtype, split="init"))
    return LoraFactors(
        torch.cat([t.A for t in tiers], dim=0), torch.cat([t.B for t in tiers], dim=1), 1.0
    )


def _rbla_svd_rule(factors: Sequence[LoraFactors], p: torch.Tensor) -> LoraFactors:
    """RBLA's merge, re-expressed in the SVD basis of its product (rank ``r_max``)."""
    merged = _rbla_rule(factors, p)
    return _refactor(_upcast(merged), merged.rank, merged.A.dtype, split="init")


# --- drivers ----------------------------------------------------------------------------------


@torch.no_grad()
def fedavg_extra(updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Sample-weighted FedAvg of the non-LoRA tensors: ``x_g = sum_i p_i x_i``.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017. Accumulates in float64 and returns each tensor at its own dtype.

    Args:
        updates: K client updates with the same extra names and shapes.

    Returns:
        Extra name -> averaged tensor (shape as the clients').
    """
    _validate(updates)
    p = sample_weights(updates)
    out: dict[str, torch.Tensor] = {}
    for name, first in updates[0].state.extra.items():
        stacked = torch.stack([u.state.extra[name].to(torch.float64) for u in updates])
        out[name] = torch.tensordot(p.to(stacked.device), stacked, dims=1).to(first.dtype)
    return out


def _clone(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in tensors.items()}


@torch.no_grad()
def _aggregate_factors(updates: Sequence[ClientUpdate], rule: LayerRule) -> AggregationResult:
    """Run ``rule`` per layer on folded factors; hand each client its own rank and scale."""
    _validate(updates)
    p = sample_weights(updates)
    extra = fedavg_extra(updates)
    global_lora: dict[str, LoraFactors] = {}
    client_lora: list[dict[str, LoraFactors]] = [{} for _ in updates]
    for name in updates[0].state.lora:
        factors = [u.state.lora[name] for u in updates]
        merged = rule([_fold(f) for f in factors], p)  # rank r_max, scale 1
        ref = max(factors, key=lambda f: f.rank)  # first client of the largest rank
        global_lora[name] = resize(merged, ref.rank, ref.scale)
        for i, f in enumerate(factors):
            client_lora[i][name] = resize(merged, f.rank, f.scale)
    return AggregationResult(
        global_state=AdapterState(global_lora, extra),
        client_states=[AdapterState(lora, _clone(extra)) for lora in client_lora],
    )


# --- the aggregators --------------------------------------------------------------------------


def aggregate_fedavg(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """FedAvg of LoRA factors; every layer must have one rank across clients.

    ``A_g = sum_i p_i A_i``, ``B~_g = sum_i p_i s_i B_i`` (``A: [r, d_in]``, ``B: [d_out, r]``).
    McMahan et al., AISTATS 2017.
    """
    _validate(updates)
    _check_equal_ranks(updates)
    return _aggregate_factors(updates, _zeropad_rule)


def aggregate_zeropad(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """Zero-padding FedAvg: pad every client to ``r_max``, average with ``p_i`` over all clients.

    ``A_g[k] = sum_i p_i A_i[k]`` with ``A_i[k] = 0`` for ``k >= r_i``, so high-rank components
    are diluted by the low-rank clients; client i gets the first ``r_i`` components. The padding
    of Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
    EMNLP 2024, with FedAvg weights.
    """
    return _aggregate_factors(updates, _zeropad_rule)


def aggregate_hetlora(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """HetLoRA: zero-pad, weight each client by the Frobenius norm of its update.

    ``w_i = ||s_i B_i A_i||_F / sum_j ||s_j B_j A_j||_F`` per layer (``p_i`` if every norm is 0);
    ``A_g[k] = sum_i w_i A_i[k]``; client i gets the first ``r_i`` components.
    Cho et al., EMNLP 2024 (sparsity-weighted aggregation).
    """
    return _aggregate_factors(updates, _hetlora_rule)


def aggregate_rbla(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """RBLA: average each rank index only over the clients whose rank covers it.

    ``A_g[k] = sum_{i: r_i > k} n_i A_i[k] / sum_{i: r_i > k} n_i`` (0-based k), the same for
    the columns of ``B~_i = s_i B_i``; client i gets the first ``r_i`` components.
    Chen et al., "Rank-Based LoRA Aggregation for Fine-tuning Heterogeneous Models in FLaaS",
    arXiv 2408.08699; the aggregator of AutoRank (arXiv 2412.15553).
    """
    return _aggregate_factors(updates, _rbla_rule)


def aggregate_rbla_svd(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """RBLA, then each layer's merged product re-expressed in its SVD basis.

    With ``B~_g A_g`` RBLA's merge (rank ``r_max``, scale 1, see ``aggregate_rbla``):
    ``B~_g A_g = U S V^T``, ``A[k] = n_k v_k^T``, ``B~[:, k] = (S_k / n_k) u_k`` with
    ``n_k = max(sqrt(S_k), 1/sqrt(3))`` (``k < r_max``; no row of ``A`` below the norm of LoRA's
    initialisation, see ``_refactor``), so the global product is RBLA's, unchanged; only its
    basis is. Slot k then carries the k-th strongest
    direction and client i's first ``r_i`` slots are the best rank-``r_i`` approximation of the
    global product, where RBLA hands out whichever directions its slot order happened to hold
    (client bases are only defined up to an invertible map, ``B R R^-1 A = B A``). Same bytes as
    RBLA. RBLA: Chen et al., arXiv 2408.08699; SVD hand-out: FlexLoRA (Bai et al., NeurIPS 2024).
    The split follows measurements on digits and MNIST-5k (docs/results.md): FlexLoRA's
    balanced ``sqrt(S)`` split alone leaves weak slots nearly untrainable and converged slower.
    """
    return _aggregate_factors(updates, _rbla_svd_rule)


def aggregate_rbla_product(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """Rank-aware merge in product space: RBLA's per-slot weights on rank-one components.

    ``W = sum_k sum_{i: r_i > k} (p_i / P_k) s_i B_i[:, k] A_i[k]``, ``P_k = sum_{j: r_j > k} p_j``
    (0-based k), computed exactly as a stack of thin factors, then re-factored by SVD to its top
    ``r_max`` slots as in ``aggregate_rbla_svd``; client i gets the first ``r_i``. Every slot k
    has total weight 1, so directions only high-rank clients express are not diluted, as RBLA
    intends, but without the cross terms ``B~_i[:, k] A_j[k]`` (i != j) that averaging each
    factor separately adds. Slot k means the same direction for every client because each round
    starts from the global SVD basis. With equal ranks ``P_k = 1`` and this is FlexLoRA's product
    (split as in ``aggregate_rbla_svd``, not FlexLoRA's ``sqrt(S)``); with one client it returns
    that client's product, re-factored.

    Related work: FlexLoRA (Bai et al., NeurIPS 2024) takes the SVD of ``sum_i p_i B~_i A_i``,
    so slot k of a high-rank client is weighted ``p_i`` and diluted by ``P_k < 1``. FedEx-LoRA
    (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
    Foundation Models", arXiv 2410.09432) averages factors at one rank and adds the residual
    ``mean(B A) - mean(B) mean(A)`` to the frozen weights; here the base is untouched and the
    only error is the truncation to ``r_max``. raFLoRA (Wu et al., arXiv 2602.13486; only its
    abstract was read) aggregates each rank partition of the local updates weighted by the clients
    that contribute to it, against the "rank collapse" of SVD-based heterogeneous aggregation onto
    the smallest shared rank: this rule follows that idea with one-slot partitions and weights
    ``p_i / P_k``; whether raFLoRA's partitions and weights are these was not checked.
    """
    return _aggregate_factors(updates, _rbla_product_rule)


def aggregate_rbla_tiered(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """rbla_product's exact merge, re-factored within each rank tier instead of across them.

    The distinct client ranks ``rho_1 < ... < rho_T = r_max`` cut the slots into tiers
    ``[rho_{t-1}, rho_t)`` (``rho_0 = 0``); every slot of tier t is covered by the same clients
    ``C_t = {i: r_i >= rho_t}``. Per tier the exact product of its slots, with RBLA's weights,
    ``W_t = sum_{i in C_t} (p_i / P_t) sum_{rho_{t-1} <= k < rho_t} B~_i[:, k] A_i[k]``
    (``P_t = sum_{j in C_t} p_j``), is re-factored by SVD to its top ``rho_t - rho_{t-1}`` slots
    (split as in ``aggregate_rbla_svd``), and the tiers are concatenated in order; client i gets
    the first ``r_i`` slots, i.e. its whole tiers. Same bytes as RBLA.

    Why: rbla_product sorts the directions of the whole sum ``sum_t W_t`` by strength, so the
    directions only high-rank clients trained land in low slots and are handed to every client
    next round; RBLA keeps them in the high slots, which only high-rank clients train. Measured
    on digits under the double imbalance with AutoRank's ranks (5 seeds, docs/results.md): RBLA
    and this rule reach 85 % in 4.4 rounds, rbla_product in 7.2, so the re-sorting across tiers,
    not the exact product, costs the speed; but this rule also peaks like RBLA (0.928 against
    rbla_product's 0.955). Hence its use as an early merge (``aggregation.early_method``) for
    the first rounds before rbla_product takes over.
    With equal ranks there is one tier and it is rbla_product. Tiers: RBLA (Chen et al., arXiv
    2408.08699), whose slot k is averaged over the clients that cover it; product and SVD
    hand-out: FlexLoRA (Bai et al., NeurIPS 2024).
    """
    return _aggregate_factors(updates, _rbla_tiered_rule)


def aggregate_flexlora(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """FlexLoRA: SVD of the weighted dense update, client i gets the top ``r_i`` triplets.

    ``W = sum_i p_i s_i B_i A_i = U S V^T`` (``[d_out, d_in]``); ``B~ = U_r sqrt(S_r)``,
    ``A = sqrt(S_r) V_r^T``, and ``B_i = B~ / s_i``, so ``s_i B_i A_i`` is the best rank-``r_i``
    approximation of W. Bai et al., "Federated Fine-tuning of Large Language Models under
    Heterogeneous Tasks and Client Resources", NeurIPS 2024.
    """
    return _aggregate_factors(updates, _flexlora_rule)


@torch.no_grad()
def aggregate_flora(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """FLoRA: stack the factors so the product is exact, merge it into the base.

    ``A_s = concat_i A_i`` (rows, ``[sum r_i, d_in]``), ``B_s = concat_i p_i s_i B_i`` (columns,
    ``[d_out, sum r_i]``), so ``B_s A_s = sum_i p_i s_i B_i A_i`` exactly. That product is
    ``base_delta[layer]``; every client downloads an empty ``lora`` (fresh adapters) and the
    FedAvg'd extras; ``global_state`` holds the stacked factors at scale 1.
    Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
    Adaptations", NeurIPS 2024.
    """
    _validate(updates)
    p = sample_weights(updates)
    extra = fedavg_extra(updates)
    stacked: dict[str, LoraFactors] = {}
    for name in updates[0].state.lora:
        folded = [_fold(u.state.lora[name]) for u in updates]
        stacked[name] = _stack(folded, _per_client(p, folded))
    return AggregationResult(
        global_state=AdapterState(stacked, extra),
        client_states=[AdapterState({}, _clone(extra)) for _ in updates],
        base_delta={name: f.delta() for name, f in stacked.items()},
    )


AGGREGATORS: dict[str, Aggregator] = {
    "fedavg": aggregate_fedavg,
    "zeropad": aggregate_zeropad,
    "hetlora": aggregate_hetlora,
    "rbla": aggregate_rbla,
    "rbla_svd": aggregate_rbla_svd,
    "rbla_product": aggregate_rbla_product,
    "rbla_tiered": aggregate_rbla_tiered,
    "flexlora": aggregate_flexlora,
    "flora": aggregate_flora,
}


@dataclass(frozen=True)
class LabelGap:
    """A rank tier whose clients, together, lack labels the federation holds.

    Attributes:
        layer: the adapted layer whose ranks form the tier.
        rank: the tier's top rank; its clients are those of rank ``>= rank`` at ``layer``.
        clients: how many clients the tier has.
        held: labels those clients hold between them.
        total: labels the federation holds.
    """

    layer: str
    rank: int
    clients: int
    held: int
    total: int

    def __str__(self) -> str:
        return (
            f"the {self.clients} client(s) of {self.layer} rank >= {self.rank} hold "
            f"{self.held} of the federation's {self.total} labels"
        )


def tier_label_gap(
    ranks: Sequence[Mapping[str, int]],
    histogram: np.ndarray,
    members: Sequence[int] | None = None,
) -> LabelGap | None:
    """The first rank tier whose clients do not hold every label the federation holds, or None.

    Tiers are ``aggregate_rbla_tiered``'s among the clients merged (``members``, default all):
    per adapted layer, each distinct rank ``rho`` has the clients ``{i: r_i >= rho}``; layers
    in name order, tiers lowest first. A label is held when one of those clients has a training
    sample of it (``histogram[i, c] > 0``); the federation's labels are every client's.

    Why: rbla_tiered hands a tier's directions only to that tier's clients, and the global
    model keeps them as they trained them. Under the double imbalance the top-ranked clients hold
    every label and those directions serve every label (RBLA's fast start); under Dirichlet(0.1)
    they hold a few labels, and a few tiered rounds cost rbla_product's peak there (MNIST-5k,
    docs/results.md). ``aggregation.early_when: all_labels`` runs the early merge in a round only
    when this returns None for the round's clients.

    Args:
        ranks: per client, adapted layer name -> rank (``RankAssignment.ranks()``).
        histogram: training samples per client per class, ``[n_clients, n_classes]``.
        members: the clients merged (a round's sample); None: every client.

    Returns:
        The gap, or None when every tier's clients hold every label.
    """
    counts = np.asarray(histogram)
    if counts.ndim != 2 or counts.shape[0] != len(ranks):
        raise ValueError(
            f"histogram: expected [{len(ranks)} clients, n_classes], got shape {counts.shape}"
        )
    present = counts > 0  # [K, C]
    total = int(present.any(axis=0).sum())
    merged = list(range(len(ranks))) if members is None else list(members)
    for layer in sorted(ranks[0]) if ranks else ():
        for _, rho, positions in _rank_tiers([ranks[i][layer] for i in merged]):
            tier = [merged[k] for k in positions]
            held = int(present[tier].any(axis=0).sum())
            if held < total:
                return LabelGap(layer, int(rho), len(tier), held, total)
    return None


def aggregate(name: AggregatorName, updates: Sequence[ClientUpdate]) -> AggregationResult:
    """Aggregate one round of client updates with the named aggregator (see ``AGGREGATORS``)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](updates)
