"""Prefect flows, deployments and the `autorank` CLI (composition of tasks and the library)."""

import tasks  # noqa: F401  (sets the no-telemetry environment before Prefect or MLflow load)

# The note a run's exception carries with the command that continues the run (the CLI adds it
# to its one-line error).
RESUME_NOTE = "continue with: "

# The run's config beside its checkpoints, which `autorank resume` reads (here, so that the CLI
# finds it without importing the run's records: matplotlib and MLflow).
CONFIG_FILE = "config.yaml"

# The resume commands of the runs this process stopped early, newest last (a command that has
# to end without its exception, when its Prefect server is gone, names the last one).
stopped: list[str] = []
