"""Accuracy and cross-entropy of a model on a split, by its objective (``models.objectives``):
per sample for a classifier, per scored token for a causal LM."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from autorank.models.objectives import objective_of, per_sample

_LM_BATCH = 16


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one model on one split.

    Attributes:
        accuracy: share of correct top-1 predictions (next tokens for a causal LM), in [0, 1].
        loss: mean cross-entropy per sample (per scored token for a causal LM).
        n: number of samples evaluated.
        per_token: scored token by token (a causal LM), so ``perplexity`` means something.
    """

    accuracy: float
    loss: float
    n: int
    per_token: bool = False

    @property
    def perplexity(self) -> float:
        """``exp(loss)``, for a causal LM's per-token loss (inf past float range)."""
        return math.exp(self.loss) if self.loss < 700 else math.inf


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device,
) -> EvalResult:
    """Evaluate without gradients in eval mode; the model's train/eval mode is restored after.

    Args:
        model: maps ``x [b, ...]`` to logits ``[b, n_classes]``; moved to ``device``.
        x: inputs ``[n, ...]``; y: integer labels ``[n]``.
        batch_size: samples per forward pass.
        device: where to evaluate.

    Returns:
        Accuracy, mean loss and ``n``.
    """
    n = x.shape[0]
    if n == 0 or n != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same positive number of samples, got {n} and {y.shape[0]}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    objective = objective_of(model)
    if objective == "causal_lm":
        batch_size = min(batch_size, _LM_BATCH)  # logits are [b, L, V]: a vocabulary per token
    was_training = model.training
    model.to(device)
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    weight = torch.zeros((), device=device, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device=device, dtype=torch.long)
            logits = model(xb)
            if objective == "classification":
                loss_sum += nn.functional.cross_entropy(logits.float(), yb, reduction="sum")
                correct += (logits.argmax(dim=1) == yb).sum()
                weight += yb.shape[0]
            else:
                summed, w, hits = per_sample(objective, logits.float(), yb, xb)
                loss_sum += summed.sum()
                correct += hits.sum()
                weight += w.sum()
    model.train(was_training)
    total = max(float(weight), 1.0)
    accuracy, mean = float(correct) / total, float(loss_sum) / total
    return EvalResult(accuracy, mean, n, per_token=objective == "causal_lm")
