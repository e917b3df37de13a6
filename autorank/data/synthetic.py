"""Synthetic(alpha, beta): a population of any size, each client's data drawn on demand.

The federated benchmark of FedProx (Li et al., "Federated Optimization in Heterogeneous
Networks", MLSys 2020; also in LEAF): client ``k`` has its own softmax model and its own input
distribution,

- ``u_k ~ N(0, alpha)``, ``W_k [C, d] ~ N(u_k, 1)``, ``b_k [C] ~ N(u_k, 1)`` (how much the
  clients' labelling rules differ: ``alpha``);
- ``B_k ~ N(0, beta)``, ``v_k [d] ~ N(B_k, 1)``, ``x ~ N(v_k, Sigma)`` with
  ``Sigma = diag(j^-1.2)`` (how much their inputs differ: ``beta``);
- ``y = argmax(W_k x + b_k)``;
- features divided by their spread over the population, ``sqrt(beta + 1 + Sigma_jj)`` (real
  data sets are standardised likewise, with one statistic for every client);

with log-normal sizes ``n_k = max(MIN_SAMPLES, round(median * exp(sigma z_k)))``.

Nothing is stored per client but its size: client ``k``'s samples come from
``SeedSequence([seed, stream, k])`` whenever they are asked for, so a million registered clients
cost nothing until sampled, and a resumed run sees the same samples. The global test split is the
pooled data of ``TEST_CLIENTS`` clients drawn from a stream of their own (clients no one trains
on, from the same population); the server's public share (pre-training) likewise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_SAMPLES = 5  # so that a client holding out 20 % for its local test still trains on some
TEST_CLIENTS = 100  # held-out clients pooled into the global test split
PUBLIC_CLIENTS_MAX = 1000  # the server's public share is at most this many clients' data
_CLIENTS, _SIZES, _TEST, _PUBLIC = 0x51, 0x52, 0x53, 0x54  # independent streams
_EXPONENT = -1.2  # FedProx's input covariance: Sigma_jj = j^-1.2


@dataclass(frozen=True)
class SyntheticSettings:
    """The generator's knobs (``data.synthetic_*``).

    Attributes:
        alpha: spread of the clients' labelling rules (0: one rule for all).
        beta: spread of the clients' input distributions (0: one distribution for all).
        dim: features per sample ``d``.
        classes: labels ``C``.
        size_median: median samples per client.
        size_sigma: sigma of the log-normal sizes (0: every client holds ``size_median``).
    """

    alpha: float = 0.5
    beta: float = 0.5
    dim: int = 60
    classes: int = 10
    size_median: int = 40
    size_sigma: float = 1.0


class SyntheticPopulation:
    """``n_clients`` registered clients of Synthetic(alpha, beta), generated when asked for.

    Attributes:
        settings: the generator's knobs.
        n_clients: registered clients.
        seed: the experiment seed.
        local_test_fraction: share of each client's samples held out as its local test split.
        sizes: every client's sample count (training and local test together), ``[n_clients]``.
        local_tests: how many of them are its local test split, ``[n_clients]``.
    """

    def __init__(
        self,
        settings: SyntheticSettings,
        n_clients: int,
        *,
        seed: int,
        local_test_fraction: float,
    ) -> None:
        if n_clients < 1:
            raise ValueError(f"n_clients must be >= 1, got {n_clients}")
        self.settings, self.n_clients, self.seed = settings, n_clients, seed
        self.local_test_fraction = local_test_fraction
        cov = np.arange(1, settings.dim + 1, dtype=np.float64) ** _EXPONENT
        self._std = np.sqrt(cov)
        # Over the population x_j has mean 0 and variance beta + 1 + Sigma_jj: features are
        # divided by that spread, as real data sets are standardised (not per client).
        self._scale = 1.0 / np.sqrt(settings.beta + 1.0 + cov)
        z = np.random.default_rng([seed, _SIZES]).standard_normal(n_clients)
        sizes = np.rint(settings.size_median * np.exp(settings.size_sigma * z))
        self.sizes = np.maximum(sizes, MIN_SAMPLES).astype(np.int64)
        # Each client's local test samples: its share rounded down, at least one left to train.
        share = np.floor(self.sizes * local_test_fraction).astype(np.int64)
        self.local_tests = np.minimum(share, self.sizes - 1)
        # The training-label counts of every client drawn so far (a few numbers each): a
        # client's first round ranks it from them without drawing it again.
        self._counts: dict[int, np.ndarray] = {}

    def _draw(self, stream: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` samples of one client of ``stream``: x ``[n, d]`` float32, y ``[n]`` int64."""
        s = self.settings
        rng = np.random.default_rng([self.seed, stream, k])
        u, shift = rng.normal(0.0, np.sqrt(s.alpha)), rng.normal(0.0, np.sqrt(s.beta))
        W, b = rng.normal(u, 1.0, (s.classes, s.dim)), rng.normal(u, 1.0, s.classes)
        v = rng.normal(shift, 1.0, s.dim)
        x = rng.normal(v, self._std, (n, s.dim))
        y = np.argmax(x @ W.T + b, axis=1)
        return (x * self._scale).astype(np.float32), y.astype(np.int64)

    def n_local_test(self, k: int) -> int:
        """Client ``k``'s local test samples (``local_tests[k]``)."""
        return int(self.local_tests[k])

    def client(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Client ``k``'s training ``x, y`` and local test ``x, y``; the same on every call.

        A client's samples are independent draws from its own distribution, so its last
        ``n_local_test`` samples are as random a local test split as any permutation's.
        """
        if not 0 <= k < self.n_clients:
            raise IndexError(f"client {k} is not one of the {self.n_clients} registered clients")
        x, y = self._draw(_CLIENTS, k, int(self.sizes[k]))
        cut = len(y) - self.n_local_test(k)
        if k not in self._counts:
            self._counts[k] = np.bincount(y[:cut], minlength=self.settings.classes)
        return x[:cut], y[:cut], x[cut:], y[cut:]

    def histogram(self, clients: Sequence[int] | None = None) -> np.ndarray:
        """Training-label counts of ``clients`` (default: every client), ``[len, classes]``:
        each drawn once, nothing kept but its counts."""
        chosen = range(self.n_clients) if clients is None else clients
        counts = np.zeros((len(chosen), self.settings.classes), dtype=np.int64)
        for row, k in enumerate(chosen):
            if k not in self._counts:
                self.client(k)
            counts[row] = self._counts[k]
        if clients is None:
            self._counts.clear()  # the whole table is the caller's now
        return counts

    def pooled(self, which: str, n_clients: int) -> tuple[np.ndarray, np.ndarray]:
        """The samples of ``n_clients`` unregistered clients pooled: ``test`` (the global test
        split) or ``public`` (the server's share), each client at the median size."""
        stream = {"test": _TEST, "public": _PUBLIC}[which]
        n = self.settings.size_median
        parts = [self._draw(stream, k, n) for k in range(n_clients)]
        if not parts:
            return np.zeros((0, self.settings.dim), np.float32), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
