"""Create the process work pool that `prefect.yaml` deploys to, without leaving the machine.

`prefect work-pool create --type process` asks the server for Prefect's collections registry,
which the server fetches from the internet; creating the pool through the client with the
process worker's own job template talks to the API server alone.

    python -m flows.pool autorank-pool
"""

from __future__ import annotations

import asyncio
import os
import sys

import tasks  # noqa: F401  (no-telemetry environment)


async def create_process_pool(name: str) -> bool:
    """Create a process work pool named ``name``; False if it already exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    async with get_client() as client:
        try:
            await client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=template)
            )
        except ObjectAlreadyExists:
            return False
    return True


def main(argv: list[str]) -> int:
    """Entry point: ``python -m flows.pool [NAME]`` (default ``autorank-pool``); a server that
    does not answer is one line on stderr and exit code 1, not a connection traceback."""
    name = argv[0] if argv else "autorank-pool"
    try:
        check_server()
        created = asyncio.run(create_process_pool(name))
    except Exception as err:  # Prefect's client errors: whatever it raised, one line
        text = str(err).strip().splitlines()
        print(f"flows.pool: error: {text[0] if text else type(err).__name__}", file=sys.stderr)
        return 1
    print(f"work pool {name!r} {'created' if created else 'already exists'}")
    return 0


def check_server() -> None:
    """``PREFECT_API_URL`` is set and answers Prefect's health check (else a pool would go to
    a temporary server that ends with this command)."""
    from flows.orchestrator import answers

    start = "start `prefect server start --host 127.0.0.1` and wait until it answers"
    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        raise ValueError(
            f"PREFECT_API_URL is not set: {start}, then export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    if not answers(f"{url}/health"):
        raise ValueError(f"no Prefect server answers at {url}/health: {start}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
