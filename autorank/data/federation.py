"""The federation's layout: who holds which samples, before any training.

The same layout feeds `autorank ranks`, the training flow and resumed runs, so it is derived
from the config's data, partition and seed alone.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autorank.config import DataConfig, PartitionConfig
from autorank.data.datasets import DatasetSplits, load_data, splits_from_arrays
from autorank.data.partition import (
    label_histogram,
    partition,
    scheme_params,
    split_local,
    split_public,
)
from autorank.data.synthetic import (
    PUBLIC_CLIENTS_MAX,
    TEST_CLIENTS,
    SyntheticPopulation,
    SyntheticSettings,
)
from autorank.data.text import TextOptions

# Config field names that differ from the parameter names ``partition`` takes.
_CONFIG_FIELD = {"sigma": "quantity_sigma"}


@dataclass(frozen=True)
class ClientSplit:
    """One client's sample indices into the training split.

    Attributes:
        client: client index.
        train: indices the client trains on, ``[n_i]``.
        local_test: indices held out for the client's personalised accuracy, ``[m_i]``.
    """

    client: int
    train: np.ndarray
    local_test: np.ndarray


@dataclass(frozen=True)
class Federation:
    """The partitioned training data.

    Attributes:
        data: the dataset splits.
        public: server-held indices for base pre-training (possibly empty).
        clients: one split per client.
        counts: label counts of each client's training indices, ``[n_clients, n_classes]``;
            None for a generated population (``histogram`` draws them when first read).
        tokens: for a causal LM's data, each client's count of every token id over its training
            blocks (padding not counted), ``[n_clients, V]``; None for labelled data.
        population: a generated population (``data.name: synthetic``): its clients' samples are
            drawn when asked for, ``clients`` is empty and ``data`` holds the server's public
            share (train) and the held-out clients' samples (test).
    """

    data: DatasetSplits
    public: np.ndarray
    clients: tuple[ClientSplit, ...]
    counts: np.ndarray | None
    tokens: np.ndarray | None = None
    population: SyntheticPopulation | None = None

    @functools.cached_property
    def histogram(self) -> np.ndarray:
        """Every client's training-label counts, ``[n_clients, n_classes]`` (a generated
        population draws each client once for them, on first read: 16 s at 100,000 clients)."""
        if self.counts is not None:
            return self.counts
        assert self.population is not None
        return self.population.histogram()

    def label_counts(self, clients: Sequence[int]) -> np.ndarray:
        """The training-label counts of some clients, ``[len(clients), n_classes]``, without
        drawing a generated population's other clients."""
        if self.population is None or "histogram" in self.__dict__:
            return self.histogram[list(clients)]
        return self.population.histogram(clients)

    @property
    def n_clients(self) -> int:
        """Registered clients."""
        return len(self.clients) if self.population is None else self.population.n_clients

    def layout(self) -> dict[str, Any]:
        """The layout as JSON: sizes of the public share and of every client's splits, and a
        digest of every index (equal digests: the same samples went to the same clients)."""
        h = hashlib.sha256(np.ascontiguousarray(self.public, dtype=np.int64).tobytes())
        if self.population is not None:
            p = self.population
            tests = p.local_tests
            h.update(repr((p.settings, p.seed, p.local_test_fraction)).encode())
            h.update(p.sizes.tobytes())
            clients = [
                {"client": k, "train": int(n - m), "local_test": int(m)}
                for k, (n, m) in enumerate(zip(p.sizes, tests, strict=True))
            ]
            return {"public": len(self.public), "clients": clients, "digest": h.hexdigest()[:16]}
        for c in self.clients:
            for part in (c.train, c.local_test):
                h.update(np.int64(len(part)).tobytes())
                h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        clients = [
            {"client": c.client, "train": len(c.train), "local_test": len(c.local_test)}
            for c in self.clients
        ]
        return {"public": len(self.public), "clients": clients, "digest": h.hexdigest()[:16]}


def partition_params(settings: PartitionConfig) -> dict[str, float | int]:
    """The parameters the configured scheme takes, under the names ``partition`` expects."""
    values = settings.model_dump()
    return {name: values[_CONFIG_FIELD.get(name, name)] for name in scheme_params(settings.scheme)}


def build_federation(
    data: DatasetSplits, settings: PartitionConfig, *, public_fraction: float, seed: int
) -> Federation:
    """Split off the server's public share, partition the rest, and hold out local test data.

    Args:
        data: the loaded dataset.
        settings: the partition section of the config.
        public_fraction: share of the training split kept by the server for pre-training.
        seed: the experiment seed; the layout depends on nothing else.

    Returns:
        The federation layout.
    """
    x, labels = data.arrays("train")
    seeds = np.random.SeedSequence(seed).spawn(3)
    seed_public, seed_part, seed_local = (int(s.generate_state(1)[0]) for s in seeds)
    if public_fraction > 0:
        public, private = split_public(labels, public_fraction, seed=seed_public)
    else:
        public, private = np.empty(0, dtype=np.int64), np.arange(len(labels), dtype=np.int64)
    params: dict[str, Any] = dict(partition_params(settings))
    if settings.scheme == "natural":
        if data.keys is None:
            raise ValueError(
                f"partition.scheme 'natural' needs each sample's client: data {data.name!r} has "
                "none (set data.key_column)"
            )
        params["keys"] = np.asarray(data.keys, dtype=object)[private]
    parts = partition(
        labels[private], settings.scheme, settings.n_clients, seed=seed_part, **params
    )
    local_seeds = np.random.SeedSequence(seed_local).spawn(len(parts))
    clients = []
    for i, (part, s) in enumerate(zip(parts, local_seeds, strict=True)):
        train, local_test = split_local(
            private[part], settings.local_test_fraction, seed=int(s.generate_state(1)[0])
        )
        clients.append(ClientSplit(i, train, local_test))
    histogram = label_histogram(labels, [c.train for c in clients], data.n_classes)
    tokens = token_histogram(x, [c.train for c in clients]) if data.language_model else None
    return Federation(data, public, tuple(clients), histogram, tokens)


def token_histogram(x: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """Each part's count of every token id over its training blocks ``x [n, 2, L]`` (ids, then
    the mask), ``[len(parts), V]`` with ``V`` one above the largest id seen; padding is not
    counted."""
    V = int(x[:, 0].max(initial=0)) + 1
    rows = []
    for part in parts:
        ids, mask = x[part, 0], x[part, 1]
        rows.append(np.bincount(ids[mask > 0], minlength=V))
    return np.stack(rows).astype(np.int64)


def synthetic_settings(data: DataConfig) -> SyntheticSettings:
    """The Synthetic(alpha, beta) generator's knobs of a config's ``data.synthetic_*``."""
    return SyntheticSettings(
        alpha=data.synthetic_alpha,
        beta=data.synthetic_beta,
        dim=data.synthetic_dim,
        classes=data.synthetic_classes,
        size_median=data.synthetic_size_median,
        size_sigma=data.synthetic_size_sigma,
    )


def synthetic_federation(
    settings: SyntheticSettings,
    partition: PartitionConfig,
    *,
    public_fraction: float,
    seed: int,
) -> Federation:
    """A Synthetic(alpha, beta) population of ``partition.n_clients`` (its scheme does not apply:
    each client draws from its own model). The server's public share is the data of
    ``public_fraction`` as many unregistered clients (at most ``PUBLIC_CLIENTS_MAX``)."""
    population = SyntheticPopulation(
        settings,
        partition.n_clients,
        seed=seed,
        local_test_fraction=partition.local_test_fraction,
    )
    n_public = min(round(public_fraction * partition.n_clients), PUBLIC_CLIENTS_MAX)
    if public_fraction > 0:
        n_public = max(n_public, 1)
    public = population.pooled("public", n_public)
    data = splits_from_arrays(
        "synthetic", public, population.pooled("test", TEST_CLIENTS), settings.classes
    )
    everyone = np.arange(len(public[1]), dtype=np.int64)
    return Federation(data, everyone, (), None, population=population)


@functools.lru_cache(maxsize=1)
def federation_from_config(
    data: DataConfig,
    partition: PartitionConfig,
    *,
    public_fraction: float,
    seed: int,
    text: TextOptions | None = None,
) -> Federation:
    """Load the data and lay it out over the clients as a run of these settings does.

    The last layout is kept, so the checks before a run, the rank preview and the flow in one
    process load and partition the data once. Treat the result as read-only. ``text``: the
    tokenizer and sample length, for text data.
    """
    if data.name == "synthetic":
        return synthetic_federation(
            synthetic_settings(data), partition, public_fraction=public_fraction, seed=seed
        )
    splits = load_data(
        data.name,
        path=data.path,
        test_fraction=data.test_fraction,
        seed=seed,
        max_train_samples=data.max_train_samples,
        text=text,
        max_test_samples=data.max_test_samples,
    )
    return build_federation(splits, partition, public_fraction=public_fraction, seed=seed)
