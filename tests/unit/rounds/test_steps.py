"""One round's pure steps: downloads, initial states, communication, divergence, metrics."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from autorank.engine.jobs import ClientOutcome
from autorank.engine.local import LocalResult
from autorank.lora.adapters import AdapterState, AggregationResult, LoraFactors
from autorank.lora.peft import get_adapter_state, wrap_lora
from autorank.lora.settings import LoraSettings
from autorank.models.evaluation import EvalResult
from autorank.models.zoo import build_model
from autorank.ranking.assignment import max_ranks
from autorank.rounds.steps import (
    DivergenceError,
    RoundReport,
    check_finite,
    client_parameters,
    communication,
    download,
    initial_state,
    keep_uncovered,
    residual_after_keeping,
    start_state,
)

FIXED = LoraSettings(policy="fixed", alpha=8.0, alpha_ratio=2.0, dropout=0.0, head=("head",))


def _result(client: int, losses: tuple[float, ...], state: AdapterState) -> LocalResult:
    return LocalResult(client, state, 10, losses, 0.1, 5)


def _state(rank: int, scale: float = 1.0) -> AdapterState:
    gen = torch.Generator().manual_seed(rank)
    A = torch.randn(rank, 3, generator=gen, dtype=torch.float64)
    B = torch.randn(2, rank, generator=gen, dtype=torch.float64)
    return AdapterState({"fc1": LoraFactors(A, B, scale)}, {"head.bias": torch.zeros(2)})


def test_download_keeps_each_component_product_at_the_clients_scale() -> None:
    global_state = _state(4, scale=8.0 / 4)

    got = download(global_state, {"fc1": 2}, FIXED)

    factors = got.lora["fc1"]
    assert factors.rank == 2 and factors.scale == 8.0 / 2
    want = global_state.lora["fc1"]
    assert_close(factors.delta(), want.scale * want.B[:, :2] @ want.A[:2])


def test_initial_state_is_peft_s_seeded_init_at_the_maximum_ranks() -> None:
    # Prepare
    base = build_model("mlp", input_shape=(1, 4, 4), n_classes=3, hidden=(8, 6), seed=0)
    ranks = [{"fc1": 2, "fc2": 1}, {"fc1": 4, "fc2": 3}]

    # Execute
    got = initial_state(base, ranks, FIXED, seed=7)
    peft = get_adapter_state(
        wrap_lora(
            base,
            max_ranks(ranks),
            policy="fixed",
            alpha=8.0,
            alpha_ratio=2.0,
            dropout=0.0,
            head=("head",),
            seed=7,
        )
    )

    # Assert
    assert got.ranks() == {"fc1": 4, "fc2": 3}
    for path in ("fc1", "fc2"):
        assert_close(got.lora[path].A, peft.lora[path].A, rtol=0, atol=0)
        assert torch.count_nonzero(got.lora[path].B) == 0  # B starts at zero
        assert got.lora[path].scale == peft.lora[path].scale
    assert sorted(got.extra) == sorted(peft.extra)
    assert_close(got.extra["head.weight"], base.head.weight, rtol=0, atol=0)


def test_start_state_is_the_download_or_fresh_adapters_after_a_merge() -> None:
    global_state = _state(4, scale=8.0 / 4)

    cut = start_state(global_state, {"fc1": 2}, FIXED, fresh=False)
    fresh = start_state(global_state, {"fc1": 2}, FIXED, fresh=True)

    assert cut.ranks() == {"fc1": 2}
    assert fresh.lora == {} and sorted(fresh.extra) == ["head.bias"]


def test_keep_uncovered_keeps_components_no_sampled_client_covered() -> None:
    # Prepare: the global adapter had rank 4 at scale 2; this round's merge only rank 2 at 4.
    previous = _state(4, scale=2.0)
    merged = _state(2, scale=4.0)

    # Execute
    got = keep_uncovered(previous, merged).lora["fc1"]

    # Assert: components 0-1 are the merge's, 2-3 the previous ones, each product preserved
    assert got.rank == 4 and got.scale == 2.0
    old, new = previous.lora["fc1"], merged.lora["fc1"]
    for k in range(4):
        src = new if k < 2 else old
        assert_close(
            got.scale * torch.outer(got.B[:, k], got.A[k]),
            src.scale * torch.outer(src.B[:, k], src.A[k]),
        )
    assert keep_uncovered(merged, previous).lora["fc1"] is previous.lora["fc1"]  # covered


def test_fedex_residual_less_the_kept_components_keeps_the_global_model_exact() -> None:
    # Prepare: a rank-4 global adapter; this round's cohort merged at rank 2 with a residual R.
    previous, merged = _state(4, scale=2.0), _state(2, scale=4.0)
    residual = torch.randn(2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    agg = AggregationResult(merged, [], base_delta={"fc1": residual})

    # Execute
    kept = keep_uncovered(previous, merged)
    got = residual_after_keeping(agg, kept)["fc1"]

    # Assert: base + kept adapter is base + merged adapter + residual, as the aggregator meant
    want = merged.lora["fc1"].delta() + residual
    assert_close(got + kept.lora["fc1"].delta(), want, rtol=0, atol=1e-12)
    assert residual_after_keeping(agg, merged)["fc1"] is residual  # nothing kept


def test_client_parameters_count_lora_at_each_rank_and_the_head() -> None:
    global_state = _state(4)  # fc1: d_in 3, d_out 2; head.bias: 2

    assert client_parameters(global_state, [{"fc1": 1}, {"fc1": 4}]) == [1 * 5 + 2, 4 * 5 + 2]


def test_communication_counts_downloads_or_the_stacked_factors_when_merged() -> None:
    results = [_result(0, (1.0, 0.5), _state(2)), _result(1, (1.0, 0.5), _state(4))]
    sliced = AggregationResult(_state(4), [_state(2), _state(4)])
    merged = AggregationResult(
        _state(6),
        [AdapterState({}, {}), AdapterState({}, {})],
        {"fc1": torch.zeros(2, 3)},
        fresh=True,
    )
    residual = torch.zeros(2, 3, dtype=torch.float64)  # FedEx-LoRA: factors and a dense residual
    exact = AggregationResult(_state(4), [_state(2), _state(4)], {"fc1": residual})

    up, down = communication(results, sliced)
    _, down_merged = communication(results, merged)
    _, down_exact = communication(results, exact)

    assert up == [_state(2).num_bytes(), _state(4).num_bytes()]
    assert down == [_state(2).num_bytes(), _state(4).num_bytes()]
    assert down_merged == [_state(6).num_bytes()] * 2
    assert down_exact == [d + 6 * 8 for d in down]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_divergence_names_the_round_and_client(bad: float) -> None:
    results = [_result(0, (1.0, 0.5), _state(2)), _result(3, (1.0, bad), _state(2))]

    with pytest.raises(DivergenceError, match=r"round 7: client 3's loss is (nan|inf)"):
        check_finite(7, results)
    with pytest.raises(DivergenceError, match="global test loss is nan"):
        check_finite(7, results[:1], math.nan)
    check_finite(7, results[:1], 0.3)  # finite: nothing raised


def _report() -> RoundReport:
    results = [_result(0, (1.0, 0.5), _state(2)), _result(1, (2.0, 0.25), _state(4))]
    outcomes = [ClientOutcome(results[0], EvalResult(0.9, 0.1, 5)), ClientOutcome(results[1], None)]
    return RoundReport(
        3, EvalResult(0.8, 0.6, 100), outcomes, 10, [10, 20], [30, 40], 1.5, {"train": 1.0}
    )


def test_round_metrics_name_global_comm_and_each_client() -> None:
    m = _report().metrics(keyed_clients=True)

    assert m["global/accuracy"] == 0.8 and m["global/loss"] == 0.6
    assert m["per_client/accuracy_mean"] == 0.9  # the client without a local split is left out
    assert m["per_client/accuracy_min"] == m["per_client/accuracy_max"] == 0.9
    assert m["per_client/train_loss_mean"] == pytest.approx(0.375)
    assert m["per_client/sampled"] == 2 and m["time/train_s"] == 1.0
    assert m["traffic/bytes_up"] == 30 and m["traffic/bytes_down"] == 70
    assert m["per_client/c01/train_loss"] == 0.25
    assert m["per_client/c01/trainable_params"] == _state(4).num_parameters()
    assert "per_client/c01/accuracy" not in m and m["per_client/c00/accuracy"] == 0.9


def test_round_metrics_without_keyed_clients_do_not_grow_with_clients() -> None:
    m = _report().metrics(keyed_clients=False)

    assert not [k for k in m if k.startswith("per_client/c")]
    assert (
        m["per_client/trainable_params"] == _state(2).num_parameters() + _state(4).num_parameters()
    )


def test_client_table_has_one_row_per_sampled_client() -> None:
    table = _report().client_table()

    assert table["client"] == [0, 1]
    assert table["rank/fc1"] == [2, 4]
    assert table["accuracy"] == [0.9, None]
    assert table["train_loss"] == [0.5, 0.25]
    assert table["bytes_down"] == [30, 40]
    assert {len(v) for v in table.values()} == {2}


def test_a_partitioned_clients_rows_are_gathered_when_indexed_and_only_the_last_ones_kept() -> None:
    from autorank.config import DataConfig, PartitionConfig
    from autorank.data.federation import federation_from_config
    from autorank.rounds.steps import IndexedClients, client_data

    federation = federation_from_config(
        DataConfig(), PartitionConfig(n_clients=6), public_fraction=0.1, seed=0
    )
    x, y = federation.data.arrays("train")
    data = client_data(federation)
    assert isinstance(data, IndexedClients)
    data.keep = 2

    for c in federation.clients:
        got = data[c.client]
        assert np.array_equal(got.x.numpy(), x[c.train])
        assert np.array_equal(got.y_test.numpy(), y[c.local_test])

    assert len(data) == 6 and len(data._kept) == 2
    assert [d.x.shape[0] for d in data] == [len(c.train) for c in federation.clients]
    with pytest.raises(IndexError, match="not one of the 6 clients"):
        data[6]
