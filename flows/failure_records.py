"""What a failed flow run leaves in Prefect's result storage, removed as the run fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Flow
from prefect.client.schemas.objects import FlowRun
from prefect.settings import get_current_settings
from prefect.states import State


def drop_failure_record(flow: Flow[..., Any], flow_run: FlowRun, state: State) -> None:
    """``on_failure`` hook: remove the pickled exception Prefect just stored for this run.

    Prefect 3 writes a failed flow run's exception, cloudpickled, to its result storage
    whatever ``persist_result`` says (the flow engine's ``handle_exception`` asks for the write):
    with the default storage, one file per failure in ``$PREFECT_HOME/storage`` of whoever ran
    the flow (a worker's flow run process, a subflow of a comparison, the CLI). Nothing reads it
    back (the state's message and the MLflow run say what happened), so the file this state
    points to goes. Results kept in a storage block (``storage_block_id``) or a flow's own
    ``result_storage`` folder are left alone.
    """
    metadata = getattr(state.data, "metadata", None)  # a ResultRecord when Prefect stored it
    if metadata is None or metadata.storage_block_id is not None or not metadata.storage_key:
        return
    stored = Path(metadata.storage_key)
    folder = Path(get_current_settings().results.local_storage_path).expanduser().resolve()
    if stored.parent == folder:
        stored.unlink(missing_ok=True)
