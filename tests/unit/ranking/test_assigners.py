"""Rank assigners: hand tables for every assigner, the closeness-to-rank map, seeds, bad input."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import pytest

from autorank.config import RankingConfig
from autorank.ranking.assigners import assign_ranks, assigner_names
from autorank.ranking.mapping import closeness_positions, map_closeness, rank_levels
from autorank.ranking.profiling import ClientProfile


def _profile(
    client: int, histogram: tuple[int, ...], learning_difficulty: float | None = None
) -> ClientProfile:
    n = sum(histogram)
    p = [c / n for c in histogram if c > 0]
    return ClientProfile(
        client=client,
        n_samples=n,
        histogram=histogram,
        entropy=-sum(q * math.log(q) for q in p),
        gini_simpson=1.0 - sum(q * q for q in p),
        learning_difficulty=learning_difficulty,
    )


# Sizes 10, 20, 50; labels held 1, 2, 4 of 4 classes; entropy and Gini-Simpson also increase.
PROFILES = (
    _profile(0, (10, 0, 0, 0)),
    _profile(1, (10, 10, 0, 0)),
    _profile(2, (20, 10, 10, 10)),
)
LAYERS = {"fc1": (2, 10), "fc2": (1, 5)}


def _assign(assigner: Any, profiles: Any = PROFILES, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "settings": RankingConfig(),
        "r_min": 2,
        "r_max": 10,
        "layers": LAYERS,
        "n_classes": 4,
        "seed": 0,
    }
    kwargs.update(overrides)
    return assign_ranks(assigner, profiles, **kwargs)


# ---- the closeness -> rank map ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("closeness", "r_min", "r_max", "expected"),
    [
        ([0.0, 0.25, 1.0], 2, 10, [2, 4, 10]),  # 2 + .25 * 8 = 4
        ([0.1, 0.3, 0.9], 2, 10, [2, 4, 10]),  # the same after min-max: (.3 - .1) / .8 = .25
        ([0.0, 0.5, 1.0], 1, 4, [1, 3, 4]),  # 1 + .5 * 3 = 2.5 rounds half up to 3
        ([0.2, 0.8], 8, 8, [8, 8]),  # a one-rank range
    ],
)
def test_map_closeness_hand_table(
    closeness: list[float], r_min: int, r_max: int, expected: list[int]
) -> None:
    # Execute
    ranks = map_closeness(np.array(closeness), r_min, r_max)

    # Assert
    assert ranks == expected


def test_map_closeness_is_monotone() -> None:
    # Prepare
    closeness = np.random.default_rng(7).random(200)
    order = np.argsort(closeness)

    # Execute
    ranks = np.array(map_closeness(closeness, 2, 32))

    # Assert
    assert (np.diff(ranks[order]) >= 0).all()
    assert ranks.min() == 2 and ranks.max() == 32


@pytest.mark.parametrize(("policy", "expected"), [("max", [10, 10, 10]), ("mid", [6, 6, 6])])
def test_map_closeness_equal_policy(policy: Any, expected: list[int]) -> None:
    # Execute
    ranks = map_closeness(np.array([0.4, 0.4, 0.4]), 2, 10, equal_policy=policy)

    # Assert
    assert ranks == expected


def test_closeness_positions_single_client_follows_policy() -> None:
    # Execute / Assert
    assert closeness_positions(np.array([0.7]), "max").tolist() == [1.0]
    assert closeness_positions(np.array([0.7]), "mid").tolist() == [0.5]


@pytest.mark.parametrize(
    ("r_min", "r_max", "expected"),
    [(2, 32, (2, 4, 8, 16, 32)), (4, 4, (4,)), (1, 2, (1, 2)), (1, 16, (1, 2, 4, 8, 16))],
)
def test_rank_levels_are_geometric_and_unique(
    r_min: int, r_max: int, expected: tuple[int, ...]
) -> None:
    # Execute / Assert
    assert rank_levels(r_min, r_max) == expected


# ---- autorank --------------------------------------------------------------------------------


def test_autorank_single_criterion_hand_example() -> None:
    # Prepare. One column n = [10, 20, 50]: CRITIC gives it weight 1; TOPSIS on one column gives
    # C_i = (n_i - 10) / (50 - 10) = [0, .25, 1]; on [2, 10]: [2, 4, 10].
    # fc2 (1, 5) with 'scale': 1 + t * 4 = [1, 2, 5].
    settings = RankingConfig(criteria=("n_samples",))

    # Execute
    result = _assign("autorank", settings=settings)

    # Assert
    assert [d.rank for d in result.decisions] == [2, 4, 10]
    assert result.ranks() == [
        {"fc1": 2, "fc2": 1},
        {"fc1": 4, "fc2": 2},
        {"fc1": 10, "fc2": 5},
    ]
    assert [d.closeness for d in result.decisions] == pytest.approx([0.0, 0.25, 1.0])
    assert result.weights == {"n_samples": 1.0}
    assert result.decisions[1].criteria == {"n_samples": 20.0}


def test_autorank_clamp_mapping_clamps_the_global_rank() -> None:
    # Prepare. Global ranks [2, 4, 10]; fc2 clamps them into [1, 5]: [2, 4, 5].
    settings = RankingConfig(criteria=("n_samples",), layer_mapping="clamp")

    # Execute
    result = _assign("autorank", settings=settings)

    # Assert
    assert [r["fc2"] for r in result.ranks()] == [2, 4, 5]
    assert [r["fc1"] for r in result.ranks()] == [2, 4, 10]


def test_autorank_drops_unmeasured_learning_difficulty(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: client 0 is lowest and client 2 highest on every criterion, so TOPSIS puts them
    # exactly at the anti-ideal (C = 0) and the ideal (C = 1).
    caplog.set_level(logging.INFO, logger="autorank.ranking.assigners")

    # Execute
    result = _assign("autorank")

    # Assert
    assert set(result.weights) == {"entropy", "gini_simpson", "n_samples"}
    assert sum(result.weights.values()) == pytest.approx(1.0)
    assert "learning_difficulty" in caplog.text
    ranks = [d.rank for d in result.decisions]
    assert ranks[0] == 2 and ranks[2] == 10 and 2 < ranks[1] < 10


def test_autorank_uses_learning_difficulty_when_measured() -> None:
    # Prepare: LD reverses the order of clients 0 and 1 so it must carry some weight.
    profiles = [
        _profile(p.client, p.histogram, ld) for p, ld in zip(PROFILES, [0.9, 0.1, 0.5], strict=True)
    ]

    # Execute
    result = _assign("autorank", profiles=profiles)

    # Assert
    assert result.weights["learning_difficulty"] > 0
    assert result.decisions[0].criteria["learning_difficulty"] == 0.9


def test_autorank_learning_difficulty_missing_for_some_clients_is_rejected() -> None:
    # Prepare
    profiles = [_profile(0, (5, 5), 0.4), _profile(1, (3, 7), None)]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"learning_difficulty.*\[1\]"):
        _assign("autorank", profiles=profiles)


def test_autorank_only_unmeasured_criteria_is_rejected() -> None:
    # Prepare
    settings = RankingConfig(criteria=("learning_difficulty",))

    # Execute / Assert
    with pytest.raises(ValueError, match="no measured criterion"):
        _assign("autorank", settings=settings)


@pytest.mark.parametrize(
    ("policy", "rank", "fc2"),
    [("max", 10, 5), ("mid", 6, 3)],  # mid of [1, 5]: 1 + .5 * 4 = 3
)
def test_autorank_equal_clients_follow_equal_policy(policy: Any, rank: int, fc2: int) -> None:
    # Prepare
    profiles = [_profile(k, (4, 4, 0, 0)) for k in range(3)]
    settings = RankingConfig(equal_policy=policy)

    # Execute
    result = _assign("autorank", profiles=profiles, settings=settings)

    # Assert
    assert [d.rank for d in result.decisions] == [rank] * 3
    assert [r["fc2"] for r in result.ranks()] == [fc2] * 3


def test_autorank_single_client_follows_equal_policy() -> None:
    # Execute
    result = _assign("autorank", profiles=PROFILES[:1], settings=RankingConfig(equal_policy="mid"))

    # Assert
    assert result.decisions[0].rank == 6
    assert result.decisions[0].closeness == 0.5


# ---- baselines -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uniform_rank", "expected"),
    [(None, [{"fc1": 10, "fc2": 5}] * 3), (4, [{"fc1": 4, "fc2": 4}] * 3)],
)
def test_uniform(uniform_rank: int | None, expected: list[dict[str, int]]) -> None:
    # Execute
    result = _assign("uniform", settings=RankingConfig(uniform_rank=uniform_rank))

    # Assert
    assert result.ranks() == expected
    assert {d.rank for d in result.decisions} == {uniform_rank or 10}
    assert result.weights == {} and all(d.closeness is None for d in result.decisions)


def test_manual_is_proportional_to_labels_held() -> None:
    # Prepare. Labels 1, 2, 4 of 4.  Global: 10 * [.25, .5, 1] = [2.5, 5, 10] -> [3, 5, 10].
    # fc2 (1, 5): 5 * [.25, .5, 1] = [1.25, 2.5, 5] -> [1, 3, 5].
    # Execute
    result = _assign("manual")

    # Assert
    assert [d.rank for d in result.decisions] == [3, 5, 10]
    assert [r["fc2"] for r in result.ranks()] == [1, 3, 5]
    assert [d.labels_held for d in result.decisions] == [1, 2, 4]


def test_manual_clamps_to_r_min() -> None:
    # Prepare. One label of 10 classes: 10 * .1 = 1, below r_min = 2.
    # Execute
    result = _assign("manual", profiles=[_profile(0, (5,) + (0,) * 9)], n_classes=10)

    # Assert
    assert result.decisions[0].rank == 2


def test_size_is_proportional_to_samples() -> None:
    # Prepare. n = 10, 20, 50:  10 * n / 50 = [2, 4, 10];  fc2: 5 * n / 50 = [1, 2, 5].
    # Execute
    result = _assign("size")

    # Assert
    assert [d.rank for d in result.decisions] == [2, 4, 10]
    assert [r["fc2"] for r in result.ranks()] == [1, 2, 5]


def _many(n: int) -> list[ClientProfile]:
    return [_profile(k, (k % 5 + 1, 3)) for k in range(n)]


@pytest.mark.parametrize("assigner", ["random", "heavy_tail"])
def test_drawn_ranks_are_seeded_levels(assigner: Any) -> None:
    # Prepare. Levels on [2, 32] are 2, 4, 8, 16, 32; layer (1, 16) has levels 1, 2, 4, 8, 16 at
    # the same log positions, so its rank is half the global one.
    layers = {"same": (2, 32), "half": (1, 16)}
    kwargs: dict[str, Any] = {"r_min": 2, "r_max": 32, "layers": layers}

    # Execute
    first = _assign(assigner, _many(60), seed=11, **kwargs)
    again = _assign(assigner, _many(60), seed=11, **kwargs)
    other = _assign(assigner, _many(60), seed=12, **kwargs)

    # Assert
    ranks = [d.rank for d in first.decisions]
    assert ranks == [d.rank for d in again.decisions]
    assert ranks != [d.rank for d in other.decisions]
    assert set(ranks) <= {2, 4, 8, 16, 32}
    assert all(
        r == {"same": d.rank, "half": d.rank // 2}
        for r, d in zip(first.ranks(), first.decisions, strict=True)
    )


def test_heavy_tail_gives_more_low_ranks_than_random() -> None:
    # Prepare. With exponent 2 over 5 levels, P(lowest) = 1 / (1 + 1/4 + 1/9 + 1/16 + 1/25) ~ .68,
    # against .2 when uniform.
    kwargs: dict[str, Any] = {"r_min": 2, "r_max": 32, "layers": {}, "seed": 3}

    # Execute
    heavy = _assign("heavy_tail", _many(400), **kwargs)
    uniform = _assign("random", _many(400), **kwargs)

    # Assert
    heavy_low = sum(d.rank == 2 for d in heavy.decisions)
    uniform_low = sum(d.rank == 2 for d in uniform.decisions)
    assert heavy_low > 2 * uniform_low
    assert sum(d.rank == 32 for d in heavy.decisions) < sum(d.rank == 32 for d in uniform.decisions)


# ---- the result record -----------------------------------------------------------------------


@pytest.mark.parametrize("assigner", assigner_names())
def test_to_json_is_dumpable_with_one_row_per_client(assigner: Any) -> None:
    # Execute
    record = _assign(assigner).to_json()
    text = json.dumps(record)

    # Assert
    assert json.loads(text)["assigner"] == assigner
    rows = record["clients"]
    assert [row["client"] for row in rows] == [0, 1, 2]
    assert [row["samples"] for row in rows] == [10, 20, 50]
    for row in rows:
        assert {"labels_held", "closeness", "rank", "layer_ranks"} <= set(row)


def test_to_json_autorank_rows_carry_criteria_and_closeness() -> None:
    # Execute
    record = _assign("autorank", settings=RankingConfig(criteria=("n_samples",))).to_json()

    # Assert
    assert record["weights"] == {"n_samples": 1.0}
    assert record["clients"][1]["n_samples"] == 20.0
    assert record["clients"][1]["closeness"] == pytest.approx(0.25)
    assert record["clients"][2]["layer_ranks"] == {"fc1": 10, "fc2": 5}


def test_registry_covers_every_configurable_assigner() -> None:
    # Execute / Assert
    assert assigner_names() == ("autorank", "heavy_tail", "manual", "random", "size", "uniform")


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assigner", "profiles", "overrides", "message"),
    [
        ("magic", PROFILES, {}, r"magic.*autorank.*uniform"),
        ("uniform", [], {}, "profiles"),
        ("uniform", PROFILES, {"r_min": 12}, "r_min"),
        ("uniform", PROFILES, {"r_min": 0}, "r_min"),
        ("uniform", PROFILES, {"r_max": 2.5}, "r_max"),
        ("uniform", PROFILES, {"layers": {"fc1": (0, 4)}}, "fc1"),
        ("uniform", PROFILES, {"layers": {"fc1": (5, 3)}}, "fc1"),
        ("uniform", PROFILES, {"layers": {"fc1": (2,)}}, "fc1"),
        ("uniform", PROFILES, {"n_classes": 0}, "n_classes"),
        ("manual", PROFILES, {"n_classes": 3}, "n_classes"),
        ("random", PROFILES, {"seed": -1}, "seed"),
        ("uniform", PROFILES, {"settings": RankingConfig(uniform_rank=64)}, "uniform_rank"),
        ("uniform", [PROFILES[0], PROFILES[0]], {}, "distinct client"),
    ],
)
def test_bad_input_is_rejected(
    assigner: Any, profiles: Any, overrides: dict[str, Any], message: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        _assign(assigner, profiles, **overrides)


def test_non_finite_criterion_is_rejected() -> None:
    # Prepare
    broken = ClientProfile(1, 5, (5, 0), float("nan"), 0.0)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"entropy.*client 1"):
        _assign("autorank", profiles=[PROFILES[0], broken])
