"""LoRA targets without peft: which modules are adapted, their shapes, scales and fresh factors.

Layer names are module paths relative to the base model (``fc1``, or
``model.vit.encoder.layer.0.attention.attention.query`` for a wrapped transformers model). A key
of ``ranks`` selects every module whose path equals it or ends with ``.<key>`` (peft's rule), so
``{"query": 8}`` adapts every attention query.

``scale_for`` is the one place that says how the LoRA scale depends on rank; peft's own
``scaling`` is checked against it (``autorank.lora.peft``) and the batched engine uses it directly
(``autorank.engine.batched``). Nothing here imports peft, so commands that never wrap a peft
model do not pay for importing it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, cast

import torch
from torch import nn

AlphaPolicy = Literal["fixed", "proportional", "rslora"]
ALPHA_POLICIES: tuple[AlphaPolicy, ...] = ("fixed", "proportional", "rslora")


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


def peft_alpha(rank: int, *, policy: AlphaPolicy, alpha: float, alpha_ratio: float) -> float:
    """peft's ``lora_alpha`` at ``rank`` that makes peft's scaling equal ``scale_for(rank, ...)``.

    ``fixed`` and ``rslora`` keep ``alpha`` (peft divides by ``r`` or, with ``use_rslora``, by
    ``sqrt(r)``); ``proportional`` gives ``alpha_ratio * r``.
    """
    scale_for(rank, policy=policy, alpha=alpha, alpha_ratio=alpha_ratio)  # validates the policy
    return alpha_ratio * rank if policy == "proportional" else alpha


def matches(path: str, key: str) -> bool:
    """peft's target rule: the path is the key, or ends with ``.<key>``."""
    return path == key or path.endswith("." + key)


def layer_dims(module: nn.Module, path: str) -> tuple[int, int]:
    """``(d_out, d_in)`` of a LoRA target (conv: ``d_in = c_in * k_h * k_w``).

    Raises:
        ValueError: the module is neither ``nn.Linear`` nor an ungrouped ``nn.Conv2d``.
    """
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
        selected = [k for k in ranks if matches(path, k)]
        if selected:
            layer_dims(module, path)
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
    return {p: layer_dims(base.get_submodule(p), p) for p in paths}


def target_sizes(base: nn.Module, targets: Sequence[str]) -> dict[str, int]:
    """``d_in + d_out`` summed over the modules each target selects: a rank-``r`` adapter on
    the target trains ``r`` times this many parameters (``A: [r, d_in]``, ``B: [d_out, r]``).

    A module selected by several targets counts for the first, as in ``expand_ranks``.
    """
    sizes = dict.fromkeys(targets, 0)
    for path, (d_out, d_in) in target_dims(base, targets).items():
        sizes[next(k for k in targets if matches(path, k))] += d_out + d_in
    return sizes


def head_parameter_names(base: nn.Module, head: Sequence[str]) -> list[str]:
    """``"<module path>.<param>"`` of every parameter of the modules named by ``head``.

    These are the names adapter states use for the head (``AdapterState.extra``).

    Raises:
        ValueError: a head name that matches no module.
    """
    names: list[str] = []
    for key in head:
        found = [(p, m) for p, m in base.named_modules() if p and matches(p, key)]
        if not found:
            raise ValueError(f"head module '{key}' matches no module of {type(base).__name__}")
        for path, module in found:
            names += [f"{path}.{n}" for n, _ in module.named_parameters()]
    return names


def fresh_down_projections(
    dims: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], seed: int
) -> dict[str, torch.Tensor]:
    """A fresh down-projection ``A: [r, d_in]`` per path; ``B`` starts at zero.

    Kaiming-uniform (``a = sqrt(5)``, peft's init) drawn from one generator seeded with
    ``seed``, layers in sorted path order, so any engine that builds the same ranks from the
    same seed starts from the same factors (the global RNG is never touched).

    Args:
        dims: path -> ``(d_out, d_in)`` (``target_dims``).
        ranks: path -> rank.
        seed: initialisation seed.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for path in sorted(ranks):
        A = torch.empty(ranks[path], dims[path][1], dtype=torch.float32)
        # A conv's A [r, c_in, k_h, k_w] has the same fan-in and draw order as this flat view.
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        out[path] = A
    return out


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
            inner = getattr(module, "get_base_layer", None)  # a peft LoraLayer wraps the base
            if callable(inner):
                module = cast(nn.Module, inner())
            dims = layer_dims(module, path)
            if tuple(d.shape) != dims:
                raise ValueError(
                    f"base delta '{path}' has shape {tuple(d.shape)}, expected {dims} [d_out, d_in]"
                )
            weight = cast(torch.Tensor, module.weight)
            weight.add_(d.to(device=weight.device, dtype=weight.dtype).reshape(weight.shape))
