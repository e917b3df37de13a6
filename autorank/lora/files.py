"""An adapter state as named tensors and as a standalone safetensors file: the format that the
checkpoints, the logged model and ``autorank.serving`` share. Read with safetensors only, never
by unpickling."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from autorank.lora.adapters import AdapterState, LoraFactors


class CheckpointError(ValueError):
    """A checkpoint or adapter file that is missing, corrupt, or written for another experiment."""


def state_tensors(prefix: str, state: AdapterState) -> dict[str, torch.Tensor]:
    """Flatten an adapter state into named tensors (``prefix/lora/<layer>/A`` ...)."""
    out: dict[str, torch.Tensor] = {}
    for layer, f in state.lora.items():
        out[f"{prefix}/lora/{layer}/A"] = f.A.detach().cpu().clone().contiguous()
        out[f"{prefix}/lora/{layer}/B"] = f.B.detach().cpu().clone().contiguous()
        out[f"{prefix}/lora/{layer}/scale"] = torch.tensor(f.scale, dtype=torch.float64)
    for name, t in state.extra.items():
        out[f"{prefix}/extra/{name}"] = t.detach().cpu().clone().contiguous()
    return out


def state_from_tensors(prefix: str, tensors: Mapping[str, torch.Tensor]) -> AdapterState:
    """Rebuild the adapter state written by ``state_tensors`` under ``prefix``."""
    lora_parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        head, _, rest = key.partition("/")
        if head != prefix:
            continue
        kind, _, name = rest.partition("/")
        if kind == "extra":
            extra[name] = t
        elif kind == "lora":
            layer, _, part = name.rpartition("/")
            lora_parts.setdefault(layer, {})[part] = t
    lora = {}
    for layer, parts in lora_parts.items():
        if set(parts) != {"A", "B", "scale"}:
            raise CheckpointError(
                f"adapter {prefix!r} layer {layer!r} is incomplete: {sorted(parts)}"
            )
        lora[layer] = LoraFactors(parts["A"], parts["B"], float(parts["scale"]))
    return AdapterState(lora, extra)


def save_adapter(path: Path, state: AdapterState, metadata: Mapping[str, str]) -> None:
    """Write one adapter state (LoRA factors, scales, head) as a standalone safetensors file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_tensors("adapter", state), str(path), metadata=dict(metadata))


def load_adapter(path: Path) -> AdapterState:
    """Read an adapter written by ``save_adapter``."""
    try:
        return state_from_tensors("adapter", load_file(str(path)))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"adapter file {str(path)!r} is unreadable: {err}") from None
