"""Create the process work pool that `prefect.yaml` deploys to, without leaving the machine.

`prefect work-pool create --type process` asks the server for Prefect's collections registry,
which the server fetches from the internet; creating the pool through the client with the
process worker's own job template talks to the API server alone.

    python -m flows.pool autorank-pool
"""

from __future__ import annotations

import asyncio
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
    """Entry point: ``python -m flows.pool [NAME]`` (default ``autorank-pool``)."""
    name = argv[0] if argv else "autorank-pool"
    created = asyncio.run(create_process_pool(name))
    print(f"work pool {name!r} {'created' if created else 'already exists'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
