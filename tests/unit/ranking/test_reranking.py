"""Re-ranking during training: when it is due, the criteria measured again, the grown adapter."""

import math

import pytest
import torch
from torch.testing import assert_close

from autorank.lora.adapters import AdapterState, LoraFactors
from autorank.lora.settings import LoraSettings
from autorank.models.zoo import build_model
from autorank.ranking.assignment import RankAssignment, RankDecision
from autorank.ranking.profiling import ClientProfile
from autorank.ranking.reranking import remeasured_profiles, rerank_due
from autorank.rounds.growth import fit_global
from autorank.rounds.steps import initial_state

FIXED = LoraSettings(policy="fixed", alpha=8.0, alpha_ratio=2.0, dropout=0.0, head=("head",))


@pytest.mark.parametrize(
    ("round_idx", "every", "rounds", "due"),
    [
        (5, 5, 20, True),
        (10, 5, 20, True),
        (4, 5, 20, False),
        (20, 5, 20, False),  # never after the last round: no round would train under it
        (3, 0, 20, False),  # 0: ranks fixed after the warm-up
        (1, 1, 2, True),
    ],
)
def test_rerank_is_due_every_t_rounds_before_the_last(
    round_idx: int, every: int, rounds: int, due: bool
) -> None:
    assert rerank_due(round_idx, every, rounds) is due


def _profile(client: int) -> ClientProfile:
    return ClientProfile(client, 10, (5, 5), math.log(2), 0.5, learning_difficulty=None)


def _decision(client: int, ld: float) -> RankDecision:
    return RankDecision(client, 10, 2, {"learning_difficulty": ld}, 0.5, 4, {"fc1": 4})


def test_sampled_clients_get_the_round_s_curve_the_others_keep_the_decision_s_value() -> None:
    in_force = RankAssignment("autorank", (_decision(0, 0.25), _decision(1, 0.75)))

    got = remeasured_profiles([_profile(0), _profile(1)], in_force, {1: [2.0, 1.0]})

    # client 1: q = (2/3, 1/3), LD = -(2/3 ln 2/3 + 1/3 ln 1/3) / ln 2 = 0.918295...
    assert [p.learning_difficulty for p in got] == [0.25, pytest.approx(0.9182958340544896)]
    assert [p.entropy for p in got] == [math.log(2)] * 2  # the partition's criteria unchanged


def test_a_client_with_no_curve_and_no_measured_value_is_refused() -> None:
    in_force = RankAssignment("autorank", (_decision(0, 0.25),))

    with pytest.raises(ValueError, match="client 1: no loss curve"):
        remeasured_profiles([_profile(0), _profile(1)], in_force, {})


def _base() -> torch.nn.Module:
    return build_model("mlp", input_shape=(1, 4, 4), n_classes=3, hidden=(8, 6), seed=0)


def test_the_global_adapter_grows_to_the_new_largest_rank_keeping_its_product() -> None:
    # Prepare: a trained-looking global adapter at ranks fc1 2, fc2 3
    base = _base()
    start = initial_state(base, [{"fc1": 2, "fc2": 3}], FIXED, seed=1)
    lora = {
        path: LoraFactors(f.A, torch.full_like(f.B, 0.5), f.scale) for path, f in start.lora.items()
    }
    state = AdapterState(lora, start.extra)

    # Execute: a client now holds fc1 at rank 5
    got = fit_global(state, base, [{"fc1": 5, "fc2": 1}, {"fc1": 1, "fc2": 2}], FIXED, seed=3)

    # Verify: fc1 grew 2 -> 5 at alpha / 5 with the same product; fc2 (3 >= 2) is untouched
    fc1, old = got.lora["fc1"], state.lora["fc1"]
    assert (fc1.rank, fc1.scale) == (5, 8.0 / 5)
    assert_close(fc1.delta(), old.delta())
    assert_close(fc1.A[:2], old.A)
    assert torch.equal(fc1.B[:, 2:], torch.zeros(8, 3))
    assert fc1.A[2:].abs().min() > 0  # fresh rows: the new components can learn
    assert got.lora["fc2"] is state.lora["fc2"]
    assert got.extra is state.extra
    # Seeded: the same call draws the same rows, another seed others
    again = fit_global(state, base, [{"fc1": 5, "fc2": 1}], FIXED, seed=3)
    other = fit_global(state, base, [{"fc1": 5, "fc2": 1}], FIXED, seed=4)
    assert torch.equal(again.lora["fc1"].A, fc1.A)
    assert not torch.equal(other.lora["fc1"].A[2:], fc1.A[2:])


def test_nothing_grows_when_the_global_adapter_is_large_enough_or_merged() -> None:
    base = _base()
    state = initial_state(base, [{"fc1": 4, "fc2": 4}], FIXED, seed=1)
    merged = AdapterState({}, dict(state.extra))  # FLoRA: factors inside the base

    assert fit_global(state, base, [{"fc1": 4, "fc2": 2}], FIXED, seed=0) is state
    assert fit_global(merged, base, [{"fc1": 6, "fc2": 6}], FIXED, seed=0) is merged
