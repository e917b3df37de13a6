"""Fixtures shared by the library's unit tests."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT (1x8x8 images, 10 labels) saved as safetensors in a local folder."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_channels=1,
        num_labels=10,  # type: ignore[call-arg]
    )
    folder = tmp_path_factory.mktemp("tiny_vit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    return folder
