"""The project's SGD, Adam and AdamW against torch.optim, for one model and a stack of clients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from autorank.engine.local import TrainSettings
from autorank.engine.optim import ClientOptimizer

SETTINGS = {
    "sgd": TrainSettings("sgd", 0.1, 0.0, 0.0, 8, None),
    "momentum": TrainSettings("sgd", 0.1, 0.9, 0.01, 8, None),
    "adam": TrainSettings("adam", 0.01, 0.0, 0.001, 8, None),
    "clipped": TrainSettings("adam", 0.01, 0.0, 0.0, 8, 0.05),
    "adamw": TrainSettings("adamw", 0.01, 0.0, 0.1, 8, None),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _torch_optim(params: list[nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(6, 5, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_matches_torch_optim_step_for_step(name: str) -> None:
    # Prepare
    s = SETTINGS[name]
    ours, ref = _model(), _model()
    opt = ClientOptimizer(list(ours.parameters()), s)
    ref_opt = _torch_optim(list(ref.parameters()), s)

    # Execute
    for step in range(5):
        for model in (ours, ref):
            model.zero_grad(set_to_none=True)
            _loss(model, step).backward()
        opt.clip()
        opt.step()
        if s.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(ref.parameters()), s.grad_clip)
        ref_opt.step()

    # Assert
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_stack_steps_each_client_alone_and_only_the_active_ones(name: str) -> None:
    # Prepare: 3 clients' copies of one weight; client 2 stops after step 1
    s = SETTINGS[name]
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(3, 4, 2, generator=gen)
    stack = start.clone().requires_grad_(True)
    singles = [start[i].clone().requires_grad_(True) for i in range(3)]
    opt = ClientOptimizer([stack], s, stacked=True)
    single_opts = [ClientOptimizer([w], s) for w in singles]
    target = torch.randn(3, 4, 2, generator=gen)

    # Execute
    for step in range(4):
        k = 3 if step < 2 else 2
        stack.grad = None
        ((stack[:k] - target[:k]) ** 2).sum().backward()
        opt.clip(k)
        opt.step(k)
        for i in range(k):
            singles[i].grad = None
            ((singles[i] - target[i]) ** 2).sum().backward()
            single_opts[i].clip()
            single_opts[i].step()

    # Assert
    for i in range(3):
        assert_close(stack[i].detach(), singles[i].detach(), rtol=1e-6, atol=1e-7)


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer must be 'sgd', 'adam' or 'adamw'"):
        ClientOptimizer([], TrainSettings("rmsprop", 0.1, 0.0, 0.0, 8, None))  # type: ignore[arg-type]
