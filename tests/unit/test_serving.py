"""The global model rebuilt from its files predicts what the server's evaluation measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autorank.lora.adapters import AdapterState
from autorank.lora.files import save_adapter
from autorank.lora.functional import LoraTemplate, evaluate_state
from autorank.lora.settings import LoraSettings
from autorank.models.zoo import save_base_weights
from autorank.rounds.steps import initial_state
from autorank.serving import ModelSpec, load_classifier

CPU = torch.device("cpu")
SPEC = ModelSpec("mlp", (1, 4, 4), 3, (6, 5), ("head",))


def _files(tmp_path: Path) -> tuple[Path, Path, Path, torch.nn.Module, AdapterState]:
    """The three files of a model whose adapter is not zero, and the base and state in them."""
    base = SPEC.build()
    with torch.no_grad():  # a base unlike the placeholder weights the spec builds
        for p in base.parameters():
            p.add_(0.1)
    lora = LoraSettings("rslora", alpha=8.0, alpha_ratio=2.0, dropout=0.0, head=("head",))
    state = initial_state(base, [{"fc1": 3, "fc2": 2}], lora, seed=1)
    for f in state.lora.values():
        f.B.normal_(generator=torch.Generator().manual_seed(2))
    spec, weights, adapter = tmp_path / "model.json", tmp_path / "base.st", tmp_path / "a.st"
    spec.write_text(SPEC.to_json())
    save_base_weights(base, weights)
    save_adapter(adapter, state, {})
    return spec, weights, adapter, base, state


def test_spec_round_trips_through_json() -> None:
    assert ModelSpec.from_json(SPEC.to_json()) == SPEC


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "not JSON"),
        ('{"format": 9, "name": "mlp"}', "format 1"),
        ('{"format": 1, "name": "rnn"}', "one of"),
        ('{"format": 1, "name": "mlp", "input_shape": [4]}', "incomplete"),
        (SPEC.to_json().replace('"head"', '"heads"'), "incomplete or has unknown"),
    ],
)
def test_spec_refuses_what_it_cannot_rebuild(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelSpec.from_json(text)


def test_classifier_predicts_exactly_what_the_evaluation_counted(tmp_path: Path) -> None:
    # Prepare
    spec, weights, adapter, base, state = _files(tmp_path)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 1, 4, 4, generator=gen), torch.randint(0, 3, (50,), generator=gen)

    # Execute
    classifier = load_classifier(spec, weights, adapter)
    classes = classifier.predict(x.numpy().reshape(50, -1))
    probabilities = classifier.predict(x.numpy(), output="probabilities", batch_size=7)

    # Assert
    template = LoraTemplate(base, ["fc1", "fc2"], ("head",), CPU)
    evaluated = evaluate_state(template, state, x, y)
    assert classes.dtype == np.int64 and classes.shape == (50,)
    assert float(np.mean(classes == y.numpy())) == evaluated.accuracy
    assert probabilities.shape == (50, 3) and np.allclose(probabilities.sum(axis=1), 1.0)
    assert np.array_equal(probabilities.argmax(axis=1), classes)


def test_predict_refuses_an_unknown_output(tmp_path: Path) -> None:
    classifier = load_classifier(*_files(tmp_path)[:3])

    with pytest.raises(ValueError, match=r"output must be one of .* got 'logits'"):
        classifier.predict(np.zeros((2, 16), dtype=np.float32), output="logits")
