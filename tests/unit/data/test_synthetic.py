"""Synthetic(alpha, beta): each client drawn on demand, the same on every draw."""

import numpy as np
import pytest

from autorank.config import PartitionConfig
from autorank.data.federation import synthetic_federation
from autorank.data.synthetic import MIN_SAMPLES, SyntheticPopulation, SyntheticSettings
from autorank.rounds.steps import GeneratedClients, client_data


def _population(n: int = 50, seed: int = 0, **knobs: float) -> SyntheticPopulation:
    return SyntheticPopulation(
        SyntheticSettings(**knobs),
        n,
        seed=seed,
        local_test_fraction=0.2,  # type: ignore[arg-type]
    )


def test_a_client_is_the_same_on_every_draw_and_in_any_population() -> None:
    small, large = _population(10), _population(1000)

    first, again, elsewhere = small.client(3), small.client(3), large.client(3)

    for a, b, c in zip(first, again, elsewhere, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert small.sizes[3] == large.sizes[3]


def test_a_clients_draw_follows_its_size_and_local_test_share() -> None:
    pop = _population(200)

    for k in (0, 17, 199):
        x, y, x_test, _ = pop.client(k)
        assert len(x) + len(x_test) == pop.sizes[k]
        assert len(x_test) == int(pop.sizes[k] * 0.2) == pop.n_local_test(k)
        assert x.shape[1] == 60 and x.dtype == np.float32 and y.dtype == np.int64
        assert y.min() >= 0 and y.max() < 10
    assert pop.sizes.min() >= MIN_SAMPLES


def test_clients_and_seeds_differ() -> None:
    pop, other = _population(5), _population(5, seed=1)

    assert not np.array_equal(pop.client(0)[0][:5], pop.client(1)[0][:5])
    assert not np.array_equal(pop.client(0)[0][:5], other.client(0)[0][:5])
    assert not np.array_equal(pop.sizes, _population(5, seed=1).sizes)


def test_an_unregistered_client_is_refused() -> None:
    with pytest.raises(IndexError, match="not one of the 5 registered clients"):
        _population(5).client(5)


def test_the_federation_holds_sizes_and_counts_but_no_clients_samples() -> None:
    partition = PartitionConfig(n_clients=40)

    fed = synthetic_federation(SyntheticSettings(), partition, public_fraction=0.1, seed=0)

    assert fed.n_clients == 40 and fed.clients == ()
    assert fed.histogram.shape == (40, 10)
    trains = [len(fed.population.client(k)[1]) for k in range(40)]  # type: ignore[union-attr]
    assert fed.histogram.sum(axis=1).tolist() == trains
    assert len(fed.public) == 4 * 40  # 4 unregistered clients at the median size
    x_test, _ = fed.data.arrays("test")
    assert x_test.shape == (100 * 40, 60)
    layout = fed.layout()
    assert [c["train"] for c in layout["clients"]] == trains
    again = synthetic_federation(SyntheticSettings(), partition, public_fraction=0.1, seed=0)
    assert again.layout()["digest"] == layout["digest"]


def test_generated_clients_are_drawn_when_indexed_and_only_the_last_ones_kept() -> None:
    fed = synthetic_federation(
        SyntheticSettings(), PartitionConfig(n_clients=30), public_fraction=0.0, seed=0
    )
    data = client_data(fed)
    assert isinstance(data, GeneratedClients)
    data.keep = 4

    first = data[7]
    for k in range(10):
        data[k]

    assert len(data) == 30 and len(data._kept) == 4
    again = data[7]
    assert again is not first
    assert bool((again.x == first.x).all()) and bool((again.y_test == first.y_test).all())
    assert [d.x.shape[0] for d in data[2:4]] == [data[2].x.shape[0], data[3].x.shape[0]]
    assert data[-1].x.shape == data[29].x.shape


def test_label_counts_are_drawn_for_the_clients_asked_only_and_match_the_whole() -> None:
    fed = synthetic_federation(
        SyntheticSettings(), PartitionConfig(n_clients=30), public_fraction=0.0, seed=0
    )

    some = fed.label_counts([3, 29, 0])
    assert "histogram" not in fed.__dict__  # nothing drawn for the others

    np.testing.assert_array_equal(some, fed.histogram[[3, 29, 0]])
    np.testing.assert_array_equal(fed.label_counts([5]), fed.histogram[[5]])
