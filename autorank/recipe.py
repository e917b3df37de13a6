"""From a config to the library's objects: the one place that reads an ``ExperimentConfig``.

Everything below it takes slices (a section, a few numbers); the flows, the CLI and the
benchmarks build what they need here, so a setting is turned into arguments once:
the base model (``make_base``), the adapted layers and their rank ranges (``layer_ranges``),
the adapter and local-training settings (``lora_settings``, ``train_settings``), the clients
(``federation_for``) and the rank decision (``assign``; ``rank_table`` previews it from the data
alone).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from autorank.config import ExperimentConfig, ModelConfig
from autorank.data.datasets import DatasetSplits
from autorank.data.federation import Federation, federation_from_config
from autorank.data.text import TEXT_SOURCES, TextOptions
from autorank.engine.local import TrainSettings, pretrain
from autorank.lora.settings import LoraSettings
from autorank.lora.targets import target_sizes
from autorank.models.gguf import ensure_unpacked
from autorank.models.zoo import build_model, default_targets, head_modules, load_base_weights
from autorank.ranking.assigners import assign_ranks
from autorank.ranking.assignment import RankAssignment
from autorank.ranking.profiling import ClientProfile, profile_clients

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


def layer_ranges(config: ExperimentConfig) -> dict[str, tuple[int, int]]:
    """Each adapted layer's [r_min, r_max]: the configured targets, else the model's default."""
    targets = config.lora.target_modules or default_targets(
        config.model.name,
        n_hidden=len(config.model.hidden),
        hf_name_or_path=config.model.hf_name_or_path,
    )
    return {layer: config.lora.range_of(layer) for layer in targets}


def top_ranks(config: ExperimentConfig) -> dict[str, int]:
    """Each adapted layer's maximum rank (the warm-up's, and a client's before its rank)."""
    return {layer: hi for layer, (_, hi) in layer_ranges(config).items()}


def lora_settings(config: ExperimentConfig) -> LoraSettings:
    """The adapter settings of a config (its model's head included)."""
    return LoraSettings.from_config(config.lora, head_modules(config.model.name))


def train_settings(config: ExperimentConfig) -> TrainSettings:
    """The clients' local optimiser and batch size."""
    return TrainSettings.from_config(config.training)


def public_fraction(config: ExperimentConfig) -> float:
    """The share of training data the server keeps for pre-training the base."""
    return config.model.pretrain_fraction if config.model.init == "pretrain" else 0.0


def profile_federation(
    federation: Federation, curves: Sequence[Sequence[float]] | None = None
) -> list[ClientProfile]:
    """Every client's profile: its labels (a causal LM's data: its tokens), size and, given
    the warm-up's loss curves, learning difficulty."""
    return profile_clients(federation.histogram, curves, tokens=federation.tokens)


def text_options(config: ExperimentConfig) -> TextOptions | None:
    """How texts become samples (the model's tokenizer, ``data.max_length``), for text data."""
    if config.data.name not in TEXT_SOURCES:
        return None
    # The config's checks pair text data with a text model, which names its folder.
    assert config.model.hf_name_or_path is not None
    return TextOptions(
        tokenizer=ensure_unpacked(config.model.hf_name_or_path),
        max_length=config.data.max_length,
        text_column=config.data.text_column,
        label_column=config.data.label_column,
        cache_dir=config.data.cache_dir,
        key_column=config.data.key_column,
        blocks=config.model.name == "causal_lm",
        train_keys=config.data.train_keys,
        test_keys=config.data.test_keys,
    )


def federation_for(config: ExperimentConfig) -> Federation:
    """Load the data and lay it out over the clients exactly as a run of this config does."""
    return federation_from_config(
        config.data,
        config.partition,
        public_fraction=public_fraction(config),
        seed=config.seed,
        text=text_options(config),
    )


def untrained_base(config: ExperimentConfig, federation: Federation) -> nn.Module:
    """The base model as built, before any weights are loaded or trained: its shapes are the
    run's."""
    return new_model(config.model, federation.data, seed=config.seed)


def assign(
    config: ExperimentConfig,
    profiles: Sequence[ClientProfile],
    *,
    n_classes: int,
    layer_sizes: Mapping[str, int] | None = None,
) -> RankAssignment:
    """The configured assigner over the clients' profiles, with its caps and budget
    (``layer_sizes``, ``target_sizes`` of the base, count the LoRA parameters)."""
    return assign_ranks(
        config.ranking.assigner,
        profiles,
        settings=config.ranking,
        r_min=config.lora.r_min,
        r_max=config.lora.r_max,
        layers=layer_ranges(config),
        n_classes=n_classes,
        seed=config.seed,
        layer_sizes=layer_sizes,
    )


def rank_table(
    config: ExperimentConfig,
    federation: Federation | None = None,
    *,
    layer_sizes: Mapping[str, int] | None = None,
) -> RankAssignment:
    """Partition, profile (no training) and assign ranks as the config says.

    ``layer_sizes`` (``target_sizes`` of the base) count the LoRA parameters; with
    ``ranking.budget_params`` and none given they come from the untrained base's shapes.
    """
    federation = federation or federation_for(config)
    if layer_sizes is None and config.ranking.budget_params is not None:
        base = untrained_base(config, federation)
        layer_sizes = target_sizes(base, list(layer_ranges(config)))
    return assign(
        config,
        profile_federation(federation),
        n_classes=federation.data.n_classes,
        layer_sizes=layer_sizes,
    )
