"""A failed flow run leaves no pickled exception in Prefect's result storage."""

import pytest
from prefect import flow

from flows.failure_records import drop_failure_record
from tests.flows.conftest import storage_files


def _fail() -> None:
    raise RuntimeError("the machine went away")


def test_prefect_pickles_a_failed_runs_exception_and_the_hook_removes_it(
    prefect_harness: None,
) -> None:
    plain = flow(name="fails")(_fail)
    hooked = flow(name="fails-hooked", on_failure=[drop_failure_record])(_fail)
    before = storage_files()

    with pytest.raises(RuntimeError, match="went away"):
        hooked()
    after_hooked = storage_files()
    with pytest.raises(RuntimeError, match="went away"):
        plain()  # persist_result unset, PREFECT_RESULTS_PERSIST_BY_DEFAULT false: written anyway
    left = storage_files() - before

    assert after_hooked == before
    assert len(left) == 1  # what the hook removes
    for path in left:
        path.unlink()
