"""LoRA on peft: per-layer ranks, the alpha policy, and moving adapter state in and out.

Targets, ranks and scales are named as in ``autorank.lora.targets``; the states carry the concrete
module paths. peft's own ``scaling`` is checked against ``scale_for`` whenever a state is read
(see ``autorank.lora.adapters``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from autorank.lora.adapters import AdapterState, LoraFactors
from autorank.lora.targets import (
    AlphaPolicy,
    expand_ranks,
    fresh_down_projections,
    head_parameter_names,
    matches,
    peft_alpha,
    scale_for,
)

logger = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name; one adapter per wrapped model


@dataclass(frozen=True)
class _Scaling:
    """The alpha policy a model was wrapped with, kept on it to check peft's ``scaling``."""

    policy: AlphaPolicy
    alpha: float
    alpha_ratio: float


def _check_head(base: nn.Module, head: Sequence[str], targets: Mapping[str, int]) -> None:
    head_parameter_names(base, head)  # every head name matches a module
    for name in head:
        if any(matches(p, name) for p in targets):
            raise ValueError(f"head module '{name}' is also a LoRA target")


def seed_lora_init(model: nn.Module, seed: int) -> None:
    """Re-draw every ``A`` (``fresh_down_projections``) and zero ``B``; peft used the global RNG."""
    layers = _lora_layers(model)
    shapes = {p: _factors(layer)[0].shape for p, layer in layers.items()}
    dims = {p: (0, math.prod(s[1:])) for p, s in shapes.items()}
    fresh = fresh_down_projections(dims, {p: s[0] for p, s in shapes.items()}, seed)
    with torch.no_grad():
        for path, layer in layers.items():
            A, B = _factors(layer)
            A.copy_(fresh[path].reshape(A.shape))
            B.zero_()


def reset_head(model: nn.Module) -> None:
    """Put the trained copy of every head module back to the base's own weights."""
    with torch.no_grad():
        for module in _root(model).modules():
            if isinstance(module, ModulesToSaveWrapper):
                own = module.original_module.state_dict()
                module.modules_to_save[ADAPTER].load_state_dict(own)


def wrap_lora(
    base: nn.Module,
    ranks: Mapping[str, int],
    *,
    policy: AlphaPolicy,
    alpha: float,
    alpha_ratio: float,
    dropout: float,
    head: Sequence[str],
    seed: int,
    share_base: bool = False,
) -> PeftModel:
    """A copy of ``base`` with LoRA adapters of per-layer ranks; ``base`` itself is untouched.

    Only the LoRA factors and the ``head`` modules (peft ``modules_to_save``) require grad. ``A``
    is Kaiming-uniform from a generator seeded with ``seed``, ``B`` is zero, so the wrapped model
    starts equal to ``base``.

    Args:
        base: the frozen base model.
        ranks: target key -> rank (``{"fc1": 8, "fc2": 4}``).
        policy, alpha, alpha_ratio: how the scale depends on rank (``scale_for``).
        dropout: LoRA dropout (drawn from the global RNG: keep 0 for exact reproducibility).
        head: modules trained in full and averaged by FedAvg.
        seed: LoRA initialisation seed.
        share_base: the copy shares the base's weight tensors instead of copying them, so many
            wrapped models of one base cost one base in memory and see in-place changes to it
            (FLoRA's merge). Keep the base on the device the models train on.
    """
    per_path = expand_ranks(base, ranks)
    _check_head(base, head, per_path)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    def alpha_at(rank: int) -> float:
        return peft_alpha(rank, policy=policy, alpha=alpha, alpha_ratio=alpha_ratio)

    config = PeftLoraConfig(
        r=max(per_path.values()),
        # peft annotates lora_alpha as int but only divides by it; float alphas are exact.
        lora_alpha=alpha_at(1),  # type: ignore[arg-type]
        target_modules=list(ranks),
        rank_pattern={k: int(r) for k, r in ranks.items()},
        alpha_pattern={k: alpha_at(int(r)) for k, r in ranks.items()},
        lora_dropout=dropout,
        use_rslora=policy == "rslora",
        modules_to_save=list(head) or None,
        bias="none",
    )
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]} if share_base else {}
    model = get_peft_model(copy.deepcopy(base, memo), config)
    setattr(model, "autorank_scaling", _Scaling(policy, alpha, alpha_ratio))  # noqa: B010
    built = {p: int(layer.r[ADAPTER]) for p, layer in _lora_layers(model).items()}
    if built != per_path:
        raise RuntimeError(f"peft built ranks {built}, expected {per_path}: matching rules differ")
    seed_lora_init(model, seed)
    return model


def _root(model: nn.Module) -> nn.Module:
    """The adapted copy of the base model inside a ``PeftModel`` (names relative to the base)."""
    if isinstance(model, PeftModel):
        return cast(nn.Module, model.base_model.model)
    return model


def _factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The live ``A`` and ``B`` weights of a layer.

    Linear: ``[r, d_in]``, ``[d_out, r]``; conv: ``[r, c_in, k_h, k_w]``, ``[c_out, r, 1, 1]``.
    """
    A = cast(torch.Tensor, layer.lora_A[ADAPTER].weight)
    B = cast(torch.Tensor, layer.lora_B[ADAPTER].weight)
    return A, B


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {p: m for p, m in _root(model).named_modules() if isinstance(m, LoraLayer)}


def _head_params(model: nn.Module) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for path, module in _root(model).named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[ADAPTER]
            out.update({f"{path}.{n}": p for n, p in trained.named_parameters()})
    return out


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True)


def get_adapter_state(model: nn.Module) -> AdapterState:
    """The trainable state of a wrapped model as plain CPU float32 tensors.

    Returns:
        ``lora``: path -> ``LoraFactors`` with ``A: [r, d_in]``, ``B: [d_out, r]`` (conv factors
        flattened) and peft's scale; ``extra``: ``"<head path>.<param>"`` -> head tensors.
    """
    scaling: _Scaling | None = getattr(model, "autorank_scaling", None)
    lora: dict[str, LoraFactors] = {}
    for path, layer in _lora_layers(model).items():
        A, B = _factors(layer)
        scale = float(layer.scaling[ADAPTER])
        if scaling is not None:
            expected = scale_for(
                A.shape[0],
                policy=scaling.policy,
                alpha=scaling.alpha,
                alpha_ratio=scaling.alpha_ratio,
            )
            if not math.isclose(scale, expected, rel_tol=1e-6):
                raise RuntimeError(
                    f"peft scaling of '{path}' is {scale}, scale_for says {expected}: "
                    "peft's scaling convention changed"
                )
        lora[path] = LoraFactors(
            _cpu_copy(A).reshape(A.shape[0], -1), _cpu_copy(B).reshape(B.shape[0], -1), scale
        )
    extra = {name: _cpu_copy(p) for name, p in _head_params(model).items()}
    return AdapterState(lora=lora, extra=extra)


def _check_names(kind: str, given: Sequence[str], expected: Sequence[str]) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not fit the model: {kind} missing {missing}, "
            f"unexpected {unexpected}"
        )


def _load_factors(path: str, layer: LoraLayer, factors: LoraFactors) -> None:
    A, B = _factors(layer)
    r = int(layer.r[ADAPTER])
    if factors.rank != r:
        raise ValueError(f"adapter state of '{path}' has rank {factors.rank}, the model has {r}")
    if factors.A.shape[1] * r != A.numel() or factors.B.shape[0] * r != B.numel():
        raise ValueError(
            f"adapter state of '{path}' has A {tuple(factors.A.shape)}, B "
            f"{tuple(factors.B.shape)}; the model's layer has A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}"
        )
    # Keep the product scale * B @ A if the state was made at another scale.
    ratio = factors.scale / float(layer.scaling[ADAPTER])
    A.copy_(factors.A.reshape(A.shape))
    B.copy_((factors.B * ratio).reshape(B.shape))


def set_adapter_state(model: nn.Module, state: AdapterState) -> None:
    """Load a state into a wrapped model in place.

    An empty ``state.lora`` keeps the model's fresh LoRA init (a new round of FLoRA); an empty
    ``state.extra`` keeps its head. Factors made at another scale have ``B`` rescaled so that
    ``scale * B @ A`` is preserved.

    Raises:
        ValueError: layer or head names differ from the model's, or a rank or shape differs
            (the message names the layer).
    """
    layers = _lora_layers(model)
    heads = _head_params(model)
    if state.lora:
        _check_names("LoRA layers", list(state.lora), list(layers))
    if state.extra:
        _check_names("head tensors", list(state.extra), list(heads))
    with torch.no_grad():
        for path, factors in state.lora.items():
            _load_factors(path, layers[path], factors)
        for name, value in state.extra.items():
            if value.shape != heads[name].shape:
                raise ValueError(
                    f"adapter state '{name}' has shape {tuple(value.shape)}, the model has "
                    f"{tuple(heads[name].shape)}"
                )
            heads[name].copy_(value)
