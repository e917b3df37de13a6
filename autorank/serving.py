"""The trained global model rebuilt for inference, from files alone.

The architecture comes from a JSON description (``ModelSpec``), the weights from safetensors
files (never from a pickle), and the LoRA update is applied as the server's evaluation applies it
(``lora.functional.bind_state`` over the final base), so predictions equal those behind the run's
``global/accuracy``. Inputs are samples as ``autorank.data.datasets`` stores them: flattened and
normalised, ``x [n, C*H*W]`` (or ``[n, C, H, W]``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from autorank.data.text import TextEncoder
from autorank.lora.adapters import AdapterState
from autorank.lora.files import load_adapter
from autorank.lora.functional import LoraTemplate, bind_state
from autorank.lora.targets import merge_base_delta
from autorank.models.gguf import ensure_unpacked
from autorank.models.packaged import pretrained_folder
from autorank.models.zoo import MODEL_NAMES, ModelName, build_model, load_base_weights

SPEC_FORMAT = 1
Output = Literal["class", "probabilities"]
OUTPUTS: tuple[Output, ...] = get_args(Output)


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds the base's architecture (``models.build_model``); weights come from a file.

    Attributes:
        name: ``mlp``, ``cnn`` or ``hf``.
        input_shape: one sample's shape, e.g. ``(1, 8, 8)``.
        n_classes: number of logits.
        hidden: hidden widths (``mlp``), ``fc1`` width (``cnn``).
        head: modules trained in full next to LoRA (``models.head_modules``).
        hf_name_or_path: the transformers model (``hf``, ``text_classifier``); its config (and
            a text model's tokenizer) is read from there.
        label_names: the classes' names, which a text classifier predicts.
        base_file: whether the base's weights are a file of the run (``True``), or the
            pretrained model's own (a text model that the run did not change: no copy).
    """

    name: ModelName
    input_shape: tuple[int, ...]
    n_classes: int
    hidden: tuple[int, ...]
    head: tuple[str, ...]
    hf_name_or_path: str | None = None
    label_names: tuple[str, ...] = ()
    base_file: bool = True

    def to_json(self) -> str:
        """The description as JSON text (``from_json`` reads it back)."""
        return json.dumps({"format": SPEC_FORMAT, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Read a description written by ``to_json``.

        Raises:
            ValueError: not JSON, another format, or a missing or unknown field.
        """
        try:
            raw: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"model description is not JSON: {err}") from None
        if not isinstance(raw, dict) or raw.pop("format", None) != SPEC_FORMAT:
            raise ValueError(f"model description must be a JSON object of format {SPEC_FORMAT}")
        if raw.get("name") not in MODEL_NAMES:
            raise ValueError(f"model name must be one of {MODEL_NAMES}, got {raw.get('name')!r}")
        try:
            return cls(
                name=raw.pop("name"),
                input_shape=tuple(raw.pop("input_shape")),
                n_classes=int(raw.pop("n_classes")),
                hidden=tuple(raw.pop("hidden")),
                head=tuple(raw.pop("head")),
                hf_name_or_path=raw.pop("hf_name_or_path", None),
                label_names=tuple(raw.pop("label_names", ())),
                **raw,  # an unknown field is refused by the constructor
            )
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"model description is incomplete or has unknown fields: {err}"
            ) from None

    def build(self) -> nn.Module:
        """The architecture with placeholder weights (seed 0); load the real ones into it."""
        return build_model(
            self.name,
            input_shape=self.input_shape,
            n_classes=self.n_classes,
            hidden=self.hidden,
            hf_name_or_path=self.hf_name_or_path,
            seed=0,
        )


def load_base(spec: ModelSpec, weights: Path | None) -> nn.Module:
    """The frozen base: ``spec``'s architecture with the weights of a safetensors file (None:
    the pretrained model's own, where ``spec.base_file`` is false)."""
    base = spec.build()
    if weights is not None:
        load_base_weights(base, weights)
    elif spec.base_file:
        raise ValueError(f"model {spec.name!r} needs its base weights file; none was given")
    base.requires_grad_(False)
    return base.eval()


@dataclass(frozen=True)
class Classifier:
    """The global model and where it runs.

    Attributes:
        module: ``x -> logits [n, n_classes]``.
        device: where ``module`` runs.
        encoder: a text model's tokenizer (raw strings in), None for features.
        label_names: what a text model's ``class`` output names.
    """

    module: nn.Module
    device: torch.device
    encoder: TextEncoder | None = None
    label_names: tuple[str, ...] = ()

    def predict(self, x: Any, *, output: str = "class", batch_size: int = 1024) -> np.ndarray:
        """Class predictions ``[n]``, or class probabilities ``[n, n_classes]`` (float32).

        Args:
            x: samples ``[n, C*H*W]`` or ``[n, C, H, W]``, normalised as ``autorank.data`` does;
                for a text model, ``n`` raw strings (a sequence, or a table's first column).
            output: ``class`` (int64 classes; a text model's label names) or ``probabilities``.
            batch_size: samples per forward pass.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.encoder is not None:
            inputs = torch.from_numpy(self.encoder(_texts(x)))
        else:
            inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        with torch.no_grad():
            logits = torch.cat(
                [
                    self.module(inputs[i : i + batch_size].to(self.device)).float().cpu()
                    for i in range(0, len(inputs), batch_size)
                ]
            )
        if output == "class" and self.encoder is not None and self.label_names:
            return np.asarray(self.label_names, dtype=object)[logits.argmax(dim=1).numpy()]
        if output == "class":
            return logits.argmax(dim=1).numpy()
        return torch.softmax(logits, dim=1).numpy()


def _texts(x: Any) -> list[str]:
    """Raw strings from a sequence, an array or a table (its first column)."""
    columns = getattr(x, "columns", None)
    if columns is not None:  # a pandas DataFrame, as MLflow hands a column of strings over
        x = x["text"] if "text" in columns else x[columns[0]]
    if isinstance(x, np.ndarray) and x.ndim == 2:  # a table as an array: its first column
        x = x[:, 0]
    rows = x.tolist() if hasattr(x, "tolist") else list(x)
    if len(rows) == 1 and isinstance(rows[0], list | tuple):  # one record holding every text
        rows = list(rows[0])
    texts = [str(t) for t in rows]
    if not texts:
        raise ValueError("no texts to classify; expected one string per sample")
    return texts


def load_classifier(
    spec_file: Path,
    base_file: Path | None,
    adapter_file: Path,
    device: torch.device | None = None,
) -> Classifier:
    """The global model from its description, base and adapter files.

    Args:
        spec_file: ``ModelSpec`` JSON.
        base_file: the final base weights (safetensors; FLoRA's merges included), or None for
            a text model's pretrained base (``ModelSpec.base_file`` false).
        adapter_file: the served adapter (``checkpoint.save_adapter``).
        device: where to run (default CPU).
    """
    spec = ModelSpec.from_json(spec_file.read_text())
    state = load_adapter(adapter_file)
    where = device or torch.device("cpu")
    template = LoraTemplate(load_base(spec, base_file), sorted(state.lora), spec.head, where)
    encoder = None
    if spec.name == "text_classifier" and spec.hf_name_or_path:
        encoder = TextEncoder(pretrained_folder(spec.hf_name_or_path), spec.input_shape[-1])
    return Classifier(bind_state(template, state), where, encoder, spec.label_names)


@dataclass(frozen=True)
class Generator:
    """A causal LM's global model (its LoRA update merged into the base), continuing texts.

    Attributes:
        model: the transformers causal LM (``generate``), on ``device``.
        tokenizer: its tokenizer, loaded once.
        device: where it runs.
    """

    model: Any
    tokenizer: Any
    device: torch.device

    def predict(self, x: Any, *, max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of raw strings (a sequence, or a table's ``text`` column)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = []
        for prompt in _texts(x):
            ids = tok(prompt, return_tensors="pt").to(self.device)
            with torch.no_grad():
                made = self.model.generate(
                    **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
                )
            new = made[0, ids["input_ids"].shape[1] :].tolist()
            out.append(str(tok.decode(new, skip_special_tokens=True)))
        return out


def merged_generator(base: nn.Module, state: AdapterState, tokenizer: Path) -> Generator:
    """``base`` (a ``models.text.CausalLM``, modified in place) with ``state``'s LoRA update
    merged into its weights, as a ``Generator``."""
    from transformers import AutoTokenizer

    merge_base_delta(base, {path: f.delta() for path, f in state.lora.items()})
    base.requires_grad_(False).eval()
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    return Generator(base.get_submodule("model"), tok, next(base.parameters()).device)


def generate(
    base: nn.Module,
    state: AdapterState,
    tokenizer: Path,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
) -> list[str]:
    """Greedy continuations of ``prompts`` by a causal LM base with ``state``'s LoRA update
    merged into a copy of it (the base is left as it is).

    Args:
        base: the run's base, on its device.
        state: the global adapter (module path -> factors, as the run keeps it).
        tokenizer: the model's tokenizer folder.
        prompts: texts to continue.
        max_new_tokens: tokens generated per prompt.
    """
    generator = merged_generator(copy.deepcopy(base), state, tokenizer)
    return generator.predict(list(prompts), max_new_tokens=max_new_tokens)


def load_generator(
    spec_file: Path, base_file: Path | None, adapter_file: Path, device: torch.device | None = None
) -> Generator:
    """A causal LM's global model from its description, base and adapter files (as
    ``load_classifier``), continuing raw strings."""
    spec = ModelSpec.from_json(spec_file.read_text())
    if spec.name != "causal_lm" or not spec.hf_name_or_path:
        raise ValueError(f"model {spec.name!r} does not generate text; expected a causal_lm")
    base = load_base(spec, base_file).to(device or torch.device("cpu"))
    return merged_generator(base, load_adapter(adapter_file), ensure_unpacked(spec.hf_name_or_path))
