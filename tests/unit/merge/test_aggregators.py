"""Aggregators on tiny float64 tensors: hand-computed numbers, properties, and bad input."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from autorank.config import AggregatorName
from autorank.lora.adapters import AdapterState, AggregationResult, ClientUpdate, LoraFactors
from autorank.merge.aggregators import AGGREGATORS, aggregate, fedavg_extra
from autorank.merge.rules import INIT_ROW_NORM
from autorank.merge.tiers import LabelGap, tier_label_gap

EXACT = {"rtol": 0.0, "atol": 0.0}
TIGHT = {"rtol": 0.0, "atol": 1e-12}
FACTOR_AGGREGATORS = ["fedavg", "zeropad", "hetlora", "rbla", "fedex"]
HETEROGENEOUS = [n for n in get_args(AggregatorName) if n not in ("fedavg", "flora")]
SVD_BASIS = ["rbla_svd", "rbla_product", "flexlora"]  # client i: the top r_i slots of the global
SVD_SLOTS = [*SVD_BASIS, "rbla_tiered"]  # every slot from an SVD (rbla_tiered: per rank tier)


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _random(gen: torch.Generator, rank: int, d_out: int, d_in: int, scale: float) -> LoraFactors:
    A = torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
    B = torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
    return LoraFactors(A, B, scale)


def _update(
    n: int, lora: dict[str, LoraFactors], extra: dict[str, torch.Tensor] | None = None
) -> ClientUpdate:
    return ClientUpdate(AdapterState(lora, extra or {}), n_samples=n)


def _dense_mean(updates: list[ClientUpdate], layer: str) -> torch.Tensor:
    """``sum_i p_i s_i B_i A_i``, computed independently of the module under test."""
    total = sum(u.n_samples for u in updates)
    terms = [(u.n_samples / total) * u.state.lora[layer].delta() for u in updates]
    return torch.stack(terms).sum(dim=0)


UNEVEN_RANKS = [{"l1": 1, "l2": 3}, {"l1": 2, "l2": 1}, {"l1": 4, "l2": 2}]
EVEN_RANKS = [{"l1": 2, "l2": 3}] * 3


def _round(ranks: list[dict[str, int]], alpha: float = 8.0) -> list[ClientUpdate]:
    """Three clients, two layers, the given ranks, scales alpha / r, heads filled with 0, 1, 2."""
    gen = torch.Generator().manual_seed(7)
    updates = []
    for i, (n, r) in enumerate(zip([5, 2, 9], ranks, strict=True)):
        lora = {
            "l1": _random(gen, r["l1"], 3, 4, alpha / r["l1"]),
            "l2": _random(gen, r["l2"], 2, 3, alpha / r["l2"]),
        }
        head = torch.full((2, 2), float(i), dtype=torch.float64)
        updates.append(_update(n, lora, {"head": head}))
    return updates


# --- the registry -------------------------------------------------------------------------------


def test_registry_holds_exactly_the_configurable_names() -> None:
    # Prepare
    expected = set(get_args(AggregatorName))

    # Execute
    names = set(AGGREGATORS)

    # Assert
    assert names == expected


@pytest.mark.parametrize("name", HETEROGENEOUS)
def test_every_aggregator_returns_each_client_at_its_own_ranks_and_scales(name: str) -> None:
    # Prepare
    updates = _round(UNEVEN_RANKS)

    # Execute
    result = aggregate(name, updates)  # type: ignore[arg-type]

    # Assert
    assert len(result.client_states) == len(updates)
    for update, state in zip(updates, result.client_states, strict=True):
        assert state.ranks() == update.state.ranks()
        for layer, f in state.lora.items():
            assert f.scale == update.state.lora[layer].scale
            assert f.A.shape[1] == update.state.lora[layer].A.shape[1]
            assert f.B.shape[0] == update.state.lora[layer].B.shape[0]
            assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    assert result.global_state.ranks() == {"l1": 4, "l2": 3}
    assert result.global_state.lora["l1"].scale == updates[2].state.lora["l1"].scale
    assert result.global_state.lora["l2"].scale == updates[0].state.lora["l2"].scale
    assert (result.base_delta != {}) == (name == "fedex")  # its residual; no other writes it


def test_flora_on_the_heterogeneous_round_returns_fresh_adapters_and_base_deltas() -> None:
    # Prepare
    updates = _round(UNEVEN_RANKS)

    # Execute
    result = aggregate("flora", updates)

    # Assert
    assert [state.lora for state in result.client_states] == [{}, {}, {}]
    assert result.global_state.ranks() == {"l1": 7, "l2": 6}
    assert {name: f.scale for name, f in result.global_state.lora.items()} == {"l1": 1.0, "l2": 1.0}
    assert {name: list(d.shape) for name, d in result.base_delta.items()} == {
        "l1": [3, 4],
        "l2": [2, 3],
    }


def test_fedavg_rejects_the_heterogeneous_round_naming_the_ranks() -> None:
    # Prepare
    updates = _round(UNEVEN_RANKS)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"'l1' has ranks \[1, 2, 4\]"):
        aggregate("fedavg", updates)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_aggregator_hands_out_the_sample_weighted_extras(name: str) -> None:
    # Prepare: heads 0, 1, 2 with n = 5, 2, 9
    updates = _round(EVEN_RANKS if name == "fedavg" else UNEVEN_RANKS)
    expected = torch.full((2, 2), (0 * 5 + 1 * 2 + 2 * 9) / 16, dtype=torch.float64)

    # Execute
    result = aggregate(name, updates)  # type: ignore[arg-type]

    # Assert
    assert_close(result.global_state.extra["head"], expected, **TIGHT)
    for state in result.client_states:
        assert_close(state.extra["head"], expected, **TIGHT)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_no_aggregator_modifies_its_inputs(name: str) -> None:
    # Prepare
    gen = torch.Generator().manual_seed(3)
    updates = [_update(n, {"l": _random(gen, 2, 3, 4, 0.5)}) for n in (1, 4)]
    before = [(u.state.lora["l"].A.clone(), u.state.lora["l"].B.clone()) for u in updates]

    # Execute
    aggregate(name, updates)  # type: ignore[arg-type]

    # Assert
    for (A, B), u in zip(before, updates, strict=True):
        assert_close(u.state.lora["l"].A, A, **EXACT)
        assert_close(u.state.lora["l"].B, B, **EXACT)


def test_unknown_aggregator_name_raises() -> None:
    # Prepare
    updates = [_update(1, {"l": LoraFactors(_t([[1.0]]), _t([[1.0]]), 1.0)})]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"unknown aggregator 'fedprox'.*rbla"):
        aggregate("fedprox", updates)  # type: ignore[arg-type]


# --- identical updates and scaling ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_identical_updates_come_back_unchanged(name: str) -> None:
    # Prepare
    gen = torch.Generator().manual_seed(11)
    shared = {"l1": _random(gen, 2, 3, 4, 0.5), "l2": _random(gen, 3, 2, 5, 8.0 / 3)}
    updates = [_update(n, dict(shared)) for n in (1, 2, 6)]

    # Execute
    result = aggregate(name, updates)  # type: ignore[arg-type]

    # Assert
    for layer, f in shared.items():
        if name == "flora":
            assert_close(result.base_delta[layer], f.delta(), **TIGHT)
            continue
        if name == "fedex":  # identical clients: factor averaging is exact, no residual
            assert_close(result.base_delta[layer], torch.zeros_like(f.delta()), **TIGHT)
        for state in [result.global_state, *result.client_states]:
            got = state.lora[layer]
            assert got.scale == f.scale
            assert_close(got.delta(), f.delta(), **TIGHT)
            if name in FACTOR_AGGREGATORS:
                assert_close(got.A, f.A, **TIGHT)
                assert_close(got.B, f.B, **TIGHT)


@pytest.mark.parametrize("name", HETEROGENEOUS)
def test_alpha_over_r_scales_keep_an_identical_product_across_ranks(name: str) -> None:
    # Prepare: alpha = 8, so rank 2 has scale 4 and rank 4 has scale 2; both mean the same update
    gen = torch.Generator().manual_seed(5)
    A, B_tilde = _random(gen, 2, 3, 4, 1.0).A, _random(gen, 2, 3, 4, 1.0).B
    extra_rows = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    low = LoraFactors(A, B_tilde / 4.0, 4.0)
    high = LoraFactors(
        torch.cat([A, extra_rows]), torch.cat([B_tilde / 2.0, torch.zeros(3, 2)], dim=1), 2.0
    )
    product = B_tilde @ A
    updates = [_update(1, {"l": low}), _update(3, {"l": high})]

    # Execute
    result = aggregate(name, updates)  # type: ignore[arg-type]

    # Assert
    for update, state in zip(updates, result.client_states, strict=True):
        got = state.lora["l"]
        assert (got.rank, got.scale) == (update.state.lora["l"].rank, update.state.lora["l"].scale)
        assert_close(got.delta(), product, **TIGHT)


def test_fedavg_folds_each_clients_scale_into_b() -> None:
    # Prepare: A_g = (1 + 3) / 2 = 2; B~_g = (4 * 1 + 1 * 2) / 2 = 3
    a = LoraFactors(_t([[1.0]]), _t([[1.0]]), 4.0)
    b = LoraFactors(_t([[3.0]]), _t([[2.0]]), 1.0)
    updates = [_update(5, {"l": a}), _update(5, {"l": b})]

    # Execute
    result = aggregate("fedavg", updates)

    # Assert
    got_a, got_b = (state.lora["l"] for state in result.client_states)
    assert_close(got_a.A, _t([[2.0]]), **EXACT)
    assert_close(got_a.B, _t([[0.75]]), **EXACT)
    assert got_a.scale == 4.0
    assert_close(got_b.B, _t([[3.0]]), **EXACT)
    assert got_b.scale == 1.0


# --- rbla against zero padding ----------------------------------------------------------------


def _rank2_and_rank4() -> list[ClientUpdate]:
    """Client a: rank 2, n 1, scale 2; client b: rank 4, n 3, scale 1 (p = 1/4, 3/4)."""
    a = LoraFactors(_t([[1, 1], [2, 2]]), _t([[0.5, 1.0]]), 2.0)  # B~ = [[1, 2]]
    b = LoraFactors(_t([[3, 3], [4, 4], [8, 8], [12, 12]]), _t([[3, 6, 8, 4]]), 1.0)
    return [_update(1, {"l": a}), _update(3, {"l": b})]


def test_rbla_takes_high_rank_rows_from_the_rank4_client_alone() -> None:
    # Prepare: rows 1-2 = 1/4 a + 3/4 b; rows 3-4 = b's
    updates = _rank2_and_rank4()

    # Execute
    result = aggregate("rbla", updates)

    # Assert
    g = result.global_state.lora["l"]
    assert_close(g.A, _t([[2.5, 2.5], [3.5, 3.5], [8, 8], [12, 12]]), **EXACT)
    assert_close(g.B, _t([[2.5, 5, 8, 4]]), **EXACT)
    assert g.scale == 1.0
    a, b = (state.lora["l"] for state in result.client_states)
    assert_close(a.A, _t([[2.5, 2.5], [3.5, 3.5]]), **EXACT)
    assert_close(a.B, _t([[1.25, 2.5]]), **EXACT)  # B~ / 2
    assert_close(b.A, g.A, **EXACT)


def test_zeropad_dilutes_high_rank_rows_over_all_clients() -> None:
    # Prepare: rows 3-4 = 3/4 b + 1/4 * 0
    updates = _rank2_and_rank4()

    # Execute
    result = aggregate("zeropad", updates)

    # Assert
    g = result.global_state.lora["l"]
    assert_close(g.A, _t([[2.5, 2.5], [3.5, 3.5], [6, 6], [9, 9]]), **EXACT)
    assert_close(g.B, _t([[2.5, 5, 6, 3]]), **EXACT)
    a = result.client_states[0].lora["l"]
    assert_close(a.A, _t([[2.5, 2.5], [3.5, 3.5]]), **EXACT)
    assert_close(a.B, _t([[1.25, 2.5]]), **EXACT)


def test_rbla_equals_fedavg_when_ranks_are_equal() -> None:
    # Prepare
    gen = torch.Generator().manual_seed(13)
    updates = [
        _update(n, {"l": _random(gen, 3, 4, 5, s)}) for n, s in [(1, 2.0), (4, 0.5), (2, 1.0)]
    ]

    # Execute
    rbla, fedavg = aggregate("rbla", updates), aggregate("fedavg", updates)

    # Assert
    for x, y in zip(
        [rbla.global_state, *rbla.client_states],
        [fedavg.global_state, *fedavg.client_states],
        strict=True,
    ):
        assert x.lora["l"].scale == y.lora["l"].scale
        assert_close(x.lora["l"].A, y.lora["l"].A, **TIGHT)
        assert_close(x.lora["l"].B, y.lora["l"].B, **TIGHT)


# --- hetlora ----------------------------------------------------------------------------------


def test_hetlora_weights_by_the_norm_of_the_scaled_update() -> None:
    # Prepare: ||2 * 1.5||_F = 3 and ||1 * 1||_F = 1 -> weights 3/4, 1/4 (n would say 1/4, 3/4)
    a = LoraFactors(_t([[1.0]]), _t([[1.5]]), 2.0)
    b = LoraFactors(_t([[1.0]]), _t([[1.0]]), 1.0)
    updates = [_update(1, {"l": a}), _update(3, {"l": b})]

    # Execute
    result = aggregate("hetlora", updates)

    # Assert: B~_g = 3/4 * 3 + 1/4 * 1 = 2.5
    got_a, got_b = (state.lora["l"] for state in result.client_states)
    assert_close(got_a.B, _t([[1.25]]), **EXACT)
    assert_close(got_b.B, _t([[2.5]]), **EXACT)
    assert_close(got_b.A, _t([[1.0]]), **EXACT)


def test_hetlora_falls_back_to_sample_weights_when_every_update_is_zero() -> None:
    # Prepare: B = 0 everywhere; A_g = 1/4 * 1 + 3/4 * 5 = 4
    a = LoraFactors(_t([[1.0]]), _t([[0.0]]), 1.0)
    b = LoraFactors(_t([[5.0]]), _t([[0.0]]), 1.0)
    updates = [_update(1, {"l": a}), _update(3, {"l": b})]

    # Execute
    result = aggregate("hetlora", updates)

    # Assert
    assert_close(result.global_state.lora["l"].A, _t([[4.0]]), **EXACT)


# --- flexlora ---------------------------------------------------------------------------------


def test_flexlora_reproduces_the_full_product_when_its_rank_fits() -> None:
    # Prepare: client a's row lies in the span of b's rows, so rank(W) <= 3 = r_max
    gen = torch.Generator().manual_seed(17)
    b = _random(gen, 3, 5, 6, 4.0 / 3)
    a = LoraFactors(0.5 * b.A[:1] - 2.0 * b.A[2:], _random(gen, 1, 5, 6, 1.0).B, 4.0)
    updates = [_update(1, {"l": a}), _update(3, {"l": b})]
    W = _dense_mean(updates, "l")

    # Execute
    result = aggregate("flexlora", updates)

    # Assert
    assert_close(result.global_state.lora["l"].delta(), W, **TIGHT)
    assert_close(result.client_states[1].lora["l"].delta(), W, **TIGHT)


def test_flexlora_gives_each_client_the_best_approximation_at_its_rank() -> None:
    # Prepare: generic W of rank 4 from ranks 1 and 3
    gen = torch.Generator().manual_seed(19)
    updates = [
        _update(2, {"l": _random(gen, 1, 5, 6, 8.0)}),
        _update(3, {"l": _random(gen, 3, 5, 6, 8.0 / 3)}),
    ]
    W = _dense_mean(updates, "l")
    S = torch.linalg.svdvals(W)

    # Execute
    result = aggregate("flexlora", updates)

    # Assert: Eckart-Young, ||W - W_r||_F^2 = sum_{j >= r} S_j^2
    for r, state in zip([1, 3], result.client_states, strict=True):
        residual = torch.linalg.matrix_norm(W - state.lora["l"].delta()) ** 2
        assert_close(residual, (S[r:] ** 2).sum(), **TIGHT)


def test_flexlora_pads_when_the_layer_is_thinner_than_the_rank() -> None:
    # Prepare: a 2 x 3 layer holds at most 2 triplets, the client has rank 3
    gen = torch.Generator().manual_seed(23)
    updates = [
        _update(1, {"l": _random(gen, 3, 2, 3, 1.0)}),
        _update(1, {"l": _random(gen, 3, 2, 3, 1.0)}),
    ]

    # Execute
    result = aggregate("flexlora", updates)

    # Assert
    got = result.client_states[0].lora["l"]
    assert got.rank == 3
    assert_close(got.A[2], torch.zeros(3, dtype=torch.float64), **EXACT)
    assert_close(got.delta(), _dense_mean(updates, "l"), **TIGHT)


def test_flexlora_splits_each_triplet_symmetrically() -> None:
    # Prepare
    gen = torch.Generator().manual_seed(31)
    updates = [
        _update(1, {"l": _random(gen, 2, 5, 6, 4.0)}),
        _update(2, {"l": _random(gen, 3, 5, 6, 0.5)}),
    ]
    root = torch.linalg.svdvals(_dense_mean(updates, "l")).sqrt()

    # Execute
    result = aggregate("flexlora", updates)

    # Assert: ||A[k]|| = ||s B[:, k]|| = sqrt(S_k)
    for state in [result.global_state, *result.client_states]:
        f = state.lora["l"]
        assert_close(torch.linalg.vector_norm(f.A, dim=1), root[: f.rank], **TIGHT)
        assert_close(torch.linalg.vector_norm(f.scale * f.B, dim=0), root[: f.rank], **TIGHT)


# --- rbla_svd and rbla_product ---------------------------------------------------------------


def _embed(rows: list[list[float]], d_out: int, d_in: int) -> torch.Tensor:
    """A small matrix in the top-left corner of a ``[d_out, d_in]`` zero matrix."""
    out = torch.zeros(d_out, d_in, dtype=torch.float64)
    block = _t(rows)
    out[: block.shape[0], : block.shape[1]] = block
    return out


def _factors(A: list[list[float]], B: list[list[float]], scale: float, d: int) -> LoraFactors:
    """Hand-written 2 x 2 factors padded into a d x d layer (d = 4 takes the QR route)."""
    return LoraFactors(_embed(A, len(A), d), _embed(B, d, len(B[0])), scale)


def _svd_hand_round(d: int) -> list[ClientUpdate]:
    """p = 1/2, 1/2. Client a: rank 1, scale 2, B~ = [3, 0]^T; b: rank 2, scale 1/2.

    RBLA: slot 0 = mean([3, 0], [-1, 0]) = [1, 0] for A and B~, slot 1 = b's [0, -2]: the merged
    product is diag(1, 4), with the weaker direction in slot 0.
    """
    a = _factors([[3, 0]], [[1.5], [0]], 2.0, d)
    b = _factors([[-1, 0], [0, -2]], [[-2, 0], [0, -4]], 0.5, d)
    return [_update(1, {"l": a}), _update(1, {"l": b})]


@pytest.mark.parametrize("d", [2, 4])
def test_rbla_svd_moves_the_strongest_direction_into_slot_0(d: int) -> None:
    # Prepare: diag(1, 4) = 4 e2 e2^T + 1 e1 e1^T, so B~ = [[0, 1], [2, 0]] = A^T
    updates = _svd_hand_round(d)

    # Execute
    result = aggregate("rbla_svd", updates)

    # Assert: client a (scale 2) now holds the direction of strength 4, not RBLA's of strength 1
    # (both strengths above 1/3: each factor gets sqrt(S))
    a, b = (state.lora["l"] for state in result.client_states)
    assert_close(a.A, _embed([[0, 2]], 1, d), **TIGHT)
    assert_close(a.B, _embed([[0], [1]], d, 1), **TIGHT)  # B~ / 2
    assert_close(b.A, _embed([[0, 2], [1, 0]], 2, d), **TIGHT)
    assert_close(b.B, _embed([[0, 2], [4, 0]], d, 2), **TIGHT)  # B~ / (1/2)
    assert_close(result.global_state.lora["l"].delta(), _embed([[1, 0], [0, 4]], d, d), **TIGHT)
    rbla_a = aggregate("rbla", updates).client_states[0].lora["l"]
    assert_close(rbla_a.delta(), _embed([[1, 0], [0, 0]], d, d), **TIGHT)


def _product_hand_round(d: int) -> list[ClientUpdate]:
    """p = 1/4, 3/4. Client a: rank 1, scale 2, a_0 = 4 e1 e1^T; b: rank 2, scale 1,
    b_0 = [0, 4]^T [0, 3] = 12 e2 e2^T, b_1 = [3, 0]^T [1, 0] = 3 e1 e1^T."""
    a = _factors([[2, 0]], [[1], [0]], 2.0, d)
    b = _factors([[0, 3], [1, 0]], [[0, 3], [4, 0]], 1.0, d)
    return [_update(1, {"l": a}), _update(3, {"l": b})]


@pytest.mark.parametrize("d", [2, 4])
def test_rbla_product_sums_rank_one_products_with_per_slot_weights(d: int) -> None:
    # Prepare: W = 1/4 a_0 + 3/4 b_0 + 1 b_1 = diag(1 + 3, 9); S = (9, 4)
    updates = _product_hand_round(d)

    # Execute
    result = aggregate("rbla_product", updates)

    # Assert: roots 3, 2 (both strengths above 1/3: each factor gets sqrt(S))
    g = result.global_state.lora["l"]
    assert g.scale == 1.0
    assert_close(g.delta(), _embed([[4, 0], [0, 9]], d, d), **TIGHT)
    assert_close(g.A, _embed([[0, 3], [2, 0]], 2, d), **TIGHT)
    assert_close(g.B, _embed([[0, 2], [3, 0]], d, 2), **TIGHT)
    a = result.client_states[0].lora["l"]
    assert_close(a.A, _embed([[0, 3]], 1, d), **TIGHT)
    assert_close(a.B, _embed([[0], [1.5]], d, 1), **TIGHT)  # B~ / 2


def test_rbla_product_has_neither_rblas_cross_terms_nor_flexloras_dilution() -> None:
    # Prepare: RBLA's slot 0 is [1/2, 3]^T [1/2, 9/4]: cross terms off the diagonal.
    # FlexLoRA weights b_1 by p_b = 3/4: diag(1 + 9/4, 9).
    updates = _product_hand_round(2)

    # Execute
    rbla, flexlora = (aggregate(name, updates) for name in ("rbla", "flexlora"))  # type: ignore[arg-type]

    # Assert
    assert_close(rbla.global_state.lora["l"].delta(), _t([[3.25, 1.125], [1.5, 6.75]]), **TIGHT)
    assert_close(flexlora.global_state.lora["l"].delta(), _t([[3.25, 0], [0, 9]]), **TIGHT)


def _rank_weighted_product(updates: list[ClientUpdate], layer: str) -> torch.Tensor:
    """``sum_k sum_{i: r_i > k} (p_i / P_k) s_i B_i[:, k] A_i[k]``, slot by slot, densely."""
    factors = [u.state.lora[layer] for u in updates]
    n = [float(u.n_samples) for u in updates]
    W = torch.zeros_like(factors[0].delta())
    for k in range(max(f.rank for f in factors)):
        covering = [i for i, f in enumerate(factors) if f.rank > k]
        total = sum(n[i] for i in covering)
        for i in covering:
            f = factors[i]
            W += (n[i] / total) * f.scale * torch.outer(f.B[:, k], f.A[k])
    return W


def _truncate(W: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of W by a dense SVD (Eckart-Young)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


SHAPES = [(6, 7), (9, 8)]  # rbla_product's stack of rank 6 takes the dense route, then QR


def _wide_round(d_out: int, d_in: int, ranks: tuple[int, ...] = (1, 2, 3)) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(37)
    return [
        _update(n, {"l": _random(gen, r, d_out, d_in, 8.0 / r)})
        for n, r in zip([4, 1, 3], ranks, strict=True)
    ]


@pytest.mark.parametrize("shape", SHAPES)
def test_rbla_svd_changes_the_basis_of_rblas_product_only(shape: tuple[int, int]) -> None:
    # Prepare
    updates = _wide_round(*shape)

    # Execute
    svd, rbla = aggregate("rbla_svd", updates), aggregate("rbla", updates)

    # Assert
    got, want = svd.global_state.lora["l"], rbla.global_state.lora["l"]
    assert (got.rank, got.scale) == (want.rank, want.scale)
    assert_close(got.delta(), want.delta(), rtol=1e-12, atol=1e-12)
    for x, y in zip(svd.client_states, rbla.client_states, strict=True):
        assert x.num_bytes() == y.num_bytes()


@pytest.mark.parametrize("shape", SHAPES)
def test_rbla_product_is_the_top_slots_of_the_rank_weighted_product(
    shape: tuple[int, int],
) -> None:
    # Prepare
    updates = _wide_round(*shape)
    W = _rank_weighted_product(updates, "l")

    # Execute
    result = aggregate("rbla_product", updates)

    # Assert
    assert_close(result.global_state.lora["l"].delta(), _truncate(W, 3), **TIGHT)


@pytest.mark.parametrize("d", [2, 4])
def test_rbla_tiered_refactors_each_rank_tier_on_its_own(d: int) -> None:
    # Prepare: tier [0, 1) is covered by a and b: W_0 = 1/4 a_0 + 3/4 b_0 = diag(1, 9), top slot
    # 9 e2 e2^T; tier [1, 2) by b alone (weight 1): W_1 = b_1 = 3 e1 e1^T. rbla_product would
    # sort diag(4, 9) across the tiers instead (see the test above).
    updates = _product_hand_round(d)

    # Execute
    result = aggregate("rbla_tiered", updates)

    # Assert: roots 3 and sqrt(3), both above 1/sqrt(3)
    g = result.global_state.lora["l"]
    root3 = 3**0.5
    assert_close(g.delta(), _embed([[3, 0], [0, 9]], d, d), **TIGHT)
    assert_close(g.A, _embed([[0, 3], [root3, 0]], 2, d), **TIGHT)
    assert_close(g.B, _embed([[0, root3], [3, 0]], d, 2), **TIGHT)
    a = result.client_states[0].lora["l"]
    assert_close(a.A, _embed([[0, 3]], 1, d), **TIGHT)
    assert_close(a.B, _embed([[0], [1.5]], d, 1), **TIGHT)  # B~ / 2


@pytest.mark.parametrize("shape", SHAPES)
def test_rbla_tiered_keeps_each_tier_the_top_slots_of_its_own_weighted_product(
    shape: tuple[int, int],
) -> None:
    # Prepare: ranks 1, 2, 3 (weights 4, 1, 3): tiers [0, 1), [1, 2), [2, 3), one slot each,
    # covered by all three, by the last two, by the last one
    updates = _wide_round(*shape)
    factors = [u.state.lora["l"] for u in updates]
    n = [4.0, 1.0, 3.0]

    def tier(k: int) -> torch.Tensor:
        covering = [i for i, f in enumerate(factors) if f.rank > k]
        total = sum(n[i] for i in covering)
        terms = [
            (n[i] / total) * factors[i].scale * torch.outer(factors[i].B[:, k], factors[i].A[k])
            for i in covering
        ]
        return _truncate(torch.stack(terms).sum(dim=0), 1)

    # Execute
    result = aggregate("rbla_tiered", updates)

    # Assert: slot k's rank-one product is tier k's best rank-one approximation; client i
    # holds exactly its tiers; the bytes are RBLA's
    g = result.global_state.lora["l"]
    for k in range(3):
        assert_close(g.scale * torch.outer(g.B[:, k], g.A[k]), tier(k), **TIGHT)
    for i, state in enumerate(result.client_states):
        assert_close(state.lora["l"].delta(), sum(tier(k) for k in range(i + 1)), **TIGHT)
    rbla = aggregate("rbla", updates)
    for x, y in zip(result.client_states, rbla.client_states, strict=True):
        assert x.num_bytes() == y.num_bytes()


def test_rbla_tiered_is_rbla_product_when_ranks_are_equal() -> None:
    # Prepare: one tier holding every slot
    updates = _wide_round(9, 8, ranks=(3, 3, 3))

    # Execute
    tiered, product = aggregate("rbla_tiered", updates), aggregate("rbla_product", updates)

    # Assert
    _assert_same_factors(tiered, product)


@pytest.mark.parametrize("name", SVD_BASIS)
@pytest.mark.parametrize("shape", SHAPES)
def test_each_client_gets_the_best_approximation_of_the_global_product(
    name: str, shape: tuple[int, int]
) -> None:
    # Prepare
    updates = _wide_round(*shape)

    # Execute
    result = aggregate(name, updates)  # type: ignore[arg-type]

    # Assert
    W = result.global_state.lora["l"].delta()
    for update, state in zip(updates, result.client_states, strict=True):
        rank = update.state.lora["l"].rank
        assert_close(state.lora["l"].delta(), _truncate(W, rank), **TIGHT)


def test_flexlora_slots_are_balanced_with_non_increasing_strength_and_fixed_signs() -> None:
    # Prepare
    updates = _wide_round(9, 8)

    # Execute
    g = aggregate("flexlora", updates).global_state.lora["l"]

    # Assert: ||A[k]|| = ||s B[:, k]|| = sqrt(S_k), S non-increasing, each B column's
    # largest-magnitude entry positive
    row, col = torch.linalg.vector_norm(g.A, dim=1), torch.linalg.vector_norm(g.scale * g.B, dim=0)
    assert_close(row, col, **TIGHT)
    assert bool((row[:-1] >= row[1:]).all())
    peak = g.B.gather(0, g.B.abs().argmax(dim=0, keepdim=True))
    assert bool((peak > 0).all())


@pytest.mark.parametrize("name", ["rbla_svd", "rbla_product"])
def test_no_slot_s_a_row_falls_below_lora_s_initial_norm(name: str) -> None:
    # Prepare: updates scaled so that the product's strengths straddle 1/3
    updates = [
        _update(u.n_samples, {"l": LoraFactors(f.A, f.B * 0.02, f.scale)})
        for u in _wide_round(9, 8)
        for f in [u.state.lora["l"]]
    ]

    # Execute
    g = aggregate(name, updates).global_state.lora["l"]  # type: ignore[arg-type]

    # Assert: ||A[k]|| = max(sqrt(S_k), 1/sqrt(3)) (Kaiming-uniform's expected row norm),
    # ||s B[:, k]|| = S_k / ||A[k]||, rows orthogonal; each B column's largest entry positive
    S = torch.linalg.svdvals(g.delta())[: g.rank]
    assert bool((S.sqrt() > INIT_ROW_NORM).any()) and bool((S.sqrt() < INIT_ROW_NORM).any())
    row, col = torch.linalg.vector_norm(g.A, dim=1), torch.linalg.vector_norm(g.scale * g.B, dim=0)
    assert_close(row, S.sqrt().clamp(min=INIT_ROW_NORM), rtol=1e-9, atol=1e-12)
    assert_close(col, S / row, rtol=1e-9, atol=1e-12)
    assert_close(g.A @ g.A.T, torch.diag(row**2), rtol=0.0, atol=1e-12)
    peak = g.B.gather(0, g.B.abs().argmax(dim=0, keepdim=True))
    assert bool((peak > 0).all())


def _assert_same_factors(x: AggregationResult, y: AggregationResult) -> None:
    """The same factors, bit for bit, in the global state and in every client's."""
    for a, b in zip(
        [x.global_state, *x.client_states], [y.global_state, *y.client_states], strict=True
    ):
        for layer in a.lora:
            assert_close(a.lora[layer].A, b.lora[layer].A, **EXACT)
            assert_close(a.lora[layer].B, b.lora[layer].B, **EXACT)


@pytest.mark.parametrize("name", SVD_SLOTS)
def test_svd_basis_aggregators_repeat_bit_for_bit(name: str) -> None:
    # Prepare
    updates = _round(UNEVEN_RANKS)

    # Execute
    first, second = (aggregate(name, updates) for _ in range(2))  # type: ignore[arg-type]

    # Assert
    _assert_same_factors(first, second)


def test_rbla_product_hands_out_flexloras_products_when_ranks_are_equal() -> None:
    # Prepare: P_k = 1 for every slot, so the weights are p_i
    updates = _wide_round(9, 8, ranks=(3, 3, 3))

    # Execute
    product, flexlora = aggregate("rbla_product", updates), aggregate("flexlora", updates)

    # Assert: the same products; only the split of S between the factors differs
    for x, y in zip(
        [product.global_state, *product.client_states],
        [flexlora.global_state, *flexlora.client_states],
        strict=True,
    ):
        assert_close(x.lora["l"].delta(), y.lora["l"].delta(), **TIGHT)
    W = _truncate(_dense_mean(updates, "l"), 3)
    assert_close(product.global_state.lora["l"].delta(), W, **TIGHT)


@pytest.mark.parametrize("name", ["rbla_svd", "rbla_product", "rbla_tiered"])
def test_one_client_gets_its_own_product_back_in_the_svd_basis(name: str) -> None:
    # Prepare
    gen = torch.Generator().manual_seed(41)
    mine = _random(gen, 3, 9, 8, 0.25)

    # Execute
    got = aggregate(name, [_update(5, {"l": mine})]).client_states[0].lora["l"]  # type: ignore[arg-type]

    # Assert
    assert (got.rank, got.scale) == (3, 0.25)
    assert_close(got.delta(), mine.delta(), **TIGHT)
    assert_close(got.A @ got.A.T, torch.diag((got.A**2).sum(dim=1)), **TIGHT)  # orthogonal rows


@pytest.mark.parametrize("name", SVD_BASIS)
def test_a_layer_thinner_than_the_rank_gets_zero_slots_beyond_it(name: str) -> None:
    # Prepare: a 2 x 3 layer holds at most 2 directions; ranks 3 and 2
    gen = torch.Generator().manual_seed(43)
    updates = [
        _update(1, {"l": _random(gen, 3, 2, 3, 1.0)}),
        _update(2, {"l": _random(gen, 2, 2, 3, 1.5)}),
    ]

    # Execute
    g = aggregate(name, updates).global_state.lora["l"]  # type: ignore[arg-type]

    # Assert
    assert g.rank == 3
    assert_close(g.A[2], torch.zeros(3, dtype=torch.float64), **EXACT)
    assert_close(g.B[:, 2], torch.zeros(2, dtype=torch.float64), **EXACT)


@pytest.mark.parametrize("name", SVD_SLOTS)
def test_all_zero_updates_give_a_zero_product(name: str) -> None:
    # Prepare: LoRA's B starts at zero
    zero = [
        LoraFactors(
            torch.ones(r, 8, dtype=torch.float64), torch.zeros(9, r, dtype=torch.float64), 1.0
        )
        for r in (1, 2)
    ]
    updates = [_update(1, {"l": zero[0]}), _update(2, {"l": zero[1]})]

    # Execute
    result = aggregate(name, updates)  # type: ignore[arg-type]

    # Assert: FlexLoRA's slots are dead (A = B = 0); the others keep A at LoRA's initial norm,
    # so every slot trains next round as from LoRA's initialisation (B = 0)
    for state in [result.global_state, *result.client_states]:
        f = state.lora["l"]
        assert_close(f.B, torch.zeros_like(f.B), **EXACT)
        norms = torch.linalg.vector_norm(f.A, dim=1)
        want = 0.0 if name == "flexlora" else INIT_ROW_NORM
        assert_close(norms, torch.full_like(norms, want), **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", SVD_SLOTS)
def test_half_precision_factors_keep_their_dtype(name: str, dtype: torch.dtype) -> None:
    # Prepare
    exact = _wide_round(9, 8)
    updates = [
        _update(
            u.n_samples,
            {"l": LoraFactors(f.A.to(dtype), f.B.to(dtype), f.scale)},
        )
        for u in exact
        for f in [u.state.lora["l"]]
    ]

    # Execute
    half, full = aggregate(name, updates), aggregate(name, exact)  # type: ignore[arg-type]

    # Assert
    for x, y in zip(half.client_states, full.client_states, strict=True):
        f = x.lora["l"]
        assert (f.A.dtype, f.B.dtype) == (dtype, dtype)
        W = y.lora["l"].delta()
        err = torch.linalg.matrix_norm(f.delta().to(torch.float64) - W)
        assert float(err) <= 0.05 * float(torch.linalg.matrix_norm(W))


# --- flora ------------------------------------------------------------------------------------


def test_flora_base_delta_is_the_exact_weighted_sum_of_products() -> None:
    # Prepare
    gen = torch.Generator().manual_seed(29)
    updates = [
        _update(n, {"l": _random(gen, r, 4, 5, 4.0 / r)}) for n, r in [(1, 1), (2, 2), (5, 3)]
    ]

    # Execute
    result = aggregate("flora", updates)

    # Assert
    W = _dense_mean(updates, "l")
    assert_close(result.base_delta["l"], W, **TIGHT)
    stacked = result.global_state.lora["l"]
    assert (stacked.rank, stacked.scale) == (6, 1.0)
    assert_close(stacked.delta(), W, **TIGHT)
    assert all(state.lora == {} for state in result.client_states)


# --- fedex ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [EVEN_RANKS, UNEVEN_RANKS])
def test_fedex_global_model_is_the_exact_weighted_average_of_the_clients(
    ranks: list[dict[str, int]],
) -> None:
    # Prepare
    updates = _round(ranks)

    # Execute
    result = aggregate("fedex", updates)
    zeropad = aggregate("zeropad", updates)

    # Assert: the factors are zeropad's (FedAvg at one rank); factors plus residual are exact
    for layer in ("l1", "l2"):
        g = result.global_state.lora[layer]
        assert_close(g.A, zeropad.global_state.lora[layer].A, **EXACT)
        assert_close(g.B, zeropad.global_state.lora[layer].B, **EXACT)
        exact = _dense_mean(updates, layer)
        assert_close(result.base_delta[layer] + g.delta(), exact, **TIGHT)
        assert not result.fresh


def test_fedex_residual_is_the_cross_terms_factor_averaging_adds() -> None:
    # Prepare: two equal-weight rank-1 clients: mean(B A) - mean(B) mean(A) = (B1-B2)(A1-A2)/4
    A1, A2, B1, B2 = _t([[1.0, 0.0]]), _t([[0.0, 2.0]]), _t([[3.0], [1.0]]), _t([[1.0], [-1.0]])
    updates = [
        _update(1, {"l": LoraFactors(A1, B1, 1.0)}),
        _update(1, {"l": LoraFactors(A2, B2, 1.0)}),
    ]

    # Execute
    result = aggregate("fedex", updates)

    # Assert
    assert_close(result.base_delta["l"], (B1 - B2) @ (A1 - A2) / 4, **TIGHT)


# --- extras and bad input ---------------------------------------------------------------------


def test_fedavg_extra_is_sample_weighted_and_keeps_the_dtype() -> None:
    # Prepare: (1 * [1, 2] + 3 * [5, 6]) / 4 = [4, 5]
    lora = {"l": LoraFactors(_t([[1.0]]), _t([[1.0]]), 1.0)}
    updates = [
        _update(1, lora, {"w": torch.tensor([1.0, 2.0], dtype=torch.float32)}),
        _update(3, lora, {"w": torch.tensor([5.0, 6.0], dtype=torch.float32)}),
    ]

    # Execute
    extra = fedavg_extra(updates)

    # Assert
    assert extra["w"].dtype == torch.float32
    assert_close(extra["w"], torch.tensor([4.0, 5.0]), **EXACT)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_downloaded_extras_are_independent_copies(name: str) -> None:
    # Prepare
    updates = _round(EVEN_RANKS)
    result = aggregate(name, updates)  # type: ignore[arg-type]
    expected = result.global_state.extra["head"].clone()

    # Execute: one client trains its head in place
    result.client_states[0].extra["head"].add_(1.0)

    # Assert
    assert_close(result.client_states[1].extra["head"], expected, **EXACT)
    assert_close(result.global_state.extra["head"], expected, **EXACT)


def _one(rank: int = 1, d_out: int = 2, d_in: int = 2, scale: float = 1.0) -> LoraFactors:
    return LoraFactors(
        torch.ones(rank, d_in, dtype=torch.float64),
        torch.ones(d_out, rank, dtype=torch.float64),
        scale,
    )


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize(
    ("second", "message"),
    [
        (_update(1, {"other": _one()}), r"LoRA layers \['other'\], expected \['l'\]"),
        (_update(1, {"l": _one()}, {"head": torch.zeros(2)}), r"extra tensors \['head'\]"),
        (_update(1, {"l": _one(d_in=3)}), r"'l': \[d_out, d_in\] is \[2, 3\], expected \[2, 2\]"),
        (_update(1, {"l": _one(scale=0.0)}), r"'l': scale must be > 0, got 0.0"),
    ],
)
def test_mismatched_clients_raise(name: str, second: ClientUpdate, message: str) -> None:
    # Prepare
    updates = [_update(1, {"l": _one()}), second]

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        aggregate(name, updates)  # type: ignore[arg-type]


def test_mismatched_extra_shapes_raise() -> None:
    # Prepare
    updates = [
        _update(1, {"l": _one()}, {"head": torch.zeros(2)}),
        _update(1, {"l": _one()}, {"head": torch.zeros(3)}),
    ]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"extra 'head': shape \[3\], expected \[2\]"):
        fedavg_extra(updates)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_no_updates_raise(name: str) -> None:
    with pytest.raises(ValueError, match="at least one ClientUpdate"):
        aggregate(name, [])  # type: ignore[arg-type]


# Three clients, three labels; label 2 only at client 2 (the highest rank at fc2).
LABELS = [[5, 0, 0], [0, 3, 0], [1, 1, 4]]


@pytest.mark.parametrize(
    ("ranks", "histogram", "expected"),
    [
        # fc1 tiers: >= 2 {0, 1, 2}, >= 4 {1, 2}, >= 8 {2}; client 2 holds every label
        ([{"fc1": 2}, {"fc1": 4}, {"fc1": 8}], LABELS, None),
        # tier >= 4 is {1, 2}: client 2 now lacks label 0, client 1 holds only label 1
        (
            [{"fc1": 2}, {"fc1": 4}, {"fc1": 8}],
            [[5, 0, 0], [0, 3, 0], [0, 1, 4]],
            LabelGap("fc1", 4, 2, 2, 3),
        ),
        # fc1 is covered, fc2's top tier {1} holds label 1 of 3
        (
            [{"fc1": 2, "fc2": 2}, {"fc1": 2, "fc2": 6}, {"fc1": 8, "fc2": 4}],
            LABELS,
            LabelGap("fc2", 6, 1, 1, 3),
        ),
        # equal ranks: one tier, every client
        ([{"fc1": 4}, {"fc1": 4}, {"fc1": 4}], LABELS, None),
        # a label nobody holds does not count: client 2 holds both of the federation's labels
        ([{"fc1": 2}, {"fc1": 2}, {"fc1": 8}], [[5, 0, 0], [0, 0, 2], [1, 0, 4]], None),
    ],
)
def test_tier_label_gap_names_the_first_tier_missing_a_label(
    ranks: list[dict[str, int]], histogram: list[list[int]], expected: LabelGap | None
) -> None:
    # Execute
    gap = tier_label_gap(ranks, np.array(histogram))

    # Assert
    assert gap == expected


def test_tier_label_gap_of_a_round_looks_at_its_clients_only() -> None:
    # Prepare: client 2 (rank 8) holds label 2 alone; rounds that merge it and rounds that don't
    ranks = [{"fc1": 2}, {"fc1": 4}, {"fc1": 8}]

    # Execute
    with_2 = tier_label_gap(ranks, np.array(LABELS), members=[1, 2])
    without_2 = tier_label_gap(ranks, np.array(LABELS), members=[0, 1])

    # Assert: tiers of {1, 2}: >= 4 {1, 2}, >= 8 {2}, each with all three labels; of {0, 1}:
    # >= 2 {0, 1} misses label 2, which the federation holds
    assert with_2 is None
    assert without_2 == LabelGap("fc1", 2, 2, 2, 3)


def test_tier_label_gap_reads_as_a_sentence_and_checks_the_histogram() -> None:
    assert str(LabelGap("fc2", 6, 1, 1, 3)) == (
        "the 1 client(s) of fc2 rank >= 6 hold 1 of the federation's 3 labels"
    )
    with pytest.raises(ValueError, match=r"expected \[2 clients, n_classes\], got shape \(3, 3\)"):
        tier_label_gap([{"fc1": 2}, {"fc1": 4}], np.array(LABELS))
