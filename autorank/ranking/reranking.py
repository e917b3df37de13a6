"""Dynamic rank assignment: deciding the ranks again during training (``ranking.rerank_every``).

AutoRank's abstract speaks of *dynamic* rank assignment; its learning-difficulty criterion is the
normalised entropy of a client's loss curve, which changes as the model learns. With
``rerank_every = T`` the ranks are decided again after rounds ``T, 2T, ...`` (never after the
last): each client trained in that round gets its learning difficulty from that round's loss
curve over its local epochs; a client not sampled keeps the value of the decision in force. The
other criteria (label entropy, Gini-Simpson, size) depend only on the partition and do not move.

The new ranks take effect from the next round; ``autorank.rounds.growth.fit_global`` grows the
global adapter for ranks above its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from autorank.ranking.assignment import RankAssignment
from autorank.ranking.profiling import ClientProfile, learning_difficulty


def rerank_due(round_idx: int, every: int, rounds: int) -> bool:
    """Whether the ranks are decided again after ``round_idx`` (rounds ``T, 2T, ...`` before the
    last one; never with ``every = 0``)."""
    return every > 0 and round_idx % every == 0 and round_idx < rounds


def remeasured_profiles(
    profiles: Sequence[ClientProfile],
    in_force: RankAssignment,
    losses: Mapping[int, Sequence[float]],
) -> list[ClientProfile]:
    """The clients' profiles with learning difficulty measured again where a new curve exists.

    Args:
        profiles: every client's profile from the partition (``learning_difficulty`` unused).
        in_force: the decision the round was trained under; a client without a new curve keeps
            its ``criteria["learning_difficulty"]`` from there.
        losses: client -> its per-epoch mean losses of the round just trained (``E >= 2``).

    Raises:
        ValueError: a client has neither a new curve nor a learning difficulty in ``in_force``.
    """
    before = {d.client: d.criteria.get("learning_difficulty") for d in in_force.decisions}
    out = []
    for p in profiles:
        if p.client in losses:
            value: float | None = learning_difficulty(losses[p.client])
        else:
            value = before.get(p.client)
        if value is None:
            raise ValueError(
                f"client {p.client}: no loss curve this round and no learning difficulty in the "
                "decision in force"
            )
        out.append(dataclasses.replace(p, learning_difficulty=float(value)))
    return out
