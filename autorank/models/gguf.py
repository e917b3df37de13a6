"""GGUF files as transformers folders: dequantised once, then loaded like any pretrained folder.

transformers reads a GGUF file (``from_pretrained(..., gguf_file=...)``, with the ``gguf``
package) by dequantising every tensor, ~20 s for SmolLM2-135M on two cores, and its
``save_pretrained`` refuses a model loaded that way. ``ensure_unpacked`` therefore writes the
dequantised weights (fp32 safetensors; a tied output layer left to be tied again), the config
and the tokenizer into ``models.packaged.unpacked_folder`` once, under a temporary name renamed
into place; every later load reads that folder in well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from autorank.models.packaged import gguf_file, gguf_package, pretrained_folder

logger = logging.getLogger(__name__)


def ensure_unpacked(name_or_path: str) -> Path:
    """The transformers folder of ``name_or_path``: itself (or a packaged folder), or for a GGUF
    file its unpacked folder, written now if missing.

    Raises:
        ValueError: not a model, or a GGUF file without the ``gguf`` package.
    """
    folder = pretrained_folder(name_or_path)
    gguf = gguf_file(name_or_path)
    if gguf is None or (folder / "config.json").is_file():
        return folder
    gguf_package(gguf)  # transformers' GGUF reader needs it
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("unpacking %s into %s (once)", gguf.name, folder)
    temporary = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        kind = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kind)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kind)
        tokenizer.save_pretrained(str(temporary))
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # dequantised: plain fp32 weights now
        config.pop("_model_name_or_path", None)
        (temporary / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        state = model.state_dict()
        if model.config.tie_word_embeddings:  # the same tensor as the embeddings: tied on load
            state.pop("lm_head.weight", None)
        tensors = {k: v.detach().float().contiguous() for k, v in state.items()}
        save_file(tensors, str(temporary / "model.safetensors"), metadata={"format": "pt"})
        try:
            temporary.rename(folder)
        except OSError:  # another process unpacked it first: theirs is the same
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder
