"""LoRA on peft: per-layer ranks, the alpha policy, and moving adapter state in and out.

Layer names are module paths relative to the base model (``fc1``, or
``model.vit.encoder.layer.0.attention.attention.query`` for a wrapped transformers model). A key
of ``ranks`` selects every module whose path equals it or ends with ``.<key>`` (peft's rule), so
``{"query": 8}`` adapts every attention query; the states carry the concrete paths.

Scaling: ``scale_for`` is the one place that says how the LoRA scale depends on rank; peft's own
``scaling`` is checked against it whenever a state is read (see ``autorank.adapters``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from autorank.adapters import AdapterState, LoraFactors

logger = logging.getLogger(__name__)

AlphaPolicy = Literal["fixed", "proportional", "rslora"]
ALPHA_POLICIES: tuple[AlphaPolicy, ...] = ("fixed", "proportional", "rslora")
ADAPTER = "default"  # peft's adapter name; one adapter per wrapped model


def scale_for(rank: int, *, policy: AlphaPolicy, alpha: float, alpha_ratio: float) -> float:
    """The LoRA scale at ``rank``: ``delta W = scale * B @ A``.

    ``fixed``: ``alpha / r`` (peft's default); ``proportional``: peft's ``lora_alpha`` is
    ``alpha_ratio * r``, so the scale is ``alpha_ratio`` at every rank; ``rslora``:
    ``alpha / sqrt(r)`` (Kalajdzievski 2023).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if alpha <= 0 or alpha_ratio <= 0:
        raise ValueError(f"alpha and alpha_ratio must be > 0, got {alpha} and {alpha_ratio}")
    if policy == "fixed":
        return alpha / rank
    if policy == "proportional":
        return alpha_ratio
    if policy == "rslora":
        return alpha / math.sqrt(rank)
    raise ValueError(f"alpha policy must be one of {ALPHA_POLICIES}, got {policy!r}")


def _lora_alpha(rank: int, policy: AlphaPolicy, alpha: float, alpha_ratio: float) -> float:
    """peft's ``lora_alpha`` that yields ``scale_for(rank, ...)``."""
    return alpha_ratio * rank if policy == "proportional" else alpha


@dataclass(frozen=True)
class _Scaling:
    """The alpha policy a model was wrapped with, kept on it to check peft's ``scaling``."""

    policy: AlphaPolicy
    alpha: float
    alpha_ratio: float


def _matches(path: str, key: str) -> bool:
    return path == key or path.endswith("." + key)


def _dims(module: nn.Module, path: str) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        k_h, k_w = module.kernel_size
        return module.out_channels, module.in_channels * k_h * k_w
    raise ValueError(
        f"LoRA target '{path}' is a {type(module).__name__}; expected nn.Linear or an "
        "ungrouped nn.Conv2d"
    )


def expand_ranks(base: nn.Module, ranks: Mapping[str, int]) -> dict[str, int]:
    """Concrete module path -> rank for every module selected by a key of ``ranks``.

    The first matching key wins, as in peft's ``rank_pattern``.

    Raises:
        ValueError: a rank below 1, a key that selects nothing, or a target that is neither
            ``nn.Linear`` nor an ungrouped ``nn.Conv2d``.
    """
    if not ranks:
        raise ValueError("ranks must name at least one target module")
    for key, r in ranks.items():
        if int(r) != r or r < 1:
            raise ValueError(f"rank of '{key}' must be an integer >= 1, got {r}")
    out: dict[str, int] = {}
    hit: set[str] = set()
    for path, module in base.named_modules():
        selected = [k for k in ranks if _matches(path, k)]
        if selected:
            _dims(module, path)
            out[path] = int(ranks[selected[0]])
            hit.add(selected[0])
    missing = [k for k in ranks if k not in hit]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no module of {type(base).__name__}")
    return out


def target_dims(base: nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of each module the targets select (conv: ``d_in = c_in * k_h * k_w``).

    ``min(d_out, d_in)`` is the largest rank that adds expressiveness to that layer.
    """
    paths = expand_ranks(base, dict.fromkeys(targets, 1))
    return {p: _dims(base.get_submodule(p), p) for p in paths}


def _check_head(base: nn.Module, head: Sequence[str], targets: Mapping[str, int]) -> None:
    paths = [p for p, _ in base.named_modules()]
    for name in head:
        if not any(_matches(p, name) for p in paths):
            raise ValueError(f"head module '{name}' matches no module of {type(base).__name__}")
        if any(_matches(p, name) for p in targets):
            raise ValueError(f"head module '{name}' is also a LoRA target")


def _seed_lora_init(model: PeftModel, seed: int) -> None:
    """Re-draw every ``A`` from a local generator (peft's init uses the global RNG); ``B = 0``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(_lora_layers(model).items()):
            A, B = _factors(layer)
            fresh = torch.empty(A.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
            A.copy_(fresh)
            B.zero_()


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
    """
    per_path = expand_ranks(base, ranks)
    _check_head(base, head, per_path)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    scale_for(1, policy=policy, alpha=alpha, alpha_ratio=alpha_ratio)  # validates the policy
    config = PeftLoraConfig(
        r=max(per_path.values()),
        # peft annotates lora_alpha as int but only divides by it; float alphas are exact.
        lora_alpha=_lora_alpha(1, policy, alpha, alpha_ratio),  # type: ignore[arg-type]
        target_modules=list(ranks),
        rank_pattern={k: int(r) for k, r in ranks.items()},
        alpha_pattern={
            k: _lora_alpha(int(r), policy, alpha, alpha_ratio) for k, r in ranks.items()
        },
        lora_dropout=dropout,
        use_rslora=policy == "rslora",
        modules_to_save=list(head) or None,
        bias="none",
    )
    model = get_peft_model(copy.deepcopy(base), config)
    setattr(model, "autorank_scaling", _Scaling(policy, alpha, alpha_ratio))  # noqa: B010
    built = {p: int(layer.r[ADAPTER]) for p, layer in _lora_layers(model).items()}
    if built != per_path:
        raise RuntimeError(f"peft built ranks {built}, expected {per_path}: matching rules differ")
    _seed_lora_init(model, seed)
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


def merge_base_delta(base: nn.Module, delta: Mapping[str, torch.Tensor]) -> None:
    """Add dense updates ``[d_out, d_in]`` into the base weights in place (FLoRA's merge).

    Conv deltas are reshaped to ``[c_out, c_in, k_h, k_w]``.

    Raises:
        ValueError: a name that is no Linear/Conv2d of ``base`` or a delta of the wrong shape.
    """
    with torch.no_grad():
        for path, d in delta.items():
            try:
                module = base.get_submodule(path)
            except AttributeError:
                raise ValueError(f"base delta '{path}' matches no module of the base") from None
            if isinstance(module, LoraLayer):
                module = module.get_base_layer()
            dims = _dims(module, path)
            if tuple(d.shape) != dims:
                raise ValueError(
                    f"base delta '{path}' has shape {tuple(d.shape)}, expected {dims} [d_out, d_in]"
                )
            weight = cast(torch.Tensor, module.weight)
            weight.add_(d.to(device=weight.device, dtype=weight.dtype).reshape(weight.shape))
