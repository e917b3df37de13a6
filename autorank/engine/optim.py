"""SGD and Adam as ``torch.optim`` computes them, for one model or for a stack of clients.

``torch.optim`` pulls in ``torch._dynamo`` on the first optimiser a process builds (3-4 s of
imports on these machines); these few lines do the same arithmetic without it, and also serve
the batched engine, where every client's state is its own slice of stacked tensors and only the
clients still training step (``step(k)`` updates the first ``k``). Formulas (no dampening,
no Nesterov; Adam with L2 weight decay, as ``torch.optim.Adam``):

- SGD: ``d = g + wd * w``; with momentum ``m``: ``buf = d`` at the first step, then
  ``buf = m * buf + d``, ``d = buf``; ``w -= lr * d``.
- Adam: ``d = g + wd * w``; ``m1 = lerp(m1, d, 1 - b1)``; ``m2 = b2 * m2 + (1 - b2) d^2``;
  ``w -= lr / (1 - b1^t) * m1 / (sqrt(m2) / sqrt(1 - b2^t) + eps)``.
- Clipping, as ``torch.nn.utils.clip_grad_norm_``: ``g *= min(1, c / (||g||_2 + 1e-6))`` over all
  of a model's (or a client's) gradients together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import torch

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults


class OptimSettings(Protocol):
    """What the optimiser reads of the local training settings
    (``autorank.engine.local.TrainSettings`` is one)."""

    @property
    def optimizer(self) -> str: ...
    @property
    def lr(self) -> float: ...
    @property
    def momentum(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def grad_clip(self) -> float | None: ...


class ClientOptimizer:
    """SGD (momentum, weight decay), Adam (L2 weight decay in the gradient) or AdamW (decoupled
    weight decay, Loshchilov and Hutter, ICLR 2019, as ``torch.optim.AdamW``) over ``params``.

    Args:
        params: leaf tensors whose ``.grad`` is filled by backward.
        settings: optimiser, learning rate, momentum, weight decay, clipping norm.
        stacked: the tensors are ``[K, ...]`` stacks of K clients' parameters; each client is
            clipped and updated on its own, and ``step(k)`` touches the first ``k`` only.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], settings: OptimSettings, *, stacked: bool = False
    ) -> None:
        if settings.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(
                f"optimizer must be 'sgd', 'adam' or 'adamw', got {settings.optimizer!r}"
            )
        self.params = list(params)
        self.s = settings
        self.stacked = stacked
        adam = settings.optimizer in ("adam", "adamw")
        self.bufs: list[torch.Tensor | None] = [
            torch.zeros_like(p) if adam else None for p in self.params
        ]
        self.sq = [torch.zeros_like(p) for p in self.params] if adam else []
        self.t = 0

    def _rows(self, t: torch.Tensor, k: int | None) -> torch.Tensor:
        """The first ``k`` clients of a stack (a view), or a single model's tensor as one row."""
        return t[:k] if self.stacked else t[None]

    @torch.no_grad()
    def clip(self, k: int | None = None) -> None:
        """Scale each client's (or the model's) gradients to a global norm of at most the bound."""
        if self.s.grad_clip is None:
            return
        grads = [self._rows(cast(torch.Tensor, p.grad), k) for p in self.params]
        rows = grads[0].shape[0]
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(rows, -1), dim=1) for g in grads])
        total = torch.linalg.vector_norm(norms, dim=0)  # [rows]
        coef = torch.clamp(self.s.grad_clip / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.reshape(rows, *([1] * (g.ndim - 1))))

    @torch.no_grad()
    def step(self, k: int | None = None) -> None:
        """One update of the first ``k`` clients (of the model when not stacked)."""
        self.t += 1
        lr, wd = self.s.lr, self.s.weight_decay
        for j, p in enumerate(self.params):
            w, g = self._rows(p, k), self._rows(cast(torch.Tensor, p.grad), k)
            if self.s.optimizer == "adamw":  # decoupled: the weights shrink, not the gradient
                w.mul_(1 - lr * wd)
                self._adam(j, k, w, g, lr)
                continue
            if wd != 0:
                g = g.add(w, alpha=wd)
            if self.s.optimizer == "adam":
                self._adam(j, k, w, g, lr)
                continue
            if self.s.momentum != 0:
                buf = self.bufs[j]
                if buf is None:  # the first step: every client takes it
                    self.bufs[j] = g.clone() if self.stacked else g[0].clone()
                    g = self._rows(cast(torch.Tensor, self.bufs[j]), k)
                else:
                    g = self._rows(buf, k).mul_(self.s.momentum).add_(g)
            w.add_(g, alpha=-lr)

    def _adam(self, j: int, k: int | None, w: torch.Tensor, g: torch.Tensor, lr: float) -> None:
        m = self._rows(cast(torch.Tensor, self.bufs[j]), k)
        v = self._rows(self.sq[j], k)
        m.lerp_(g, 1 - BETA1)
        v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
        step_size = lr / (1 - BETA1**self.t)
        denom = (v.sqrt() / (1 - BETA2**self.t) ** 0.5).add_(EPS)
        w.addcdiv_(m, denom, value=-step_size)
