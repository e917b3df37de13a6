"""Rank caps and the parameter budget: hand tables for every assigner kind, seeded tiers, the
decision record, the layer sizes the budget counts, and the config's one-line refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest
from torch import nn

from autorank.config import (
    CapTier,
    ConfigError,
    ExperimentConfig,
    RankingConfig,
    config_digest,
    load_config,
)
from autorank.lora.targets import target_sizes
from autorank.models.zoo import build_model
from autorank.ranking.assignment import RankAssignment
from autorank.ranking.budget import draw_caps
from tests.unit.ranking.test_assigners import PROFILES, _profile
from tests.unit.ranking.test_assigners import _assign as _assign_unsized

# On the layers of ranking/test_assigners.py, fc1 (2, 10) and fc2 (1, 5) with global range
# [2, 10], a rank-r adapter trains 100 r (fc1) or 50 r (fc2) parameters.
SIZES = {"fc1": 100, "fc2": 50}
ONE_LAYER = {"fc1": (1, 10)}  # with r_min 1 and 10 parameters per rank


def _assign(assigner: Any, profiles: Any = PROFILES, **overrides: Any) -> RankAssignment:
    result: RankAssignment = _assign_unsized(
        assigner, profiles, **{"layer_sizes": SIZES, **overrides}
    )
    return result


def _budget(budget: int, **settings: Any) -> RankingConfig:
    return RankingConfig(budget_params=budget, **settings)


def _layer_ranks(result: RankAssignment) -> list[tuple[int, int, int]]:
    """(global rank, fc1, fc2) per client."""
    return [(d.rank, d.layer_ranks["fc1"], d.layer_ranks["fc2"]) for d in result.decisions]


# ---- the budget --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "rank", "fc1", "fc2", "scale", "total"),
    [
        # s = .75: fc1 round(7.5) = 8, fc2 round(3.75) = 4: 3 (800 + 200) = 3000; the next step,
        # fc1 9 at s = 8.5 / 10, gives 3300.
        (3000, 8, 8, 4, 0.75, 3000),
        # One less: fc2 reaches 4 at s = 3.5 / 5 = .7 (fc1 round(7) = 7): 3 (700 + 200) = 2700.
        (2999, 7, 7, 4, 0.7, 2700),
        # Everyone at r_min (fc1 2, fc2 1): 3 (200 + 50) = 750, the least any budget can be.
        (750, 2, 2, 1, 0.0, 750),
    ],
)
def test_uniform_budget_is_the_largest_common_rank_that_fits(
    budget: int, rank: int, fc1: int, fc2: int, scale: float, total: int
) -> None:
    # Execute
    result = _assign("uniform", settings=_budget(budget))

    # Assert
    assert _layer_ranks(result) == [(rank, fc1, fc2)] * 3
    assert (result.scale, result.total_params, result.budget_params) == (scale, total, budget)


@pytest.mark.parametrize(
    ("budget", "expected", "scale", "total"),
    [
        # Unscaled (positions 0, .25, 1): 250 + 500 + 1250 = 2000 parameters, scale 1.
        (2000, [(2, 2, 1), (4, 4, 2), (10, 10, 5)], 1.0, 2000),
        # s = .7: client 1 fc1 round(2.8) = 3, fc2 round(1.4) = 1; client 2 fc1 7, fc2
        # round(3.5) = 4; client 0 stays at r_min: 250 + 350 + 900 = 1500. At s = .75 client 2's
        # fc1 (7.5) and client 1's fc2 (1.5) step up: 1650.
        (1500, [(2, 2, 1), (3, 3, 1), (7, 7, 4)], 0.7, 1500),
        # Above the assigner's 2000, s = 4.5 / 4 = 1.125 gives client 1 fc1 5 (and rank 5): 2100.
        (2100, [(2, 2, 1), (5, 5, 2), (10, 10, 5)], 1.125, 2100),
        # Ample: everyone at each layer's r_max, 3 (1000 + 250) = 3750 < 5000.
        (5000, [(10, 10, 5)] * 3, 4.75, 3750),
    ],
)
def test_autorank_budget_keeps_the_closeness_order_and_proportions(
    budget: int, expected: list[tuple[int, int, int]], scale: float, total: int
) -> None:
    # Prepare
    settings = _budget(budget, criteria=("n_samples",))

    # Execute
    result = _assign("autorank", settings=settings)

    # Assert
    assert _layer_ranks(result) == expected
    assert (result.scale, result.total_params) == (scale, total)


def test_every_assigner_gets_the_budget() -> None:
    # Prepare: 750 is everyone at r_min, so every assigner's ranks must come down to it.
    names = ("autorank", "uniform", "manual", "size", "random", "heavy_tail")

    # Execute
    results = [_assign(name, settings=_budget(750, criteria=("n_samples",))) for name in names]

    # Assert
    assert all(_layer_ranks(r) == [(2, 2, 1)] * 3 for r in results)
    assert all(r.total_params == 750 for r in results)


def test_without_a_budget_the_total_is_counted_and_nothing_scaled() -> None:
    # Execute
    result = _assign("uniform")

    # Assert: 3 (10 * 100 + 5 * 50)
    assert _layer_ranks(result) == [(10, 10, 5)] * 3
    assert (result.total_params, result.budget_params, result.scale) == (3750, None, None)


# ---- caps --------------------------------------------------------------------------------------


def test_caps_bound_every_layer_and_the_global_rank() -> None:
    # Execute
    result = _assign("uniform", settings=RankingConfig(rank_caps={1: 4}))

    # Assert: fc1 min(10, 4), fc2 min(5, 4), global min(10, 4)
    assert _layer_ranks(result) == [(10, 10, 5), (4, 4, 4), (10, 10, 5)]
    assert [d.cap for d in result.decisions] == [None, 4, None]


def test_a_budget_with_caps_is_water_filling() -> None:
    # Prepare: uniform rank 10, 10 parameters per rank, client 0 holds at most rank 2.
    kwargs: dict[str, Any] = {"r_min": 1, "layers": ONE_LAYER, "layer_sizes": {"fc1": 10}}

    # Execute
    capped = _assign("uniform", settings=_budget(160, rank_caps={0: 2}), **kwargs)
    free = _assign("uniform", settings=_budget(160), **kwargs)

    # Assert: capped, 10 (2 + 7 + 7) = 160 at s = 6.5 / 10 (8 for the others would need 180);
    # without the cap everyone gets 5 (150; 6 would need 180).
    assert [d.rank for d in capped.decisions] == [2, 7, 7]
    assert (capped.total_params, capped.scale) == (160, 0.65)
    assert [d.rank for d in free.decisions] == [5, 5, 5]
    assert (free.total_params, free.scale) == (150, 0.45)


def test_drawn_tiers_are_seeded_stable_per_client_and_lose_to_explicit_caps() -> None:
    # Prepare
    tiers = (CapTier(rank=2, share=0.25), CapTier(rank=6, share=0.75))
    clients = list(range(4000))

    # Execute
    first = draw_caps(clients, {}, tiers, seed=3)
    again = draw_caps(clients, {}, tiers, seed=3)
    fewer = draw_caps(clients[:10], {}, tiers, seed=3)
    other = draw_caps(clients, {}, tiers, seed=4)
    pinned = draw_caps(clients[:10], {5: 3}, tiers, seed=3)

    # Assert
    assert first == again and first != other
    assert fewer == first[:10]  # a client's tier does not depend on how many clients there are
    assert set(first) == {2, 6}
    assert abs(first.count(2) / len(first) - 0.25) < 0.03
    assert pinned == [*first[:5], 3, *first[6:10]]
    assert draw_caps([0, 1], {1: 4}, (), seed=0) == [None, 4]


def test_assign_ranks_records_the_drawn_caps() -> None:
    # Prepare
    settings = RankingConfig(cap_tiers=(CapTier(rank=2, share=0.5), CapTier(rank=6, share=0.5)))
    profiles = [_profile(k, (1 + k, 2)) for k in range(20)]

    # Execute
    result = _assign("uniform", profiles=profiles, settings=settings, seed=7)

    # Assert
    caps = draw_caps(list(range(20)), {}, settings.cap_tiers, seed=7)
    assert [d.cap for d in result.decisions] == caps
    assert [d.layer_ranks for d in result.decisions] == [
        {"fc1": min(10, c), "fc2": min(5, c)} for c in caps
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"settings": RankingConfig(rank_caps={0: 1})}, r"caps \[1\] are below the r_min 2"),
        (
            {"settings": RankingConfig(cap_tiers=(CapTier(rank=1, share=1.0),))},
            r"caps \[1\] are below the r_min 2",
        ),
        ({"settings": RankingConfig(rank_caps={7: 4})}, r"rank_caps names clients \[7\]"),
        ({"settings": _budget(749)}, r"budget_params \(749\) is below 750"),
        ({"settings": _budget(1000), "layer_sizes": None}, "needs layer_sizes"),
        ({"layer_sizes": {"fc1": 100}}, r"expected the adapted layers \['fc1', 'fc2'\]"),
        ({"layer_sizes": {"fc1": 100, "fc2": 0}}, "integers >= 1"),
    ],
)
def test_bad_caps_budgets_and_sizes_are_refused(overrides: dict[str, Any], message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        _assign("uniform", **overrides)


# ---- the decision record -----------------------------------------------------------------------


def test_the_record_carries_caps_and_budget_and_reads_back() -> None:
    # Prepare
    settings = _budget(1500, criteria=("n_samples",), rank_caps={2: 6})
    result = _assign("autorank", settings=settings)

    # Execute
    record = json.loads(json.dumps(result.to_json()))
    again = RankAssignment.from_json(record)

    # Assert
    assert again == result
    assert (record["budget_params"], record["total_params"]) == (1500, result.total_params)
    assert [row["cap"] for row in record["clients"]] == [None, None, 6]


def test_a_record_from_before_caps_and_budgets_reads_as_none() -> None:
    # Prepare: what to_json wrote before these fields existed
    record = _assign("uniform").to_json()
    for key in ("budget_params", "total_params", "scale"):
        del record[key]
    for row in record["clients"]:
        del row["cap"]

    # Execute
    again = RankAssignment.from_json(record)

    # Assert
    assert (again.budget_params, again.total_params, again.scale) == (None, None, None)
    assert [d.cap for d in again.decisions] == [None, None, None]
    assert "cap" not in again.decisions[0].criteria


# ---- what the budget counts --------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.sub = nn.Module()
        self.sub.a = nn.Linear(4, 2)
        self.conv = nn.Conv2d(2, 3, kernel_size=3)


def test_target_sizes_sum_d_in_plus_d_out_over_the_selected_modules() -> None:
    # Prepare
    mlp = build_model("mlp", input_shape=(4,), n_classes=2, hidden=(5, 3), seed=0)

    # Execute / Assert: "a" selects a (6 + 4) and sub.a (4 + 2); conv: 3 + 2 * 3 * 3
    assert target_sizes(_Net(), ["a", "conv"]) == {"a": 16, "conv": 21}
    assert target_sizes(_Net(), ["sub.a", "a"]) == {"sub.a": 6, "a": 10}  # the first key wins
    assert target_sizes(mlp, ["fc1", "fc2"]) == {"fc1": 4 + 5, "fc2": 5 + 3}


# ---- the config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["ranking.budget_params=0"], "ranking.budget_params"),
        (["ranking.rank_caps={-1: 4}"], "ranking.rank_caps {-1: 4}: expected a client index >= 0"),
        (["ranking.rank_caps={0: 0}"], "and a cap >= 1"),
        (["ranking.rank_caps={10: 4}"], "names clients [10]; expected indices below"),
        (["ranking.rank_caps={0: 1}"], "caps [1] are below the r_min 2"),
        (["lora.layer_ranges={fc1: {r_min: 8, r_max: 16}}", "ranking.rank_caps={0: 4}"], "r_min 8"),
        (["ranking.cap_tiers=[{rank: 4, share: 0.5}]"], "shares [0.5] sum to 0.5; expected 1"),
        (["ranking.cap_tiers=[{rank: 4, share: 0}, {rank: 8, share: 1}]"], "cap_tiers.0.share"),
        (["ranking.cap_tiers=[{rank: 4}]"], "cap_tiers.0.share"),
        (
            ["ranking.assigner=uniform", "aggregation.method=fedavg", "ranking.rank_caps={0: 4}"],
            "'fedavg' needs equal ranks",
        ),
    ],
)
def test_bad_budget_and_cap_settings_get_one_clear_line(
    overrides: list[str], expected: str
) -> None:
    # Execute
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)

    # Assert
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_caps_and_budget_load_and_change_the_digest_only_when_set() -> None:
    # Prepare
    sets = [
        "ranking.budget_params=50000",
        "ranking.rank_caps={0: 4, 3: 8}",
        "ranking.cap_tiers=[{rank: 4, share: 0.3}, {rank: 32, share: 0.7}]",
    ]

    # Execute
    config = load_config(None, sets)

    # Assert
    assert config.ranking.rank_caps == {0: 4, 3: 8}
    assert config.ranking.named_caps() == [4, 8, 32]
    assert config_digest(config) != config_digest(ExperimentConfig())
    # Unset, the new settings leave the digest of every earlier run's config as it was.
    assert config_digest(ExperimentConfig()) == "168c22978791b7e0"
