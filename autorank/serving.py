"""The trained global model rebuilt for inference, from files alone.

The architecture comes from a JSON description (``ModelSpec``), the weights from safetensors
files (never from a pickle), and the LoRA update is applied as the server's evaluation applies it
(``lora.functional.bind_state`` over the final base), so predictions equal those behind the run's
``global/accuracy``. Inputs are samples as ``autorank.data.datasets`` stores them: flattened and
normalised, ``x [n, C*H*W]`` (or ``[n, C, H, W]``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from autorank.lora.files import load_adapter
from autorank.lora.functional import LoraTemplate, bind_state
from autorank.models.zoo import MODEL_NAMES, ModelName, build_model, load_base_weights

SPEC_FORMAT = 1
Output = Literal["class", "probabilities"]
OUTPUTS: tuple[Output, ...] = get_args(Output)


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds the base's architecture (``models.build_model``); weights come from a file.

    Attributes:
        name: ``mlp``, ``cnn`` or ``hf``.
        input_shape: one sample's shape, e.g. ``(1, 8, 8)``.
        n_classes: number of logits.
        hidden: hidden widths (``mlp``), ``fc1`` width (``cnn``).
        head: modules trained in full next to LoRA (``models.head_modules``).
        hf_name_or_path: the transformers model (``hf``); its config is read from there.
    """

    name: ModelName
    input_shape: tuple[int, ...]
    n_classes: int
    hidden: tuple[int, ...]
    head: tuple[str, ...]
    hf_name_or_path: str | None = None

    def to_json(self) -> str:
        """The description as JSON text (``from_json`` reads it back)."""
        return json.dumps({"format": SPEC_FORMAT, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Read a description written by ``to_json``.

        Raises:
            ValueError: not JSON, another format, or a missing or unknown field.
        """
        try:
            raw: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"model description is not JSON: {err}") from None
        if not isinstance(raw, dict) or raw.pop("format", None) != SPEC_FORMAT:
            raise ValueError(f"model description must be a JSON object of format {SPEC_FORMAT}")
        if raw.get("name") not in MODEL_NAMES:
            raise ValueError(f"model name must be one of {MODEL_NAMES}, got {raw.get('name')!r}")
        try:
            return cls(
                name=raw.pop("name"),
                input_shape=tuple(raw.pop("input_shape")),
                n_classes=int(raw.pop("n_classes")),
                hidden=tuple(raw.pop("hidden")),
                head=tuple(raw.pop("head")),
                hf_name_or_path=raw.pop("hf_name_or_path", None),
                **raw,  # an unknown field is refused by the constructor
            )
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"model description is incomplete or has unknown fields: {err}"
            ) from None

    def build(self) -> nn.Module:
        """The architecture with placeholder weights (seed 0); load the real ones into it."""
        return build_model(
            self.name,
            input_shape=self.input_shape,
            n_classes=self.n_classes,
            hidden=self.hidden,
            hf_name_or_path=self.hf_name_or_path,
            seed=0,
        )


def load_base(spec: ModelSpec, weights: Path) -> nn.Module:
    """The frozen base: ``spec``'s architecture with the weights of a safetensors file."""
    base = spec.build()
    load_base_weights(base, weights)
    base.requires_grad_(False)
    return base.eval()


@dataclass(frozen=True)
class Classifier:
    """The global model and where it runs.

    Attributes:
        module: ``x -> logits [n, n_classes]``.
        device: where ``module`` runs.
    """

    module: nn.Module
    device: torch.device

    def predict(
        self, x: np.ndarray, *, output: str = "class", batch_size: int = 1024
    ) -> np.ndarray:
        """Class predictions ``[n]`` (int64), or class probabilities ``[n, n_classes]`` (float32).

        Args:
            x: samples ``[n, C*H*W]`` or ``[n, C, H, W]``, normalised as ``autorank.data`` does.
            output: ``class`` or ``probabilities``.
            batch_size: samples per forward pass.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        with torch.no_grad():
            logits = torch.cat(
                [
                    self.module(inputs[i : i + batch_size].to(self.device)).float().cpu()
                    for i in range(0, len(inputs), batch_size)
                ]
            )
        if output == "class":
            return logits.argmax(dim=1).numpy()
        return torch.softmax(logits, dim=1).numpy()


def load_classifier(
    spec_file: Path, base_file: Path, adapter_file: Path, device: torch.device | None = None
) -> Classifier:
    """The global model from its description, base and adapter files.

    Args:
        spec_file: ``ModelSpec`` JSON.
        base_file: the final base weights (safetensors; FLoRA's merges included).
        adapter_file: the served adapter (``checkpoint.save_adapter``).
        device: where to run (default CPU).
    """
    spec = ModelSpec.from_json(spec_file.read_text())
    state = load_adapter(adapter_file)
    where = device or torch.device("cpu")
    template = LoraTemplate(load_base(spec, base_file), sorted(state.lora), spec.head, where)
    return Classifier(bind_state(template, state), where)
