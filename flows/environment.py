"""What a command sets in its own environment before the libraries that read it are imported:
where third-party caches go, and whether their progress bars and chatter show.

A value the user exported wins.
"""

from __future__ import annotations

import os
from pathlib import Path

# Under the working folder, beside mlruns/ and .prefect/ (git-ignored; safe to delete).
CACHE_DIR = Path(".cache")


def cache_env(folder: Path) -> dict[str, str]:
    """The cache settings of a command working in ``folder``.

    matplotlib writes its font cache (and config folder) under the home otherwise, and
    ``datasets`` its Arrow copies of every CSV, JSON or Hub data set it reads. The Hub's own
    download cache and login token (``HF_HOME``) stay where Hugging Face keeps them, so that
    models are not downloaded again per folder.
    """
    cache = (folder / CACHE_DIR).resolve()
    return {
        "MPLCONFIGDIR": str(cache / "matplotlib"),
        "HF_DATASETS_CACHE": str(cache / "huggingface" / "datasets"),
    }


QUIET_ENV = {
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Generating train split", "Map:"
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' bars ("Loading weights")
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",  # bars drawn with tqdm directly (transformers' GGUF dequantising)
}


def prepare(folder: Path, *, verbose: bool) -> None:
    """Set the caches under ``folder`` and, unless ``verbose``, quiet the third-party
    progress bars (the command prints its own progress).

    Must run before ``datasets``, ``transformers`` or matplotlib is imported: they read these
    once, at import (the CLI imports none of them before its command runs).
    """
    for key, value in cache_env(folder).items():
        os.environ.setdefault(key, value)
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
