"""The early merge's check: does every rank tier among a round's clients hold every label
(``aggregation.early_when: all_labels``)?"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from autorank.merge.rules import rank_tiers


@dataclass(frozen=True)
class LabelGap:
    """A rank tier whose clients, together, lack labels the federation holds.

    Attributes:
        layer: the adapted layer whose ranks form the tier.
        rank: the tier's top rank; its clients are those of rank ``>= rank`` at ``layer``.
        clients: how many clients the tier has.
        held: labels those clients hold between them.
        total: labels the federation holds.
    """

    layer: str
    rank: int
    clients: int
    held: int
    total: int

    def __str__(self) -> str:
        return (
            f"the {self.clients} client(s) of {self.layer} rank >= {self.rank} hold "
            f"{self.held} of the federation's {self.total} labels"
        )


def tier_label_gap(
    ranks: Sequence[Mapping[str, int]],
    histogram: np.ndarray,
    members: Sequence[int] | None = None,
) -> LabelGap | None:
    """The first rank tier whose clients do not hold every label the federation holds, or None.

    Tiers are ``aggregate_rbla_tiered``'s among the clients merged (``members``, default all):
    per adapted layer, each distinct rank ``rho`` has the clients ``{i: r_i >= rho}``; layers
    in name order, tiers lowest first. A label is held when one of those clients has a training
    sample of it (``histogram[i, c] > 0``); the federation's labels are every client's.

    Why: rbla_tiered hands a tier's directions only to that tier's clients, and the global
    model keeps them as they trained them. Under the double imbalance the top-ranked clients hold
    every label and those directions serve every label (RBLA's fast start); under Dirichlet(0.1)
    they hold a few labels, and a few tiered rounds cost rbla_product's peak there (MNIST-5k,
    docs/results.md). ``aggregation.early_when: all_labels`` runs the early merge in a round only
    when this returns None for the round's clients.

    Args:
        ranks: per client, adapted layer name -> rank (``RankAssignment.ranks()``).
        histogram: training samples per client per class, ``[n_clients, n_classes]``.
        members: the clients merged (a round's sample); None: every client.

    Returns:
        The gap, or None when every tier's clients hold every label.
    """
    counts = np.asarray(histogram)
    if counts.ndim != 2 or counts.shape[0] != len(ranks):
        raise ValueError(
            f"histogram: expected [{len(ranks)} clients, n_classes], got shape {counts.shape}"
        )
    present = counts > 0  # [K, C]
    total = int(present.any(axis=0).sum())
    merged = list(range(len(ranks))) if members is None else list(members)
    for layer in sorted(ranks[0]) if ranks else ():
        for _, rho, positions in rank_tiers([ranks[i][layer] for i in merged]):
            tier = [merged[k] for k in positions]
            held = int(present[tier].any(axis=0).sum())
            if held < total:
                return LabelGap(layer, int(rho), len(tier), held, total)
    return None
