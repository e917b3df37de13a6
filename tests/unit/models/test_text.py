"""Pretrained text classifiers behind ``x -> logits``, on a tiny BERT built in memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from autorank.data.text import TextOptions, tokenize
from autorank.engine.batched import BatchedBackend
from autorank.engine.factory import why_not_batched
from autorank.engine.jobs import ClientJob
from autorank.engine.local import TrainSettings, client_seed
from autorank.engine.sequential import SequentialBackend
from autorank.lora.settings import LoraSettings
from autorank.models.evaluation import evaluate
from autorank.models.objectives import loss, objective_of
from autorank.models.packaged import pretrained_folder, text_targets
from autorank.models.zoo import (
    build_model,
    default_targets,
    head_modules,
    load_base_weights,
    save_base_weights,
)
from tests.unit.conftest import tiny_text_corpus
from tests.unit.engine.test_batched import _assert_same

CPU = torch.device("cpu")
L = 12


def _packed(folder: Path, texts: list[str]) -> torch.Tensor:
    return torch.from_numpy(tokenize(texts, TextOptions(tokenizer=folder, max_length=L)))


def _classifier(folder: Path, seed: int = 0) -> torch.nn.Module:
    return build_model(
        "text_classifier", input_shape=(2, L), n_classes=3, hf_name_or_path=str(folder), seed=seed
    )


def test_logits_equal_the_transformers_model_with_its_own_mask(tiny_bert_dir: Path) -> None:
    model = _classifier(tiny_bert_dir).eval()
    x = _packed(tiny_bert_dir, ["good day", "the film was not so great"])

    with torch.no_grad():
        ours = model(x)
        theirs = model.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits

    assert ours.shape == (2, 3)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_large_batch_in_length_sorted_chunks_gives_the_same_logits(tiny_bert_dir: Path) -> None:
    model = _classifier(tiny_bert_dir).eval()
    texts, _ = tiny_text_corpus(150)
    x = _packed(tiny_bert_dir, [t + " very" * (i % 7) for i, t in enumerate(texts)])

    with torch.no_grad():
        whole = model(x)  # 150 samples: three chunks of up to 64
        one_by_one = torch.cat([model(x[i : i + 1]) for i in range(len(x))])

    assert_close(whole, one_by_one, rtol=1e-5, atol=1e-6)


def test_the_new_head_is_seeded_and_dropout_is_off(tiny_bert_dir: Path) -> None:
    a, b = _classifier(tiny_bert_dir, seed=3), _classifier(tiny_bert_dir, seed=3)
    x = _packed(tiny_bert_dir, ["good day"])

    a.train()  # dropout off: train mode computes what eval mode does
    with torch.no_grad():
        assert torch.equal(a(x), b.eval()(x))
    assert a.model.config.hidden_dropout_prob == 0.0


def test_targets_and_head_follow_the_architecture(tiny_bert_dir: Path) -> None:
    assert text_targets(tiny_bert_dir) == ("query", "value")
    assert default_targets("text_classifier", hf_name_or_path=str(tiny_bert_dir)) == (
        "query",
        "value",
    )
    assert head_modules("text_classifier") == ("classifier",)


def test_a_folder_without_a_model_and_a_too_long_sample_are_refused(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="is not a transformers model folder"):
        pretrained_folder(str(tmp_path))
    with pytest.raises(ValueError, match=r"data.max_length 64 exceeds .* 32 positions"):
        build_model(
            "text_classifier",
            input_shape=(2, 64),
            n_classes=3,
            hf_name_or_path=str(tiny_bert_dir),
            seed=0,
        )


def test_an_unknown_architecture_has_no_default_targets(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))

    with pytest.raises(ValueError, match="no default LoRA targets for model_type 't5'"):
        text_targets(tmp_path)


def test_both_engines_train_text_clients_alike(tiny_bert_dir: Path) -> None:
    # Prepare: three clients of unequal size, ranks 1-4 on query and value, the head trained
    base = _classifier(tiny_bert_dir).requires_grad_(False).eval()
    lora = LoraSettings("proportional", 8.0, 2.0, 0.0, ("classifier",))
    train = TrainSettings("adam", 0.01, 0.0, 0.0, 4, None)
    jobs = []
    for i, (n, r) in enumerate([(6, 1), (9, 4), (5, 2)]):
        texts, labels = tiny_text_corpus(n, seed=i)
        x, y = _packed(tiny_bert_dir, texts), torch.tensor(labels)
        jobs.append(ClientJob(i, {"query": r, "value": r}, None, x, y, 2, client_seed(0, 1, i), 2))

    # Execute
    sequential = SequentialBackend(base, lora, train, CPU).train_clients(jobs)
    batched = BatchedBackend(base, ["query", "value"], lora, train, CPU).train_clients(jobs)

    # Assert: the 4-D mask lets vmap trace the model, and the results agree
    assert why_not_batched(base, ["query", "value"], lora, jobs[0].x) is None
    assert [o.result.steps for o in sequential] == [4, 4, 4]
    _assert_same(batched, sequential)


def _lm(folder: Path) -> torch.nn.Module:
    # n_classes is not read: the logits are over the vocabulary
    path = str(folder)
    return build_model("causal_lm", input_shape=(2, L), n_classes=2, hf_name_or_path=path, seed=0)


def test_the_token_loss_equals_the_transformers_models_own(tiny_llama_dir: Path) -> None:
    model = _lm(tiny_llama_dir).eval()
    x = _packed(tiny_llama_dir, ["good day", "the film was not so great", "bad"])
    labels = x[:, 0].masked_fill(x[:, 1] == 0, -100)  # padding scores nothing

    with torch.no_grad():
        ours = loss("causal_lm", model(x), torch.zeros(3, dtype=torch.long), x)
        theirs = model.model(input_ids=x[:, 0], attention_mask=x[:, 1], labels=labels).loss
        result = evaluate(model, x, torch.zeros(3, dtype=torch.long), device=CPU)

    assert objective_of(model) == "causal_lm" and head_modules("causal_lm") == ()
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert result.loss == pytest.approx(float(theirs), rel=1e-5)
    assert 0.0 <= result.accuracy <= 1.0 and result.n == 3


def test_both_engines_train_a_causal_lm_alike(tiny_llama_dir: Path) -> None:
    # Prepare: LoRA on Llama's four attention projections, no head, per-token losses
    base = _lm(tiny_llama_dir).requires_grad_(False).eval()
    targets = list(text_targets(tiny_llama_dir))
    lora = LoraSettings("proportional", 8.0, 2.0, 0.0, ())
    train = TrainSettings("adam", 0.01, 0.0, 0.0, 4, None)
    jobs = []
    for i, (n, r) in enumerate([(6, 1), (9, 4), (5, 2)]):
        texts, _ = tiny_text_corpus(n, seed=i)
        x, y = _packed(tiny_llama_dir, texts), torch.zeros(n, dtype=torch.long)
        jobs.append(ClientJob(i, dict.fromkeys(targets, r), None, x, y, 2, client_seed(0, 1, i), 2))

    # Execute
    sequential = SequentialBackend(base, lora, train, CPU).train_clients(jobs)
    batched = BatchedBackend(base, targets, lora, train, CPU).train_clients(jobs)

    # Assert
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    _assert_same(batched, sequential)


def test_a_causal_lm_s_evaluation_reports_its_perplexity(tiny_llama_dir: Path) -> None:
    model = _lm(tiny_llama_dir).eval()
    x = _packed(tiny_llama_dir, ["good day", "the film was not so great"])

    result = evaluate(model, x, torch.zeros(2, dtype=torch.long), device=CPU)

    assert result.per_token and result.perplexity == pytest.approx(math.exp(result.loss))


def test_a_tied_output_layer_is_saved_once_and_tied_again_on_load(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the tiny Llama ties its output layer to its embeddings, as SmolLM2 does
    model = _lm(tiny_llama_dir)
    with torch.no_grad():
        model.model.model.embed_tokens.weight.add_(1.0)
    path = tmp_path / "base.safetensors"

    # Execute
    save_base_weights(model, path)
    fresh = _lm(tiny_llama_dir)
    load_base_weights(fresh, path)

    # Assert
    assert "model.lm_head.weight" not in load_file(str(path))
    assert fresh.model.lm_head.weight is fresh.model.model.embed_tokens.weight
    for name, t in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["text_classifier", "causal_lm"])
def test_text_clients_train_on_cuda_as_on_the_cpu(
    kind: str, tiny_bert_dir: Path, tiny_llama_dir: Path
) -> None:
    # Prepare: the same three clients, both engines, on CUDA and on the CPU
    folder = tiny_bert_dir if kind == "text_classifier" else tiny_llama_dir
    base = (_classifier(folder) if kind == "text_classifier" else _lm(folder)).requires_grad_(False)
    targets = list(text_targets(folder))
    head = ("classifier",) if kind == "text_classifier" else ()
    lora = LoraSettings("proportional", 8.0, 2.0, 0.0, head)
    train = TrainSettings("adam", 0.01, 0.0, 0.0, 4, None)
    jobs = []
    for i, (n, r) in enumerate([(6, 1), (9, 4), (5, 2)]):
        texts, labels = tiny_text_corpus(n, seed=i)
        x, y = _packed(folder, texts), torch.tensor(labels)
        jobs.append(ClientJob(i, dict.fromkeys(targets, r), None, x, y, 2, client_seed(0, 1, i), 2))
    cuda = torch.device("cuda")

    # Execute
    cpu = SequentialBackend(base, lora, train, CPU).train_clients(jobs)
    on_gpu = SequentialBackend(base, lora, train, cuda).train_clients(jobs)
    batched = BatchedBackend(base, targets, lora, train, cuda).train_clients(jobs)

    # Assert: float32 on two devices: equal up to round-off
    for results in (on_gpu, batched):
        for a, b in zip(results, cpu, strict=True):
            assert a.result.epoch_losses == pytest.approx(b.result.epoch_losses, rel=1e-4)
            for path, f in b.result.state.lora.items():
                got = a.result.state.lora[path]
                assert got.A.device.type == "cpu"
                torch.testing.assert_close(got.delta(), f.delta(), rtol=1e-3, atol=1e-5)
