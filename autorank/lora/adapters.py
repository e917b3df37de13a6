"""Plain tensor structures for LoRA adapters, shared by training and aggregation.

Scaling convention, stated once: every adapted layer carries its own ``scale`` and contributes
``delta W = scale * B @ A``. With peft, ``scale = alpha / r`` (or ``alpha / sqrt(r)`` with
rsLoRA), so the same factors mean a different update at a different rank. Whenever factors move
between ranks (padding, truncation, aggregation) the *product* ``scale * B @ A`` is what must be
preserved, so ``B`` is rescaled by ``old_scale / new_scale`` (see ``resize``).

Factors are always 2-D here: ``A: [r, d_in]``, ``B: [d_out, r]``. Convolution factors are flattened
(``d_in = c_in * k_h * k_w``) by ``autorank.lora.peft`` and reshaped back there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraFactors:
    """One adapted layer: ``delta W = scale * B @ A``.

    Attributes:
        A: down-projection, ``[r, d_in]``.
        B: up-projection, ``[d_out, r]``.
        scale: the LoRA scaling at this rank (``alpha / r`` for peft's default).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"LoRA factors must be A [r, d_in] and B [d_out, r] with the same r; "
                f"got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense update ``scale * B @ A``, ``[d_out, d_in]``."""
        return self.scale * (self.B @ self.A)


@dataclass(frozen=True)
class AdapterState:
    """A client's (or the server's) trainable state.

    Attributes:
        lora: adapted layer name -> factors.
        extra: other trainable tensors (classifier head, ...), aggregated by plain FedAvg.
    """

    lora: Mapping[str, LoraFactors]
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def ranks(self) -> dict[str, int]:
        return {name: f.rank for name, f in self.lora.items()}

    def num_parameters(self) -> int:
        """Trainable parameter count: what a client trains and sends."""
        lora = sum(f.A.numel() + f.B.numel() for f in self.lora.values())
        return lora + sum(t.numel() for t in self.extra.values())

    def num_bytes(self) -> int:
        """Bytes on the wire for this state (factors and extras at their dtypes)."""
        lora = sum(
            f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size()
            for f in self.lora.values()
        )
        return lora + sum(t.numel() * t.element_size() for t in self.extra.values())


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends up after local training."""

    state: AdapterState
    n_samples: int

    def __post_init__(self) -> None:
        if self.n_samples <= 0:
            raise ValueError(f"n_samples must be positive, got {self.n_samples}")


@dataclass(frozen=True)
class AggregationResult:
    """What the server produces from one round of client updates.

    Attributes:
        global_state: the server's adapter, per layer at the largest client rank.
        client_states: what each client downloads, at its own ranks and scales (same order as
            the updates). A state whose ``lora`` is empty means "start fresh adapters" (FLoRA).
        base_delta: dense updates to add to the frozen base weights (FLoRA's whole update,
            FedEx-LoRA's residual), else empty.
        fresh: the update is inside the base and clients start fresh adapters (FLoRA); else
            ``global_state`` is still the adapter on top of the (possibly updated) base.
    """

    global_state: AdapterState
    client_states: list[AdapterState]
    base_delta: Mapping[str, torch.Tensor] = field(default_factory=dict)
    fresh: bool = False


def resize(factors: LoraFactors, rank: int, scale: float) -> LoraFactors:
    """Truncate or zero-pad factors to ``rank`` at a new ``scale``, keeping each product.

    Component k contributes ``scale * B[:, k] A[k]``; after resizing it contributes the same, so
    truncation drops the trailing components and padding adds zero ones.

    Args:
        factors: the source factors, rank ``r``.
        rank: the target rank ``r'`` (>= 1).
        scale: the LoRA scaling at the target rank.

    Returns:
        Factors with ``A: [r', d_in]``, ``B: [d_out, r']``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    A, B = factors.A, factors.B * (factors.scale / scale)
    r = factors.rank
    if rank <= r:
        return LoraFactors(A[:rank].clone(), B[:, :rank].clone(), scale)
    A_pad = A.new_zeros(rank - r, A.shape[1])
    B_pad = B.new_zeros(B.shape[0], rank - r)
    return LoraFactors(torch.cat([A, A_pad], 0), torch.cat([B, B_pad], 1), scale)
