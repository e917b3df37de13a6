"""peft's adapter layout, written without peft, read back by peft itself."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from autorank.lora.adapters import AdapterState, LoraFactors
from autorank.lora.export import CONFIG_FILE, WEIGHTS_FILE, merged_away, peft_layout
from autorank.lora.functional import LoraTemplate, bind_state
from autorank.lora.settings import LoraSettings
from autorank.lora.targets import AlphaPolicy, expand_ranks, head_parameter_names, target_dims
from autorank.models.zoo import build_model

CPU = torch.device("cpu")


def _lora(policy: AlphaPolicy = "proportional", head: tuple[str, ...] = ("head",)) -> LoraSettings:
    return LoraSettings(policy, alpha=8.0, alpha_ratio=2.0, dropout=0.0, head=head)


def _state(
    base: nn.Module,
    ranks: dict[str, int],
    lora: LoraSettings,
    *,
    scale_factor: float = 1.0,
    seed: int = 0,
) -> AdapterState:
    """Random factors at ``ranks`` (module paths) and a perturbed copy of the base's head."""
    gen = torch.Generator().manual_seed(seed)
    dims = target_dims(base, list(ranks))
    lora_factors = {
        path: LoraFactors(
            0.3 * torch.randn(r, dims[path][1], generator=gen),
            0.3 * torch.randn(dims[path][0], r, generator=gen),
            lora.scale(r) * scale_factor,
        )
        for path, r in ranks.items()
    }
    own = dict(base.named_parameters())
    head = {
        n: own[n].detach() + 0.1 * torch.randn(own[n].shape, generator=gen)
        for n in head_parameter_names(base, lora.head)
    }
    return AdapterState(lora_factors, head)


def _mlp() -> nn.Module:
    return build_model("mlp", input_shape=(1, 4, 4), n_classes=3, hidden=(6, 5), seed=0).eval()


def _peft_logits(base: nn.Module, folder: Path, x: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    with torch.no_grad():
        return model(x)


def _own_logits(
    base: nn.Module,
    state: AdapterState,
    head: tuple[str, ...],
    x: torch.Tensor,
    targets: list[str] | None = None,
) -> torch.Tensor:
    """The project's global model (what the server evaluates) on ``x``."""
    template = LoraTemplate(base, targets or sorted(state.lora), head, CPU)
    with torch.no_grad():
        return bind_state(template, state)(x)


def test_layout_names_tensors_as_peft_and_patterns_the_odd_layer() -> None:
    # Prepare
    base, lora = _mlp(), _lora("proportional")
    state = _state(base, {"fc1": 3, "fc2": 2}, lora)

    # Execute
    adapter = peft_layout(base, state, lora)

    # Assert
    assert sorted(adapter.tensors) == [
        "base_model.model.fc1.lora_A.weight",
        "base_model.model.fc1.lora_B.weight",
        "base_model.model.fc2.lora_A.weight",
        "base_model.model.fc2.lora_B.weight",
        "base_model.model.head.bias",
        "base_model.model.head.weight",
    ]
    config = adapter.config
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["fc1", "fc2"]
    assert (config["r"], config["lora_alpha"]) == (3, 6.0)  # ties: the larger rank
    assert config["rank_pattern"] == {"fc2": 2}
    assert config["alpha_pattern"] == {"fc2": 4.0}  # proportional: alpha = 2 r
    assert config["modules_to_save"] == ["head"] and config["use_rslora"] is False
    assert torch.equal(adapter.tensors["base_model.model.fc1.lora_A.weight"], state.lora["fc1"].A)
    assert torch.equal(adapter.tensors["base_model.model.fc2.lora_B.weight"], state.lora["fc2"].B)
    assert torch.equal(adapter.tensors["base_model.model.head.bias"], state.extra["head.bias"])


@pytest.mark.parametrize("policy", ["fixed", "proportional", "rslora"])
def test_layout_keeps_each_layers_product_and_fixed_alpha_needs_no_pattern(
    policy: AlphaPolicy,
) -> None:
    base, lora = _mlp(), _lora(policy)
    state = _state(base, {"fc1": 4, "fc2": 2}, lora, scale_factor=1.5)  # made at another scale

    adapter = peft_layout(base, state, lora)

    for path, f in state.lora.items():
        B = adapter.tensors[f"base_model.model.{path}.lora_B.weight"]
        assert_close(lora.scale(f.rank) * B, f.scale * f.B)
    assert adapter.config["alpha_pattern"] == ({"fc2": 4.0} if policy == "proportional" else {})
    assert adapter.config["use_rslora"] is (policy == "rslora")


@pytest.mark.parametrize("policy", ["fixed", "proportional", "rslora"])
def test_peft_loads_the_folder_and_computes_what_the_project_computes(
    policy: AlphaPolicy, tmp_path: Path
) -> None:
    base, lora = _mlp(), _lora(policy)
    state = _state(base, {"fc1": 4, "fc2": 2}, lora, scale_factor=0.5)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))

    peft_layout(base, state, lora).save(tmp_path)

    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    assert_close(_peft_logits(base, tmp_path, x), _own_logits(base, state, ("head",), x))


def test_convolution_factors_take_peft_shapes(tmp_path: Path) -> None:
    base = build_model("cnn", input_shape=(1, 8, 8), n_classes=3, hidden=(7,), seed=0).eval()
    lora = _lora("fixed")
    state = _state(base, {"conv1": 3, "conv2": 2, "fc1": 2}, lora)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))

    adapter = peft_layout(base, state, lora)
    adapter.save(tmp_path)

    assert adapter.tensors["base_model.model.conv2.lora_A.weight"].shape == (2, 32, 3, 3)
    assert adapter.tensors["base_model.model.conv2.lora_B.weight"].shape == (64, 2, 1, 1)
    assert adapter.config["rank_pattern"] == {"conv1": 3}
    assert_close(_peft_logits(base, tmp_path, x), _own_logits(base, state, ("head",), x))


def test_nested_paths_are_patterns_that_match_only_their_own_layer(
    tiny_vit_dir: Path, tmp_path: Path
) -> None:
    base = build_model(
        "hf", input_shape=(1, 8, 8), n_classes=10, hf_name_or_path=str(tiny_vit_dir), seed=0
    ).eval()
    lora = _lora("proportional", head=("classifier",))
    paths = expand_ranks(base, {"q_proj": 2, "v_proj": 2})
    first = next(p for p in sorted(paths) if ".0." in p)  # model.vit.layers.0.attention.q_proj
    ranks = {p: (3 if p == first else 2) for p in paths}
    state = _state(base, ranks, lora)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))

    adapter = peft_layout(base, state, lora, base_name_or_path=str(tiny_vit_dir))
    adapter.save(tmp_path)

    assert adapter.config["rank_pattern"] == {first.replace(".", r"\."): 3}
    assert adapter.config["base_model_name_or_path"] == str(tiny_vit_dir)
    assert load_file(str(tmp_path / WEIGHTS_FILE))[
        f"base_model.model.{first}.lora_A.weight"
    ].shape == (3, 16)
    assert_close(_peft_logits(base, tmp_path, x), _own_logits(base, state, ("classifier",), x))


def test_a_merged_adapter_keeps_its_ranks_and_adds_nothing() -> None:
    base, lora = _mlp(), _lora()
    state = _state(base, {"fc1": 3, "fc2": 2}, lora)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))

    merged = merged_away(state)

    assert merged.ranks() == state.ranks()
    assert all(not f.B.any() and torch.equal(f.A, state.lora[p].A) for p, f in merged.lora.items())
    head_only = AdapterState({}, dict(state.extra))
    assert torch.equal(
        _own_logits(base, merged, ("head",), x),
        _own_logits(base, head_only, ("head",), x, targets=["fc1", "fc2"]),
    )


def test_layout_refuses_an_empty_state_or_a_layer_the_base_lacks() -> None:
    base, lora = _mlp(), _lora()
    state = _state(base, {"fc1": 2}, lora)
    stray = AdapterState({"fc9": state.lora["fc1"]}, {})

    with pytest.raises(ValueError, match="no LoRA factors"):
        peft_layout(base, AdapterState({}, dict(state.extra)), lora)
    with pytest.raises(ValueError, match="'fc9' matches no module"):
        peft_layout(base, stray, lora)
