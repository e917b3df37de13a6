"""How a client's adapter is built: the alpha policy and its scale, dropout, the trained head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autorank.config import LoraConfig
from autorank.lora.targets import AlphaPolicy, scale_for


@dataclass(frozen=True)
class LoraSettings:
    """How clients' adapters are built (see ``autorank.lora.peft.wrap_lora``)."""

    policy: AlphaPolicy
    alpha: float
    alpha_ratio: float
    dropout: float
    head: tuple[str, ...]

    @classmethod
    def from_config(cls, lora: LoraConfig, head: Sequence[str]) -> LoraSettings:
        """From the ``lora`` config section and the model's ``head_modules``."""
        return cls(lora.alpha_policy, lora.alpha, lora.alpha_ratio, lora.dropout, tuple(head))

    def scale(self, rank: int) -> float:
        """The LoRA scale at ``rank`` under this alpha policy (``targets.scale_for``)."""
        return scale_for(rank, policy=self.policy, alpha=self.alpha, alpha_ratio=self.alpha_ratio)
