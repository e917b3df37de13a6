"""Checkpoint tasks: save each completed round atomically, load the newest on resume."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from autorank.adapters import AdapterState
from autorank.checkpoint import Checkpoint, load_checkpoint, save_checkpoint


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=1)
def save_round(
    root: Path,
    *,
    run_id: str,
    digest: str,
    round_idx: int,
    base: Mapping[str, torch.Tensor],
    global_state: AdapterState,
    client_states: Sequence[AdapterState],
    meta: Mapping[str, Any],
) -> str:
    """Write the round's checkpoint atomically; returns its folder."""
    ckpt = Checkpoint(round_idx, run_id, digest, base, global_state, list(client_states), meta)
    return str(save_checkpoint(root, ckpt))


@task(cache_policy=NO_CACHE, persist_result=False)
def load_round(root: Path, *, run_id: str, digest: str) -> Checkpoint | None:
    """The run's newest checkpoint, or None before its first completed round."""
    return load_checkpoint(root, run_id, config_digest=digest)
