"""Base models that clients adapt: an MLP, a small CNN, and transformers image classifiers.

Every model maps ``x -> logits`` and accepts ``x`` either flattened, ``[n, C*H*W]`` (how
``autorank.data`` stores samples), or as images, ``[n, C, H, W]``. Module names are fixed so that
LoRA targets and the classifier head can be named in configs (``default_targets``,
``head_modules``). Initialisation is seeded without touching the global RNG's visible state, and
weights are only ever read from safetensors files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from autorank.models.packaged import pretrained_folder, text_targets
from autorank.models.text import build_causal_lm, build_text_classifier

logger = logging.getLogger(__name__)

ModelName = Literal["mlp", "cnn", "hf", "text_classifier", "causal_lm"]
MODEL_NAMES: tuple[ModelName, ...] = ("mlp", "cnn", "hf", "text_classifier", "causal_lm")


class MLP(nn.Module):
    """Flatten, then ``fc1 -> ReLU -> ... -> fcN -> ReLU -> head`` (the paper's 784-200-200-10).

    Args:
        d_in: flattened input size.
        hidden: widths of the hidden layers ``fc1..fcN``.
        n_classes: number of logits.
    """

    def __init__(self, d_in: int, hidden: Sequence[int], n_classes: int) -> None:
        super().__init__()
        self.hidden_names: tuple[str, ...] = tuple(f"fc{i + 1}" for i in range(len(hidden)))
        width = d_in
        for name, h in zip(self.hidden_names, hidden, strict=True):
            self.add_module(name, nn.Linear(width, h))
            width = h
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [n, ...]`` -> logits ``[n, n_classes]``."""
        h = x.flatten(1)
        for name in self.hidden_names:
            h = torch.relu(getattr(self, name)(h))
        return self.head(h)


class SmallCNN(nn.Module):
    """``conv1 -> pool -> conv2 -> pool -> fc1 -> head``, 3x3 convolutions with 32 and 64 channels.

    Args:
        input_shape: ``(C, H, W)``, with ``H, W >= 4`` (two 2x2 poolings).
        n_classes: number of logits.
        width: units of ``fc1``.
    """

    def __init__(self, input_shape: tuple[int, int, int], n_classes: int, width: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.input_shape = input_shape
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [n, C*H*W]`` or ``[n, C, H, W]`` -> logits ``[n, n_classes]``."""
        h = x.reshape(x.shape[0], *self.input_shape)
        h = self.pool(torch.relu(self.conv1(h)))
        h = self.pool(torch.relu(self.conv2(h)))
        h = torch.relu(self.fc1(h.flatten(1)))
        return self.head(h)


class HFImageClassifier(nn.Module):
    """A transformers image-classification model behind the plain ``x -> logits`` interface.

    Args:
        model: an ``AutoModelForImageClassification`` instance, kept as ``self.model``.
        input_shape: ``(C, H, W)`` the model expects as ``pixel_values``.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [n, C*H*W]`` or ``[n, C, H, W]`` -> logits ``[n, n_classes]``."""
        pixels = x.reshape(x.shape[0], *self.input_shape)
        logits: torch.Tensor = self.model(pixel_values=pixels).logits
        return logits


@contextmanager
def _seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Seed the CPU default generator inside the block and restore its state afterwards.

    Module constructors draw their initial weights from the global generator; forking only the
    CPU generator (``devices=[]``) leaves CUDA generators alone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def _image_shape(input_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"model '{name}' needs input_shape (C, H, W), got {input_shape}")
    c, h, w = input_shape
    return c, h, w


def _build_hf(
    name_or_path: str, input_shape: tuple[int, int, int], n_classes: int
) -> HFImageClassifier:
    from transformers import AutoModelForImageClassification

    labels = {i: str(i) for i in range(n_classes)}
    model = AutoModelForImageClassification.from_pretrained(
        name_or_path,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        ignore_mismatched_sizes=True,  # a Hub model's head of another size is re-initialised
        use_safetensors=True,
    )
    cfg = model.config
    channels, size = getattr(cfg, "num_channels", None), getattr(cfg, "image_size", None)
    if channels is not None and channels != input_shape[0]:
        raise ValueError(
            f"hf model '{name_or_path}' expects {channels} channels, data has input_shape "
            f"{input_shape}"
        )
    if isinstance(size, int) and (size, size) != input_shape[1:]:
        raise ValueError(
            f"hf model '{name_or_path}' expects {size}x{size} images, data has input_shape "
            f"{input_shape}"
        )
    return HFImageClassifier(model, input_shape)


def build_model(
    name: ModelName,
    *,
    input_shape: tuple[int, ...],
    n_classes: int,
    hidden: Sequence[int] = (200, 200),
    hf_name_or_path: str | None = None,
    seed: int,
) -> nn.Module:
    """Build a base model with seeded initial weights.

    Args:
        name: ``mlp`` (hidden layers ``fc1..fcN``, then ``head``), ``cnn`` (``conv1``, ``conv2``,
            ``fc1`` of width ``hidden[0]``, ``head``) or ``hf`` (a transformers image classifier
            from a local folder or Hub name, its classifier resized to ``n_classes``).
        input_shape: one sample's shape, e.g. ``(1, 28, 28)``; ``mlp`` accepts any shape.
        n_classes: number of logits.
        hidden: hidden widths (``mlp``), ``hidden[0]`` is the ``fc1`` width of ``cnn``.
        hf_name_or_path: required for ``hf``.
        seed: initialisation seed; the global RNG's state is restored afterwards.

    Returns:
        A module mapping ``x: [n, *input_shape]`` (or flattened) to logits ``[n, n_classes]``.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model name must be one of {MODEL_NAMES}, got {name!r}")
    if n_classes < 2 and name != "causal_lm":  # a causal LM's logits are its vocabulary's
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if not hidden or min(hidden) < 1:
        raise ValueError(f"hidden must be non-empty positive widths, got {tuple(hidden)}")
    with _seeded_cpu_rng(seed):
        return BUILDERS[name](input_shape, n_classes, hidden, hf_name_or_path)


def _mlp(
    input_shape: tuple[int, ...], n_classes: int, hidden: Sequence[int], _: str | None
) -> nn.Module:
    return MLP(math.prod(input_shape), hidden, n_classes)


def _cnn(
    input_shape: tuple[int, ...], n_classes: int, hidden: Sequence[int], _: str | None
) -> nn.Module:
    shape = _image_shape(input_shape, "cnn")
    if min(shape[1:]) < 4:
        raise ValueError(f"model 'cnn' needs H, W >= 4, got input_shape {input_shape}")
    return SmallCNN(shape, n_classes, hidden[0])


def _hf(
    input_shape: tuple[int, ...], n_classes: int, _: Sequence[int], hf_name_or_path: str | None
) -> nn.Module:
    if not hf_name_or_path:
        raise ValueError("model 'hf' needs hf_name_or_path (a local folder or Hub name)")
    return _build_hf(hf_name_or_path, _image_shape(input_shape, "hf"), n_classes)


def _text_classifier(
    input_shape: tuple[int, ...], n_classes: int, _: Sequence[int], hf_name_or_path: str | None
) -> nn.Module:
    if not hf_name_or_path:
        raise ValueError("model 'text_classifier' needs hf_name_or_path (a folder or a name)")
    if len(input_shape) != 2 or input_shape[0] != 2:
        raise ValueError(
            f"model 'text_classifier' needs token samples (2, L), got input_shape {input_shape}"
        )
    return build_text_classifier(hf_name_or_path, n_classes, input_shape[1])


def _causal_lm(
    input_shape: tuple[int, ...], _: int, __: Sequence[int], hf_name_or_path: str | None
) -> nn.Module:
    if not hf_name_or_path:
        raise ValueError("model 'causal_lm' needs hf_name_or_path (a folder)")
    if len(input_shape) != 2 or input_shape[0] != 2:
        raise ValueError(f"model 'causal_lm' needs token samples (2, L), got {input_shape}")
    return build_causal_lm(hf_name_or_path, input_shape[1])


# ``model.name`` -> (input_shape, n_classes, hidden, hf_name_or_path) -> an initialised model.
Builder = Callable[[tuple[int, ...], int, Sequence[int], str | None], nn.Module]
BUILDERS: dict[str, Builder] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "hf": _hf,
    "text_classifier": _text_classifier,
    "causal_lm": _causal_lm,
}


_HF_ATTENTION_TARGETS: tuple[tuple[str, str], ...] = (
    ("q_proj", "v_proj"),  # transformers 5 ViT, most current models
    ("query", "value"),  # transformers 4 ViT, BERT-style attention
    ("q", "v"),
)


def default_targets(
    name: ModelName,
    *,
    n_hidden: int = 2,
    model: nn.Module | None = None,
    hf_name_or_path: str | None = None,
) -> tuple[str, ...]:
    """LoRA target module names of a model kind.

    Args:
        name: the model kind.
        n_hidden: number of hidden layers of the ``mlp``.
        model: for ``hf``, the built model, searched for its attention projections' names.
        hf_name_or_path: for ``text_classifier``, the pretrained model (its architecture's
            defaults: ``models.packaged.text_targets``).

    Returns:
        ``mlp``: ``fc1..fcN``; ``cnn``: ``conv1, conv2, fc1``; ``hf``: the query and value
        projections (``q_proj, v_proj`` in transformers 5; ``query, value`` in older ViTs).
    """
    if name == "mlp":
        return tuple(f"fc{i + 1}" for i in range(n_hidden))
    if name == "cnn":
        return ("conv1", "conv2", "fc1")
    if name in ("text_classifier", "causal_lm"):
        if not hf_name_or_path:
            raise ValueError(f"model {name!r} needs hf_name_or_path for its targets")
        return text_targets(pretrained_folder(hf_name_or_path))
    if name != "hf":
        raise ValueError(f"model name must be one of {MODEL_NAMES}, got {name!r}")
    if model is None:
        return _HF_ATTENTION_TARGETS[0]
    leaves = {path.rsplit(".", 1)[-1] for path, _ in model.named_modules()}
    for pair in _HF_ATTENTION_TARGETS:
        if set(pair) <= leaves:
            return pair
    raise ValueError(
        f"no attention projections {_HF_ATTENTION_TARGETS} found in {type(model).__name__}; "
        "set lora.target_modules"
    )


def head_modules(name: ModelName) -> tuple[str, ...]:
    """Modules trained in full next to LoRA (the classifier): ``head``, or ``classifier`` for hf."""
    if name in ("mlp", "cnn"):
        return ("head",)
    if name in ("hf", "text_classifier"):
        return ("classifier",)
    if name == "causal_lm":
        return ()  # the output layer is tied to the embeddings: LoRA alone
    raise ValueError(f"model name must be one of {MODEL_NAMES}, got {name!r}")


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each tied tensor once: a name whose tensor is an earlier
    name's (a causal LM's output layer tied to its embeddings) is left out, as safetensors
    refuses shared memory; ``load_base_state`` ties it again by loading into the model."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and where in seen:
            continue
        seen.add(where)
        out[name] = t
    return out


def load_base_state(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load ``base_state``'s tensors into ``model``: every name but its tied ones must be there."""
    tied = set(model.state_dict()) - set(base_state(model))
    missing, unexpected = model.load_state_dict(dict(tensors), strict=False)
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"base weights do not fit the model: missing keys {sorted(set(missing) - tied)[:5]}, "
            f"unexpected keys {sorted(unexpected)[:5]}"
        )


def save_base_weights(model: nn.Module, path: Path) -> None:
    """Write the model's state dict to a safetensors file (parent folders are created; tied
    tensors once, ``base_state``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in base_state(model).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_base_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file into ``model`` in place, strictly.

    Raises:
        ValueError: the file is missing or unreadable, keys are missing or unexpected, or a
            tensor's shape differs from the model's.
    """
    if not Path(path).is_file():
        raise ValueError(f"base weights file '{path}' not found (expected a .safetensors file)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"base weights file '{path}' is not a readable safetensors file") from err
    own = base_state(model)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"base weights file '{path}' does not fit the model: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )
    for key, value in tensors.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"base weights file '{path}': '{key}' has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    load_base_state(model, tensors)
