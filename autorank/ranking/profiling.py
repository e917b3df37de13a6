"""Per-client data-complexity criteria (AutoRank step 2).

Only these scalars and the label histogram leave a client, never samples. Every criterion is a
benefit criterion (Chen et al. 2024, AutoRank, arXiv 2412.15553): higher means more complex data,
which wants a higher LoRA rank.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autorank.config import Criterion

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientProfile:
    """One client's complexity profile; every criterion is a benefit (higher = more complex).

    Attributes:
        client: client index.
        n_samples: training samples the client holds.
        histogram: samples per class, ``[n_classes]``.
        entropy: label entropy ``-sum_c p_c ln p_c``.
        gini_simpson: ``1 - sum_c p_c^2``.
        learning_difficulty: normalised entropy of the warm-up loss curve, or None before warm-up.
    """

    client: int
    n_samples: int
    histogram: tuple[int, ...]
    entropy: float
    gini_simpson: float
    learning_difficulty: float | None = None

    @property
    def labels_held(self) -> int:
        return sum(1 for count in self.histogram if count > 0)

    def criterion(self, name: Criterion) -> float:
        """The value of one named criterion."""
        if name == "entropy":
            return self.entropy
        if name == "gini_simpson":
            return self.gini_simpson
        if name == "n_samples":
            return float(self.n_samples)
        if name == "learning_difficulty":
            if self.learning_difficulty is None:
                raise ValueError(
                    f"client {self.client}: learning_difficulty is not measured yet "
                    "(it needs the warm-up round)"
                )
            return self.learning_difficulty
        raise ValueError(f"unknown criterion {name!r}")


def _proportions(histogram: np.ndarray) -> np.ndarray:
    """Row-normalised label shares ``p_kc = n_kc / n_k``, ``[n_clients, n_classes]``."""
    h = np.asarray(histogram, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] == 0 or h.shape[1] == 0:
        raise ValueError(
            f"histogram: expected a non-empty [n_clients, n_classes] array, got shape {h.shape}"
        )
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ValueError("histogram: expected finite non-negative counts")
    totals = h.sum(axis=1, keepdims=True)  # [K, 1]
    empty = np.flatnonzero(totals[:, 0] == 0)
    if empty.size:
        raise ValueError(
            f"histogram: client(s) {empty.tolist()} hold no samples; expected every row sum > 0"
        )
    return h / totals


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """``-sum p ln p`` along ``axis`` with ``0 ln 0 = 0``."""
    safe = np.where(p > 0, p, 1.0)  # ln 1 = 0, so empty classes add nothing
    # p ln(1/p) rather than -(p ln p): a single class then gives +0.0, not -0.0.
    return np.asarray((p * np.log(1.0 / safe)).sum(axis=axis))


def label_entropy(histogram: np.ndarray) -> np.ndarray:
    """Shannon entropy of each client's label distribution (AutoRank, arXiv 2412.15553).

    ``H_k = -sum_c p_kc ln p_kc`` with ``p_kc = n_kc / n_k`` and ``0 ln 0 = 0``; it lies in
    ``[0, ln C]``: 0 for a single class, ``ln C`` for a uniform spread over ``C`` classes.

    Args:
        histogram: samples per class per client, ``[n_clients, n_classes]``; every row sum > 0.

    Returns:
        Entropies in nats, ``[n_clients]``.
    """
    return _entropy(_proportions(histogram))


def gini_simpson(histogram: np.ndarray) -> np.ndarray:
    """Gini-Simpson diversity of each client's labels (AutoRank, arXiv 2412.15553).

    ``GS_k = 1 - sum_c p_kc^2``, the chance that two draws with replacement differ in label; it
    lies in ``[0, 1 - 1/C]``.

    Args:
        histogram: samples per class per client, ``[n_clients, n_classes]``; every row sum > 0.

    Returns:
        Indices, ``[n_clients]``.
    """
    p = _proportions(histogram)
    return np.asarray(1.0 - (p**2).sum(axis=1))


def learning_difficulty(epoch_losses: Sequence[float]) -> float:
    """Normalised entropy of a warm-up loss curve (AutoRank, arXiv 2412.15553).

    With ``L_e`` the mean training loss of epoch ``e = 1..E`` and ``q_e = L_e / sum_e L_e``,
    ``LD = -(1 / ln E) sum_e q_e ln q_e`` in ``[0, 1]``. A flat curve (hard data, the loss does not
    fall) gives 1; a loss that collapses after the first epoch (easy data) gives a value near 0.
    It does not depend on the scale of the losses. All-zero losses (nothing left to learn from
    the first epoch on) are defined as ``0.0``, the easiest possible client.

    Args:
        epoch_losses: ``[E]`` per-epoch mean losses, ``E >= 2``, finite and non-negative.

    Returns:
        The learning difficulty in ``[0, 1]``.
    """
    losses = np.asarray(epoch_losses, dtype=np.float64)
    if losses.ndim != 1 or losses.size < 2:
        raise ValueError(
            f"epoch_losses: expected E >= 2 per-epoch losses, got shape {losses.shape}"
        )
    if not np.all(np.isfinite(losses)) or np.any(losses < 0):
        raise ValueError(
            f"epoch_losses: expected finite non-negative losses, got {losses.tolist()}"
        )
    total = losses.sum()
    if total == 0:
        return 0.0
    value = float(_entropy(losses / total) / np.log(losses.size))
    return min(max(value, 0.0), 1.0)  # round-off can step just outside [0, 1]


def profile_clients(
    histogram: np.ndarray,
    epoch_losses: Sequence[Sequence[float]] | None = None,
    *,
    tokens: np.ndarray | None = None,
) -> list[ClientProfile]:
    """Build every client's profile from its label histogram and, after warm-up, its loss curve.

    Args:
        histogram: integer samples per class per client, ``[n_clients, n_classes]``; every row
            sum > 0 (see ``autorank.data.partition.label_histogram``).
        epoch_losses: per client, its ``[E]`` warm-up epoch losses, or None before warm-up (the
            profiles then carry ``learning_difficulty=None``).
        tokens: for a causal LM (no labels), each client's token counts ``[n_clients, V]``: the
            entropy and Gini-Simpson criteria are then those of its token distribution (how
            varied its text is), and its size stays its sample count (blocks of ``L`` tokens,
            so its token count up to the last block's padding).

    Returns:
        One ``ClientProfile`` per row of ``histogram``, in client order.
    """
    h = np.asarray(histogram)
    entropy, gs = label_entropy(h), gini_simpson(h)  # these validate shape and values
    if tokens is not None:
        if len(tokens) != len(h):
            raise ValueError(f"tokens: expected {len(h)} rows (one per client), got {len(tokens)}")
        entropy, gs = label_entropy(tokens), gini_simpson(tokens)
    if not np.array_equal(h, np.round(h)):
        raise ValueError("histogram: expected integer sample counts, got fractional values")
    n_clients = h.shape[0]
    if epoch_losses is not None and len(epoch_losses) != n_clients:
        raise ValueError(
            f"epoch_losses: expected one loss curve per client ({n_clients}), "
            f"got {len(epoch_losses)}"
        )
    profiles = []
    for k in range(n_clients):
        counts = tuple(int(v) for v in h[k])
        profiles.append(
            ClientProfile(
                client=k,
                n_samples=sum(counts),
                histogram=counts,
                entropy=float(entropy[k]),
                gini_simpson=float(gs[k]),
                learning_difficulty=_client_ld(k, epoch_losses),
            )
        )
    logger.debug("profiled %d clients", n_clients)
    return profiles


def _client_ld(client: int, epoch_losses: Sequence[Sequence[float]] | None) -> float | None:
    if epoch_losses is None:
        return None
    try:
        return learning_difficulty(epoch_losses[client])
    except ValueError as err:
        raise ValueError(f"client {client}: {err}") from None
