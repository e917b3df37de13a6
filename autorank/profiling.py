"""Per-client data-complexity criteria (AutoRank step 2).

Only these scalars and the label histogram leave a client, never samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from autorank.config import Criterion


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
