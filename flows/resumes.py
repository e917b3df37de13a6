"""What a resume checks before Prefect's server starts or anything is written: the run's lock,
its record in the tracking store and its checkpoint chain (``autorank resume``), or the
comparison's parent run (``autorank compare --resume``). A refusal then writes nothing.

Torch-free at import (a comparison checks its parent before Prefect's server starts booting),
and Prefect-free throughout: Prefect must not be imported before that (``flows.orchestrator``).
"""

from __future__ import annotations

from autorank.config import ConfigError, ExperimentConfig, config_digest
from autorank.reporting.grid import GridConfig, grid_digest
from flows.places import stored_run

GRID_FILE = "grid.yaml"
GRID_DIGEST_TAG = "grid_digest"


def resumable(config: ExperimentConfig, run_id: str) -> bool:
    """Whether ``run_id`` has rounds left, checked before anything starts or is written: no
    other process holds it, its tracking store holds it under this config, and its checkpoints
    are what they claim (False: it finished, nothing to resume).

    Raises:
        ValueError: it cannot be resumed (one line: why, and where).
    """
    from autorank.lora.files import CheckpointError
    from autorank.rounds.checkpoint import check_unheld, load_checkpoint, load_decision

    root = config.runtime.checkpoint_dir
    check_unheld(root, run_id)
    run = stored_run(config.tracking.uri, run_id)
    if run.status == "FINISHED":
        return False
    digest = config_digest(config)
    if run.tags.get("config_digest") != digest:
        raise CheckpointError(
            f"run {run_id} was started with another config "
            f"(digest {run.tags.get('config_digest')}, this one is {digest})"
        )
    ckpt = load_checkpoint(root, run_id, config_digest=digest)
    if ckpt is not None:
        load_decision(root, ckpt)
    return True


def check_parent(grid: GridConfig, run_id: str) -> None:
    """Refuse a comparison to resume that is missing, not a comparison run, or ran another grid
    (read from the store, nothing written)."""
    tags = stored_run(grid.base.tracking.uri, run_id).tags
    if tags.get("kind") != "comparison":
        raise ConfigError(f"run {run_id!r} is not a comparison (tag kind={tags.get('kind')!r})")
    logged = tags.get(GRID_DIGEST_TAG)
    if logged is not None and logged != grid_digest(grid):
        raise ConfigError(
            f"comparison {run_id} ran another grid (its assigners, aggregators, seeds, "
            "target_accuracy or base settings differ from these); resume it with its own "
            f"{GRID_FILE} or start a new comparison"
        )
