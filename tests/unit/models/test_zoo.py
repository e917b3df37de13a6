"""Base models: shapes, module names, seeded init, safetensors I/O, pre-training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autorank.engine.local import pretrain
from autorank.models.zoo import (
    build_model,
    default_targets,
    head_modules,
    load_base_weights,
    save_base_weights,
)


def test_mlp_shapes_and_names() -> None:
    # Prepare
    model = build_model("mlp", input_shape=(1, 28, 28), n_classes=10, hidden=(32, 16, 8), seed=0)
    x = torch.randn(5, 1, 28, 28)

    # Execute
    logits = model(x)

    # Assert
    assert logits.shape == (5, 10)
    names = {n for n, _ in model.named_children()}
    assert names == {"fc1", "fc2", "fc3", "head"}
    assert model.state_dict()["fc1.weight"].shape == (32, 784)
    assert default_targets("mlp", n_hidden=3) == ("fc1", "fc2", "fc3")
    assert head_modules("mlp") == ("head",)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_cnn_shapes_accept_images_and_flat_rows(shape: tuple[int, int, int]) -> None:
    # Prepare
    model = build_model("cnn", input_shape=shape, n_classes=10, hidden=(24,), seed=0)
    x = torch.randn(3, *shape)

    # Execute
    from_images = model(x)
    from_rows = model(x.flatten(1))

    # Assert
    assert from_images.shape == (3, 10)
    assert torch.equal(from_images, from_rows)
    assert {"conv1", "conv2", "fc1", "head"} <= {n for n, _ in model.named_children()}
    assert default_targets("cnn") == ("conv1", "conv2", "fc1")


def test_hf_tiny_vit_from_local_folder(tiny_vit_dir: Path) -> None:
    # Prepare
    x = torch.randn(4, 1, 8, 8)

    # Execute
    model = build_model(
        "hf", input_shape=(1, 8, 8), n_classes=3, hf_name_or_path=str(tiny_vit_dir), seed=0
    )
    logits = model(x)

    # Assert
    assert logits.shape == (4, 3)
    assert torch.equal(model(x.flatten(1)), logits)
    assert default_targets("hf", model=model) == ("q_proj", "v_proj")
    assert head_modules("hf") == ("classifier",)


def test_hf_rejects_wrong_image_shape(tiny_vit_dir: Path) -> None:
    with pytest.raises(ValueError, match="channels"):
        build_model(
            "hf", input_shape=(3, 8, 8), n_classes=10, hf_name_or_path=str(tiny_vit_dir), seed=0
        )


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone() -> None:
    # Prepare
    before = torch.random.get_rng_state()

    # Execute
    a = build_model("mlp", input_shape=(64,), n_classes=10, seed=3)
    b = build_model("mlp", input_shape=(64,), n_classes=10, seed=3)
    c = build_model("mlp", input_shape=(64,), n_classes=10, seed=4)

    # Assert
    weight = "fc1.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "rnn", "input_shape": (64,)}, "model name"),
        ({"name": "cnn", "input_shape": (64,)}, r"\(C, H, W\)"),
        ({"name": "cnn", "input_shape": (1, 2, 2)}, "H, W >= 4"),
        ({"name": "hf", "input_shape": (1, 8, 8)}, "hf_name_or_path"),
        ({"name": "mlp", "input_shape": (64,), "hidden": ()}, "hidden"),
    ],
)
def test_build_model_rejects_bad_input(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(n_classes=10, seed=0, **kwargs)  # type: ignore[arg-type]


def test_safetensors_round_trip(tmp_path: Path) -> None:
    # Prepare
    source = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(16,), seed=1)
    target = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(16,), seed=2)
    path = tmp_path / "sub" / "base.safetensors"

    # Execute
    save_base_weights(source, path)
    load_base_weights(target, path)

    # Assert
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_load_base_weights_errors(tmp_path: Path) -> None:
    # Prepare
    model = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(16, 16), seed=0)
    fewer = tmp_path / "fewer.safetensors"
    save_base_weights(
        build_model("mlp", input_shape=(64,), n_classes=10, hidden=(16,), seed=0), fewer
    )
    wider = tmp_path / "wider.safetensors"
    save_base_weights(
        build_model("mlp", input_shape=(64,), n_classes=10, hidden=(32, 16), seed=0), wider
    )
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")

    # Execute / Assert
    with pytest.raises(ValueError, match="not found"):
        load_base_weights(model, tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="missing keys"):
        load_base_weights(model, fewer)
    with pytest.raises(ValueError, match=r"'fc1.(weight|bias)' has shape \(32"):
        load_base_weights(model, wider)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_base_weights(model, garbage)


def test_pretrain_lowers_loss() -> None:
    # Prepare
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = (x[:, 0] > 0).long()
    model = build_model("mlp", input_shape=(16,), n_classes=2, hidden=(16,), seed=0)

    # Execute
    losses = pretrain(model, x, y, epochs=5, lr=0.1, batch_size=32, seed=0)

    # Assert
    assert len(losses) == 5
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.requires_grad for p in model.parameters())
