"""``ranking``: how clients get their ranks, with caps and a parameter budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from autorank.config.vocab import AssignerName, Criterion, Section


class CapTier(Section):
    """A class of client devices: the largest rank they hold, and how common they are."""

    rank: int = Field(ge=1, description="the largest rank a device of this tier can hold")
    share: float = Field(
        gt=0.0, le=1.0, description="the probability that a client is drawn into this tier"
    )


class RankingConfig(Section):
    """Which rank assigner, and its knobs (see autorank.ranking.assigners)."""

    assigner: AssignerName = Field(
        "autorank",
        description="who gets which rank: autorank (CRITIC + TOPSIS over criteria), uniform, "
        "manual (by labels held), random or heavy_tail (FlexLoRA levels), size (by samples)",
    )
    criteria: tuple[Criterion, ...] = Field(
        (
            "entropy",
            "gini_simpson",
            "n_samples",
            "learning_difficulty",
        ),
        description="autorank: the client profile scored by CRITIC and TOPSIS; "
        "learning_difficulty adds a warm-up round (training.warmup_epochs)",
    )
    uniform_rank: int | None = Field(
        None,
        ge=1,
        description="uniform: everyone's rank, within [lora.r_min, lora.r_max] and clamped per "
        "layer; null: lora.r_max",
    )
    equal_policy: Literal["max", "mid"] = Field(
        "max",
        description="autorank: when all closeness scores are equal everyone gets r_max (max) or "
        "the middle of the range (mid)",
    )
    layer_mapping: Literal["scale", "clamp"] = Field(
        "scale",
        description="autorank: scale maps closeness into each layer's own range; clamp maps into "
        "the global range, then clamps per layer",
    )
    rerank_every: int = Field(
        0,
        ge=0,
        description="re-rank every N rounds: after rounds N, 2N, ... the learning difficulty "
        "of each trained client is measured again from that round's loss curve, ranks are "
        "decided again and the clients' adapters re-sized; needs the autorank assigner with "
        "learning_difficulty and training.local_epochs >= 2; 0: ranks fixed after the warm-up",
    )
    difficulty_from: Literal["auto", "warmup", "first_participation"] = Field(
        "auto",
        description="autorank with learning_difficulty: warmup (the paper's: every client "
        "trains training.warmup_epochs before round 1) or first_participation (a client trains "
        "its first round at the maximum ranks, its rank is decided from that round's loss "
        "curve among the clients measured so far and then kept); auto: warmup unless the "
        "population is larger than the clients the run trains (rounds x clients_per_round)",
    )
    heavy_tail_exponent: float = Field(
        2.0,
        gt=0.0,
        description="heavy_tail: a in P(level k) ~ (k + 1)^-a over the geometric rank levels; "
        "larger gives more clients the lowest ranks",
    )
    budget_params: int | None = Field(
        None,
        ge=1,
        description="total trainable LoRA parameters over all clients (sum of r * (d_in + d_out) "
        "over every client's adapted modules; the head not counted): the assigner's ranks are "
        "scaled by the largest common factor that fits (above 1 for an ample budget), within "
        "each layer's range and the caps; null: no budget",
    )
    rank_caps: dict[int, int] = Field(
        default_factory=dict,
        description="client index -> the largest rank its device can hold, in every adapted "
        "layer (at least every layer's r_min); wins over a drawn cap_tiers entry, e.g. {0: 4}",
    )
    cap_tiers: tuple[CapTier, ...] = Field(
        (),
        description="device tiers [{rank, share}, ...]: every client not in rank_caps is drawn "
        "a tier (seeded by seed), the share its probability (shares sum to 1), and holds at "
        "most that rank; empty: no tiers",
    )

    @model_validator(mode="after")
    def _criteria_unique(self) -> RankingConfig:
        if not self.criteria:
            raise ValueError("ranking.criteria must name at least one criterion")
        if len(set(self.criteria)) != len(self.criteria):
            raise ValueError(f"ranking.criteria has duplicates: {list(self.criteria)}")
        return self

    @model_validator(mode="after")
    def _caps_valid(self) -> RankingConfig:
        for client, cap in self.rank_caps.items():
            if client < 0 or cap < 1:
                raise ValueError(
                    f"ranking.rank_caps {{{client}: {cap}}}: expected a client index >= 0 and a "
                    "cap >= 1"
                )
        total = sum(t.share for t in self.cap_tiers)
        if self.cap_tiers and abs(total - 1.0) > 1e-9:
            shares = [t.share for t in self.cap_tiers]
            raise ValueError(f"ranking.cap_tiers: shares {shares} sum to {total}; expected 1")
        return self

    def named_caps(self) -> list[int]:
        """Every cap this section names (``rank_caps`` and tiers), sorted and distinct."""
        return sorted({*self.rank_caps.values(), *(t.rank for t in self.cap_tiers)})

    def check_caps(self, clients: Sequence[int], floor: int) -> None:
        """Refuse ``rank_caps`` of clients not in ``clients`` and caps below ``floor`` (the
        largest ``r_min`` of the adapted layers): one line each, as ``ValueError``."""
        unknown = sorted(set(self.rank_caps) - set(clients))
        if unknown:
            known = list(clients)
            expected = (
                f"indices below partition.n_clients ({len(known)})"
                if known == list(range(len(known)))
                else f"some of {known}"
            )
            raise ValueError(f"ranking.rank_caps names clients {unknown}; expected {expected}")
        low = [cap for cap in self.named_caps() if cap < floor]
        if low:
            raise ValueError(
                f"ranking.rank_caps / ranking.cap_tiers: caps {low} are below the r_min {floor} "
                "of lora (and its layer_ranges); expected caps >= every adapted layer's r_min"
            )
