"""The aggregators: a registry of small pure functions from a round's client updates to an
``AggregationResult``, built from the layer rules of ``merge.rules``; ``aggregate`` dispatches by
name (``aggregation.method`` in the config)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch

from autorank.config import AggregatorName
from autorank.lora.adapters import (
    AdapterState,
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    resize,
)
from autorank.merge.rules import (
    LayerRule,
    check_equal_ranks,
    flexlora_rule,
    fold,
    hetlora_rule,
    per_client,
    rbla_product_rule,
    rbla_rule,
    rbla_svd_rule,
    rbla_tiered_rule,
    sample_weights,
    stack,
    validate,
    zeropad_rule,
)

Aggregator = Callable[[Sequence[ClientUpdate]], AggregationResult]


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
    validate(updates)
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
    validate(updates)
    p = sample_weights(updates)
    extra = fedavg_extra(updates)
    global_lora: dict[str, LoraFactors] = {}
    client_lora: list[dict[str, LoraFactors]] = [{} for _ in updates]
    for name in updates[0].state.lora:
        factors = [u.state.lora[name] for u in updates]
        merged = rule([fold(f) for f in factors], p)  # rank r_max, scale 1
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
    validate(updates)
    check_equal_ranks(updates)
    return _aggregate_factors(updates, zeropad_rule)


def aggregate_zeropad(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """Zero-padding FedAvg: pad every client to ``r_max``, average with ``p_i`` over all clients.

    ``A_g[k] = sum_i p_i A_i[k]`` with ``A_i[k] = 0`` for ``k >= r_i``, so high-rank components
    are diluted by the low-rank clients; client i gets the first ``r_i`` components. The padding
    of Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
    EMNLP 2024, with FedAvg weights.
    """
    return _aggregate_factors(updates, zeropad_rule)


def aggregate_hetlora(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """HetLoRA: zero-pad, weight each client by the Frobenius norm of its update.

    ``w_i = ||s_i B_i A_i||_F / sum_j ||s_j B_j A_j||_F`` per layer (``p_i`` if every norm is 0);
    ``A_g[k] = sum_i w_i A_i[k]``; client i gets the first ``r_i`` components.
    Cho et al., EMNLP 2024 (sparsity-weighted aggregation).
    """
    return _aggregate_factors(updates, hetlora_rule)


def aggregate_rbla(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """RBLA: average each rank index only over the clients whose rank covers it.

    ``A_g[k] = sum_{i: r_i > k} n_i A_i[k] / sum_{i: r_i > k} n_i`` (0-based k), the same for
    the columns of ``B~_i = s_i B_i``; client i gets the first ``r_i`` components.
    Chen et al., "Rank-Based LoRA Aggregation for Fine-tuning Heterogeneous Models in FLaaS",
    arXiv 2408.08699; the aggregator of AutoRank (arXiv 2412.15553).
    """
    return _aggregate_factors(updates, rbla_rule)


def aggregate_rbla_svd(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """RBLA, then each layer's merged product re-expressed in its SVD basis.

    With ``B~_g A_g`` RBLA's merge (rank ``r_max``, scale 1, see ``aggregate_rbla``):
    ``B~_g A_g = U S V^T``, ``A[k] = n_k v_k^T``, ``B~[:, k] = (S_k / n_k) u_k`` with
    ``n_k = max(sqrt(S_k), 1/sqrt(3))`` (``k < r_max``; no row of ``A`` below the norm of LoRA's
    initialisation, see ``refactor``), so the global product is RBLA's, unchanged; only its
    basis is. Slot k then carries the k-th strongest
    direction and client i's first ``r_i`` slots are the best rank-``r_i`` approximation of the
    global product, where RBLA hands out whichever directions its slot order happened to hold
    (client bases are only defined up to an invertible map, ``B R R^-1 A = B A``). Same bytes as
    RBLA. RBLA: Chen et al., arXiv 2408.08699; SVD hand-out: FlexLoRA (Bai et al., NeurIPS 2024).
    The split follows measurements on digits and MNIST-5k (docs/results.md): FlexLoRA's
    balanced ``sqrt(S)`` split alone leaves weak slots nearly untrainable and converged slower.
    """
    return _aggregate_factors(updates, rbla_svd_rule)


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
    return _aggregate_factors(updates, rbla_product_rule)


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
    return _aggregate_factors(updates, rbla_tiered_rule)


def aggregate_flexlora(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """FlexLoRA: SVD of the weighted dense update, client i gets the top ``r_i`` triplets.

    ``W = sum_i p_i s_i B_i A_i = U S V^T`` (``[d_out, d_in]``); ``B~ = U_r sqrt(S_r)``,
    ``A = sqrt(S_r) V_r^T``, and ``B_i = B~ / s_i``, so ``s_i B_i A_i`` is the best rank-``r_i``
    approximation of W. Bai et al., "Federated Fine-tuning of Large Language Models under
    Heterogeneous Tasks and Client Resources", NeurIPS 2024.
    """
    return _aggregate_factors(updates, flexlora_rule)


@torch.no_grad()
def aggregate_fedex(updates: Sequence[ClientUpdate]) -> AggregationResult:
    """FedEx-LoRA: FedAvg of the factors, and the residual that makes the merge exact in the base.

    ``A_g = sum_i p_i A_i``, ``B~_g = sum_i p_i B~_i`` (zero-padded to ``r_max``, as ``zeropad``)
    and ``base_delta = sum_i p_i B~_i A_i - B~_g A_g``, so the global model (base plus adapter)
    is exactly the sample-weighted average of the clients' models, where averaging the factors
    alone adds the cross terms ``B~_i A_j``. Client i gets the first ``r_i`` slots of the
    averaged factors on the updated base. Singhal et al., "FedEx-LoRA: Exact Aggregation for
    Federated and Efficient Fine-Tuning of Foundation Models", arXiv 2410.09432, is published for
    one rank; with mixed ranks the factors are zero-padded (so a client's model is the global one
    only when it holds ``r_max``; the residual is shared), which with one rank is FedEx-LoRA.
    The server keeps the components no sampled client covered (``rounds.steps.keep_uncovered``)
    and takes their product out of the residual, so the global model stays exact.
    """
    result = _aggregate_factors(updates, zeropad_rule)
    p = sample_weights(updates).to(torch.float64)
    residual: dict[str, torch.Tensor] = {}
    for name, merged in result.global_state.lora.items():
        exact = sum(
            w * fold(u.state.lora[name]).delta().to(torch.float64)
            for w, u in zip(p, updates, strict=True)
        )
        residual[name] = (exact - merged.delta().to(torch.float64)).to(merged.A.dtype)
    return replace(result, base_delta=residual)


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
    validate(updates)
    p = sample_weights(updates)
    extra = fedavg_extra(updates)
    stacked: dict[str, LoraFactors] = {}
    for name in updates[0].state.lora:
        folded = [fold(u.state.lora[name]) for u in updates]
        stacked[name] = stack(folded, per_client(p, folded))
    return AggregationResult(
        global_state=AdapterState(stacked, extra),
        client_states=[AdapterState({}, _clone(extra)) for _ in updates],
        base_delta={name: f.delta() for name, f in stacked.items()},
        fresh=True,
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
    "fedex": aggregate_fedex,
    "flora": aggregate_flora,
}


def aggregate(name: AggregatorName, updates: Sequence[ClientUpdate]) -> AggregationResult:
    """Aggregate one round of client updates with the named aggregator (see ``AGGREGATORS``)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[name](updates)
