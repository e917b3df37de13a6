"""One round's pure steps: downloads, initial states, communication, divergence, metrics."""

import math

import pytest
import torch
from torch.testing import assert_close

from autorank.adapters import AdapterState, AggregationResult, LoraFactors
from autorank.backend import LoraSettings
from autorank.evaluation import EvalResult
from autorank.models import build_model
from autorank.rounds import (
    DivergenceError,
    RoundReport,
    check_finite,
    communication,
    download,
    initial_states,
    max_ranks,
)
from autorank.training import LocalResult

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


def test_initial_states_share_one_init_cut_to_each_clients_ranks() -> None:
    base = build_model("mlp", input_shape=(1, 4, 4), n_classes=3, hidden=(8, 6), seed=0)
    ranks = [{"fc1": 2, "fc2": 1}, {"fc1": 4, "fc2": 3}]

    global_state, clients = initial_states(base, ranks, FIXED, seed=0)

    assert global_state.ranks() == max_ranks(ranks) == {"fc1": 4, "fc2": 3}
    assert [c.ranks() for c in clients] == ranks
    assert_close(clients[0].lora["fc1"].A, global_state.lora["fc1"].A[:2])
    assert all(torch.count_nonzero(c.lora["fc2"].B) == 0 for c in clients)  # B starts at zero


def test_communication_counts_downloads_or_the_stacked_factors_when_merged() -> None:
    results = [_result(0, (1.0, 0.5), _state(2)), _result(1, (1.0, 0.5), _state(4))]
    sliced = AggregationResult(_state(4), [_state(2), _state(4)])
    merged = AggregationResult(
        _state(6), [AdapterState({}, {}), AdapterState({}, {})], {"fc1": torch.zeros(2, 3)}
    )

    up, down = communication(results, sliced)
    _, down_merged = communication(results, merged)

    assert up == [_state(2).num_bytes(), _state(4).num_bytes()]
    assert down == [_state(2).num_bytes(), _state(4).num_bytes()]
    assert down_merged == [_state(6).num_bytes()] * 2


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_divergence_names_the_round_and_client(bad: float) -> None:
    results = [_result(0, (1.0, 0.5), _state(2)), _result(3, (1.0, bad), _state(2))]

    with pytest.raises(DivergenceError, match=r"round 7: client 3's loss is (nan|inf)"):
        check_finite(7, results)
    with pytest.raises(DivergenceError, match="global test loss is nan"):
        check_finite(7, results[:1], math.nan)
    check_finite(7, results[:1], 0.3)  # finite: nothing raised


def test_round_metrics_name_global_comm_and_each_client() -> None:
    results = [_result(0, (1.0, 0.5), _state(2)), _result(1, (2.0, 0.25), _state(4))]
    report = RoundReport(
        3,
        EvalResult(0.8, 0.6, 100),
        [EvalResult(0.9, 0.1, 5), None],
        results,
        [10, 20],
        [30, 40],
        1.5,
    )

    m = report.metrics()

    assert m["global/accuracy"] == 0.8 and m["global/loss"] == 0.6
    assert m["clients/mean_accuracy"] == 0.9  # the client without a local split is left out
    assert m["comm/bytes_up"] == 30 and m["comm/bytes_down"] == 70
    assert m["clients/c01/train_loss"] == 0.25
    assert m["clients/c01/trainable_params"] == _state(4).num_parameters()
    assert "clients/c01/accuracy" not in m and m["clients/c00/accuracy"] == 0.9
