"""The frozen base model every client adapts: built, then initialised as configured."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from autorank.config import ModelConfig
from autorank.data import DatasetSplits
from autorank.models import build_model, load_base_weights, pretrain

logger = logging.getLogger(__name__)


def new_model(settings: ModelConfig, data: DatasetSplits, *, seed: int) -> nn.Module:
    """The configured model for ``data``'s inputs and classes, seeded, nothing loaded or trained:
    its shapes are a run's."""
    return build_model(
        settings.name,
        input_shape=data.input_shape,
        n_classes=data.n_classes,
        hidden=settings.hidden,
        hf_name_or_path=settings.hf_name_or_path,
        seed=seed,
    )


def make_base(
    settings: ModelConfig,
    data: DatasetSplits,
    public: np.ndarray,
    *,
    lr: float,
    batch_size: int,
    seed: int,
) -> nn.Module:
    """Build the base model and initialise it: seeded random, a safetensors file, or pre-trained.

    ``pretrain`` trains every weight for ``settings.pretrain_epochs`` on the server's public
    share of the training split (``public`` indices), so that LoRA adapts something meaningful.
    The returned model is frozen (no parameter requires grad).
    """
    model = new_model(settings, data, seed=seed)
    if settings.init == "safetensors":
        assert settings.weights_path is not None  # the config validator guarantees it
        load_base_weights(model, settings.weights_path)
    elif settings.init == "pretrain" and settings.pretrain_epochs > 0 and len(public) > 0:
        x, y = data.arrays("train")
        losses = pretrain(
            model,
            torch.from_numpy(x[public]),
            torch.from_numpy(y[public]),
            epochs=settings.pretrain_epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
        )
        logger.info("pre-trained the base on %d public samples: losses %s", len(public), losses)
    model.requires_grad_(False)
    return model.eval()
