"""A trained adapter in peft's own layout: ``PeftModel.from_pretrained(base, folder)`` loads it.

peft keeps a LoRA adapter in two files (what ``PeftModel.save_pretrained`` writes)::

    adapter_config.json          the LoraConfig: r, lora_alpha, target_modules, rank_pattern, ...
    adapter_model.safetensors    base_model.model.<path>.lora_A.weight   A [r, d_in]
                                 base_model.model.<path>.lora_B.weight   B [d_out, r]
                                 base_model.model.<head path>.<param>    (modules_to_save)

They are written here without importing peft (the import costs seconds and the batched engine
never needs it); the tests load them with peft itself. A convolution's factors take peft's shapes,
``A [r, c_in, k_h, k_w]`` and ``B [c_out, r, 1, 1]``.

Scale: peft's is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), so every layer gets
the ``lora_alpha`` of the run's alpha policy at its rank (``targets.peft_alpha``), and ``B`` is
rescaled where a state was made at another scale: each layer's ``scale · B A`` is preserved
(see ``autorank.lora.adapters``). Layers of different ranks use ``rank_pattern`` /
``alpha_pattern``, keyed by the module path as a regular expression (peft matches the keys
against the end of a module's path), for the layers that differ from the config's ``r`` /
``lora_alpha``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from autorank.lora.adapters import AdapterState, LoraFactors
from autorank.lora.settings import LoraSettings
from autorank.lora.targets import layer_dims, peft_alpha

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # peft's name for the wrapped model's root


@dataclass(frozen=True)
class PeftAdapter:
    """One adapter as peft stores it.

    Attributes:
        config: the contents of ``adapter_config.json``.
        tensors: the contents of ``adapter_model.safetensors``, named as peft names them.
    """

    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]

    def save(self, folder: Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True))
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def _peft_factors(
    module: nn.Module, path: str, factors: LoraFactors, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``B`` in the shapes of peft's layer, ``B`` rescaled to ``scale``."""
    d_out, d_in = layer_dims(module, path)
    if tuple(factors.A.shape) != (factors.rank, d_in) or factors.B.shape[0] != d_out:
        raise ValueError(
            f"adapter state of '{path}' has A {tuple(factors.A.shape)}, B "
            f"{tuple(factors.B.shape)}; the base's layer is [d_out, d_in] = [{d_out}, {d_in}]"
        )
    A, B = factors.A, factors.B * (factors.scale / scale)
    if isinstance(module, nn.Conv2d):
        A = A.reshape(factors.rank, module.in_channels, *module.kernel_size)
        B = B.reshape(d_out, factors.rank, 1, 1)
    return A, B


def _common(values: list[int]) -> int:
    """The most frequent value (the largest of equally frequent ones)."""
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def peft_layout(
    base: nn.Module,
    state: AdapterState,
    lora: LoraSettings,
    *,
    base_name_or_path: str | None = None,
) -> PeftAdapter:
    """The adapter ``state`` over ``base`` in peft's layout.

    Args:
        base: the base model the adapter applies to (module paths as in ``state.lora``).
        state: LoRA factors per module path (any ranks) and the head (``modules_to_save``).
        lora: the run's alpha policy and head modules.
        base_name_or_path: recorded as peft's ``base_model_name_or_path`` (a Hub name or folder).

    Returns:
        The config and tensors ``PeftModel.from_pretrained`` reads.

    Raises:
        ValueError: an empty state, or a path or shape that does not fit ``base``.
    """
    if not state.lora:
        raise ValueError("adapter state has no LoRA factors; expected at least one layer")
    ranks = {path: f.rank for path, f in sorted(state.lora.items())}
    alphas = {
        path: peft_alpha(r, policy=lora.policy, alpha=lora.alpha, alpha_ratio=lora.alpha_ratio)
        for path, r in ranks.items()
    }
    r = _common(list(ranks.values()))
    alpha = peft_alpha(r, policy=lora.policy, alpha=lora.alpha, alpha_ratio=lora.alpha_ratio)
    tensors: dict[str, torch.Tensor] = {}
    for path in ranks:
        try:
            module = base.get_submodule(path)
        except AttributeError:
            raise ValueError(f"adapter layer '{path}' matches no module of the base") from None
        A, B = _peft_factors(module, path, state.lora[path], lora.scale(ranks[path]))
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = A
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = B
    tensors |= {f"{_PREFIX}{name}": t for name, t in state.extra.items()}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(ranks),
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
        "use_rslora": lora.policy == "rslora",
        "lora_dropout": lora.dropout,
        "modules_to_save": list(lora.head) if state.extra else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return PeftAdapter(config, tensors)


def relative_to(state: AdapterState, prefix: str) -> AdapterState:
    """The state with ``prefix`` taken off every path: the adapter of a submodule (a wrapper's
    ``model.``), all of whose paths must start with it."""
    names = [*state.lora, *state.extra]
    outside = [n for n in names if not n.startswith(prefix)]
    if outside:
        raise ValueError(f"adapter paths {outside} are not under {prefix!r}")
    cut = len(prefix)
    return AdapterState(
        {p[cut:]: f for p, f in state.lora.items()}, {n[cut:]: t for n, t in state.extra.items()}
    )


def merged_away(state: AdapterState) -> AdapterState:
    """The adapter after its update was merged into the base (FLoRA): same ranks, ``B = 0``.

    The merged base alone carries the update, so an adapter over it adds nothing but the head.
    """
    lora = {
        path: LoraFactors(f.A.clone(), torch.zeros_like(f.B), f.scale)
        for path, f in state.lora.items()
    }
    return AdapterState(lora, dict(state.extra))
