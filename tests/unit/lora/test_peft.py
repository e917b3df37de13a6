"""LoRA on peft: the scale convention, frozen base, get/set round trips, per-layer ranks, merges."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from torch import nn

from autorank.lora.adapters import AdapterState, LoraFactors
from autorank.lora.peft import get_adapter_state, set_adapter_state, wrap_lora
from autorank.lora.targets import (
    AlphaPolicy,
    expand_ranks,
    merge_base_delta,
    scale_for,
    target_dims,
)
from autorank.models.zoo import build_model

POLICIES: tuple[AlphaPolicy, ...] = ("fixed", "proportional", "rslora")


class TwoLayer(nn.Module):
    """``head(fc1(x))`` with no nonlinearity, so the expected output is written by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc1(x))


def _wrap(
    base: nn.Module, ranks: dict[str, int], policy: AlphaPolicy = "fixed", seed: int = 0
) -> PeftModel:
    return wrap_lora(
        base,
        ranks,
        policy=policy,
        alpha=8.0,
        alpha_ratio=2.0,
        dropout=0.0,
        head=("head",),
        seed=seed,
    )


def _random_state(state: AdapterState, seed: int) -> AdapterState:
    """The same structure as ``state`` with random factors (B nonzero) and random head."""
    gen = torch.Generator().manual_seed(seed)
    lora = {
        k: LoraFactors(
            torch.randn(f.A.shape, generator=gen), torch.randn(f.B.shape, generator=gen), f.scale
        )
        for k, f in state.lora.items()
    }
    extra = {k: torch.randn(v.shape, generator=gen) for k, v in state.extra.items()}
    return AdapterState(lora=lora, extra=extra)


@pytest.mark.parametrize(
    ("policy", "rank", "expected"),
    [
        ("fixed", 4, 2.0),
        ("fixed", 16, 0.5),
        ("proportional", 4, 2.0),
        ("proportional", 16, 2.0),
        ("rslora", 4, 4.0),
        ("rslora", 16, 2.0),
    ],
)
def test_scale_for_table(policy: AlphaPolicy, rank: int, expected: float) -> None:
    assert scale_for(rank, policy=policy, alpha=8.0, alpha_ratio=2.0) == pytest.approx(expected)


def test_scale_for_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rank must be >= 1"):
        scale_for(0, policy="fixed", alpha=8.0, alpha_ratio=2.0)
    with pytest.raises(ValueError, match="alpha policy"):
        scale_for(2, policy="linear", alpha=8.0, alpha_ratio=2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", POLICIES)
def test_output_is_base_plus_scaled_product(policy: AlphaPolicy) -> None:
    # Prepare
    torch.manual_seed(0)
    base = TwoLayer()
    model = _wrap(base, {"fc1": 3}, policy)
    state = _random_state(get_adapter_state(model), seed=1)
    set_adapter_state(model, state)
    x = torch.randn(6, 5)
    A, B = state.lora["fc1"].A, state.lora["fc1"].B
    W, b = state.extra["head.weight"], state.extra["head.bias"]
    scale = {"fixed": 8.0 / 3, "proportional": 2.0, "rslora": 8.0 / math.sqrt(3)}[policy]

    # Execute
    out = model(x)

    # Assert
    hidden = base.fc1(x) + scale * (x @ A.T) @ B.T
    torch.testing.assert_close(out, hidden @ W.T + b)
    assert state.lora["fc1"].scale == pytest.approx(scale)


def test_only_lora_and_head_train_and_base_is_untouched() -> None:
    # Prepare
    base = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(32, 16), seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}

    # Execute
    model = _wrap(base, {"fc1": 4, "fc2": 2})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    # Assert
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == get_adapter_state(model).num_parameters()
    assert isinstance(base.fc1, nn.Linear) and all(p.requires_grad for p in base.parameters())
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


def test_fresh_adapter_is_a_no_op_and_seeded() -> None:
    # Prepare
    base = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(32, 16), seed=0)
    x = torch.randn(4, 64)

    # Execute
    a, b, c = (get_adapter_state(_wrap(base, {"fc1": 4}, seed=s)) for s in (7, 7, 8))

    # Assert
    torch.testing.assert_close(_wrap(base, {"fc1": 4})(x), base(x))
    assert torch.equal(a.lora["fc1"].A, b.lora["fc1"].A)
    assert not torch.equal(a.lora["fc1"].A, c.lora["fc1"].A)
    assert torch.count_nonzero(a.lora["fc1"].B) == 0


def test_per_layer_ranks_and_round_trip() -> None:
    # Prepare
    base = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(32, 16), seed=0)
    model = _wrap(base, {"fc1": 3, "fc2": 5}, policy="rslora")
    state = _random_state(get_adapter_state(model), seed=2)

    # Execute
    set_adapter_state(model, state)
    back = get_adapter_state(model)

    # Assert
    assert back.ranks() == {"fc1": 3, "fc2": 5}
    assert back.lora["fc1"].A.shape == (3, 64) and back.lora["fc2"].B.shape == (16, 5)
    for k, f in state.lora.items():
        assert torch.equal(back.lora[k].A, f.A) and torch.equal(back.lora[k].B, f.B)
    assert all(torch.equal(back.extra[k], v) for k, v in state.extra.items())


def test_set_state_errors_name_the_layer() -> None:
    # Prepare
    base = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(32, 16), seed=0)
    model = _wrap(base, {"fc1": 3, "fc2": 3})
    other = get_adapter_state(_wrap(base, {"fc1": 4, "fc2": 3}))
    renamed = AdapterState({"fc1": other.lora["fc2"]}, {})
    bad_head = AdapterState({}, {"head.weight": torch.zeros(2, 2), "head.bias": torch.zeros(10)})

    # Execute / Assert
    with pytest.raises(ValueError, match="'fc1' has rank 4"):
        set_adapter_state(model, other)
    with pytest.raises(ValueError, match=r"missing \['fc2'\]"):
        set_adapter_state(model, renamed)
    with pytest.raises(ValueError, match=r"'head\.weight' has shape"):
        set_adapter_state(model, bad_head)


def test_empty_lora_keeps_fresh_init_and_sets_head() -> None:
    # Prepare
    base = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(32,), seed=0)
    model = _wrap(base, {"fc1": 2})
    fresh = get_adapter_state(model)
    head = {"head.weight": torch.ones(10, 32), "head.bias": torch.zeros(10)}

    # Execute
    set_adapter_state(model, AdapterState({}, head))
    after = get_adapter_state(model)

    # Assert
    assert torch.equal(after.lora["fc1"].A, fresh.lora["fc1"].A)
    assert torch.equal(after.extra["head.weight"], head["head.weight"])


def test_state_at_another_scale_keeps_the_product() -> None:
    # Prepare
    base = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(32,), seed=0)
    model = _wrap(base, {"fc1": 4})
    state = _random_state(get_adapter_state(model), seed=3)
    f = state.lora["fc1"]
    foreign = AdapterState({"fc1": LoraFactors(f.A, f.B, f.scale * 3)}, {})

    # Execute
    set_adapter_state(model, foreign)

    # Assert
    torch.testing.assert_close(
        get_adapter_state(model).lora["fc1"].delta(), foreign.lora["fc1"].delta()
    )


def test_conv_factors_flatten_and_merge_matches_peft() -> None:
    # Prepare
    base = build_model("cnn", input_shape=(1, 8, 8), n_classes=10, hidden=(16,), seed=0)
    model = _wrap(base, {"conv1": 2, "conv2": 3, "fc1": 4}, policy="rslora")
    state = _random_state(get_adapter_state(model), seed=4)
    set_adapter_state(model, state)
    x = torch.randn(3, 1, 8, 8)
    merged = build_model("cnn", input_shape=(1, 8, 8), n_classes=10, hidden=(16,), seed=0)

    # Execute
    merge_base_delta(merged, {k: f.delta() for k, f in state.lora.items()})
    merged.get_submodule("head").load_state_dict(
        {"weight": state.extra["head.weight"], "bias": state.extra["head.bias"]}
    )

    # Assert
    assert state.lora["conv1"].A.shape == (2, 9) and state.lora["conv2"].B.shape == (64, 3)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-4)


def test_merge_base_delta_errors() -> None:
    base = build_model("mlp", input_shape=(64,), n_classes=10, hidden=(32,), seed=0)
    with pytest.raises(ValueError, match="'fc9' matches no module"):
        merge_base_delta(base, {"fc9": torch.zeros(32, 64)})
    with pytest.raises(ValueError, match=r"expected \(32, 64\)"):
        merge_base_delta(base, {"fc1": torch.zeros(64, 32)})


def test_targets_are_validated_and_expanded() -> None:
    # Prepare
    base = build_model("cnn", input_shape=(1, 8, 8), n_classes=10, hidden=(16,), seed=0)

    # Execute / Assert
    assert expand_ranks(base, {"conv1": 2, "fc1": 4}) == {"conv1": 2, "fc1": 4}
    assert target_dims(base, ["conv1", "fc1"]) == {"conv1": (32, 9), "fc1": (16, 256)}
    with pytest.raises(ValueError, match=r"\['fc7'\] match no module"):
        _wrap(base, {"fc7": 2})
    with pytest.raises(ValueError, match="'pool' is a MaxPool2d"):
        _wrap(base, {"pool": 2})
    with pytest.raises(ValueError, match="rank of 'fc1'"):
        _wrap(base, {"fc1": 0})
    with pytest.raises(ValueError, match="'head' is also a LoRA target"):
        _wrap(base, {"head": 2})
