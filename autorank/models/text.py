"""Pretrained transformers for text, behind the plain ``x -> logits`` interface of every base.

A sample is the packed ``[2, L]`` int64 row of ``autorank.data.text``: token ids, then the
attention mask. ``TextClassifier`` unpacks it and builds the additive 4-D attention mask itself,
``[n, 1, 1, L]`` (0 where attended, the dtype's minimum elsewhere): given a 2-D mask,
transformers 5 inspects it with ``mask.all()``, a data-dependent branch that ``torch.func.vmap``
(the batched engine) refuses; a 4-D float mask is passed through as it is, with the same
logits. Dropout inside the pretrained model is switched off, as in the image bases: the
sequential engine trains in ``train()`` mode and the batched one in ``eval()``, and both must
compute the same function (LoRA's own dropout is ``lora.dropout``).

Models come from a local transformers folder, or by the name of a model that a registry
package ships (``models.packaged``), so that runs need no network.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autorank.models.gguf import ensure_unpacked
from autorank.models.packaged import max_positions

_CHUNK = 64  # samples per forward of a large batch (sorted by length)
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout")


class TextClassifier(nn.Module):
    """A transformers sequence classifier over packed samples ``x [n, 2, L]`` -> ``[n, C]``.

    Args:
        model: an ``AutoModelForSequenceClassification`` instance, kept as ``self.model`` (its
            classification head is ``model.classifier``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_batched(x) or x.shape[0] <= _CHUNK:
            return self._logits(*_trimmed(x))
        # An evaluation's large batch: by length, in chunks each cut to its longest sample.
        order = x[:, 1].sum(dim=1).argsort()
        parts = [self._logits(*_trimmed(x[i])) for i in order.split(_CHUNK)]
        return torch.cat(parts)[order.argsort()]

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        logits: torch.Tensor = self.model(
            input_ids=ids, attention_mask=additive_mask(mask, dtype)
        ).logits
        return logits


class CausalLM(nn.Module):
    """A transformers causal language model over packed samples ``x [n, 2, L]`` -> next-token
    logits ``[n, L, V]``, scored per token (``objective``); it has no head to train (Llama's
    output layer is tied to its embeddings).

    Args:
        model: an ``AutoModelForCausalLM`` instance, kept as ``self.model``.
    """

    objective = "causal_lm"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        dtype = next(self.model.parameters()).dtype
        logits: torch.Tensor = self.model(
            input_ids=ids, attention_mask=causal_mask(mask, dtype)
        ).logits
        return logits


def causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, L]`` padding mask -> ``[n, 1, L, L]`` additive: position ``t`` attends to the real
    tokens ``s <= t``."""
    L = mask.shape[1]
    past = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    keep = past[None, None] & (mask[:, None, None, :] > 0)
    return (~keep).to(dtype) * torch.finfo(dtype).min


def _trimmed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask cut to the batch's longest sample: padding costs as much as text (a tweet
    is 33 tokens of 64), and right padding is masked, so the logits are the same. Under vmap
    (the batched engine) a batch-dependent length cannot be traced: there the full length."""
    ids, mask = x[:, 0], x[:, 1]
    if _is_batched(x) or mask.shape[1] == 0:
        return ids, mask
    longest = int(mask.sum(dim=1).max())
    return ids[:, : max(longest, 1)], mask[:, : max(longest, 1)]


def _is_batched(x: torch.Tensor) -> bool:
    probe = getattr(torch._C._functorch, "is_batchedtensor", None)
    return probe is None or bool(probe(x))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, L]`` 0/1 attention mask -> ``[n, 1, 1, L]`` additive: 0 kept, dtype's min masked."""
    keep = mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def build_text_classifier(name_or_path: str, n_classes: int, max_length: int) -> TextClassifier:
    """The pretrained model with a fresh ``n_classes`` head (seeded by the caller), dropout off.

    Raises:
        ValueError: not a model folder, or ``max_length`` above the model's positions.
    """
    from transformers import AutoModelForSequenceClassification

    folder, config = _pretrained(name_or_path, max_length, num_labels=n_classes)
    with _quiet_transformers():  # its load report lists the new head as "missing"
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), config=config, ignore_mismatched_sizes=True
        )
    return TextClassifier(model.float())


def build_causal_lm(name_or_path: str, max_length: int) -> CausalLM:
    """The pretrained causal LM, dropout off.

    Raises:
        ValueError: not a model folder, or ``max_length`` above the model's positions.
    """
    from transformers import AutoModelForCausalLM

    folder, config = _pretrained(name_or_path, max_length)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(folder), config=config)
    return CausalLM(model.float())


def _pretrained(name_or_path: str, max_length: int, **settings: Any) -> tuple[Path, Any]:
    """The model's folder and its config with dropout off, once ``max_length`` fits it."""
    from transformers import AutoConfig

    folder = ensure_unpacked(name_or_path)
    longest = max_positions(folder)
    if longest is not None and max_length > longest:
        raise ValueError(
            f"data.max_length {max_length} exceeds {name_or_path}'s {longest} positions; "
            f"expected at most {longest}"
        )
    config = AutoConfig.from_pretrained(str(folder), **settings)
    for field in _DROPOUT_FIELDS:
        if hasattr(config, field):
            setattr(config, field, 0.0)
    return folder, config


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
