"""What a sample is scored by, shared by both engines and every evaluation.

- ``classification``: logits ``[b, C]`` against labels ``y [b]``; cross-entropy, top-1
  accuracy. Each sample weighs 1.
- ``causal_lm``: logits ``[b, L, V]`` of packed token samples ``x [b, 2, L]`` (ids, then the
  attention mask); the target of position ``t`` is token ``t + 1`` where both are real tokens
  (padding and the last position score nothing), so a sample weighs its number of scored
  tokens and every mean is per token. Accuracy is next-token top-1 accuracy; perplexity is
  ``exp`` of the mean token loss. ``y`` is not read.

``per_sample`` gives, for any leading shape (a batch ``[b]``, or a cohort's ``[K, b]`` in the
batched engine), each sample's summed loss and its weight; ``loss`` is the batch's weighted
mean, as the local loop minimises it. For classification the engines keep their plain
cross-entropy, so results are the same bit for bit as before this module existed.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

ObjectiveName = Literal["classification", "causal_lm"]
OBJECTIVES: tuple[ObjectiveName, ...] = get_args(ObjectiveName)


def objective_of(model: nn.Module) -> ObjectiveName:
    """The objective a base declares (its ``objective`` attribute, found through the wrappers
    peft and the functional template put around it); classification when none does."""
    for module in model.modules():
        name = getattr(module, "objective", None)
        if isinstance(name, str):
            if name not in OBJECTIVES:
                raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
            return name
    return "classification"


def per_sample(
    objective: ObjectiveName, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's summed loss, weight and correct predictions, all ``[...]``.

    Args:
        logits: ``[..., C]`` (classification) or ``[..., L, V]`` (causal LM).
        y: labels ``[...]`` (classification).
        x: the samples, ``[..., 2, L]`` for causal LM (its targets and mask).
    """
    if objective == "classification":
        C = logits.shape[-1]
        lead = logits.shape[:-1]
        loss = F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="none")
        correct = (logits.argmax(dim=-1) == y).to(logits.dtype)
        return loss.view(lead), torch.ones_like(loss.view(lead)), correct
    targets, keep = _next_tokens(x)
    V = logits.shape[-1]
    scored = logits[..., :-1, :]
    tokens = F.cross_entropy(scored.reshape(-1, V), targets.reshape(-1), reduction="none").view(
        targets.shape
    )
    weight = keep.to(logits.dtype)
    hits = (scored.argmax(dim=-1) == targets).to(logits.dtype)
    return (tokens * weight).sum(dim=-1), weight.sum(dim=-1), (hits * weight).sum(dim=-1)


def loss(
    objective: ObjectiveName, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """The batch's mean loss: per sample (classification) or per scored token (causal LM)."""
    if objective == "classification":
        return F.cross_entropy(logits, y)
    summed, weight, _ = per_sample(objective, logits, y, x)
    return summed.sum() / weight.sum().clamp_min(1.0)


def _next_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target ids ``[..., L-1]`` (token ``t + 1``) and where both ``t`` and ``t + 1`` are
    real tokens."""
    ids, mask = x[..., 0, :], x[..., 1, :]
    return ids[..., 1:], (mask[..., 1:] > 0) & (mask[..., :-1] > 0)
