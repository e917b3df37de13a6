#!/usr/bin/env bash
# Deploy prefect.yaml to a throwaway local Prefect server and check what landed: the
# deployments, on the autorank-pool process pool, with their cron schedules live (the
# scheduler has queued runs). Everything lives in a temp dir and on 127.0.0.1; the server is
# stopped on exit. Prints one summary line; exits non-zero on any failure.
#   bash scripts/deploy_smoke.sh                   # ~25 s: deploy and check (CI)
#   bash scripts/deploy_smoke.sh --run-quickstart  # ~50 s: also run the quickstart
#                                                  # deployment through a process worker,
#                                                  # and a failing run beside it
# No file may appear in Prefect's result storage (a failed run's exception, pickled).
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_QUICKSTART=false
case "${1:-}" in
  "") ;;
  --run-quickstart) RUN_QUICKSTART=true ;;
  *) echo "usage: $0 [--run-quickstart]" >&2; exit 2 ;;
esac

POOL=autorank-pool
STEP_TIMEOUT=120  # seconds per CLI call: `prefect deploy` imports torch on 2 busy cores
HEALTH_TIMEOUT=90
RUN_TIMEOUT=300  # --run-quickstart: the worker, the flow run process and the flow
PY=.venv/bin/python
PREFECT=.venv/bin/prefect

export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
TMP=$(mktemp -d -t autorank-deploy-smoke.XXXXXX)
# Prefect's settings from this temp dir only: none of the caller's PREFECT_* variables (a
# profile, another home or result storage would send what the check below looks for elsewhere).
while read -r var; do unset "$var"; done < <(compgen -e | grep '^PREFECT_' || true)
export PREFECT_HOME="$TMP/prefect-home"
# Where Prefect pickles a failed flow run's exception (server, worker, flow run processes).
STORAGE="$TMP/prefect-storage"
export PREFECT_RESULTS_LOCAL_STORAGE_PATH="$STORAGE"
LOG="$TMP/server.log"
SERVER_PID=""
WORKER_PID=""
STARTED=$SECONDS

# Server and worker each run in their own process group (setsid), so that stopping one
# ends it and its children (the worker's flow run processes), and nothing else.
stop_group() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
stop_server() {
  stop_group "$WORKER_PID"
  WORKER_PID=""
  stop_group "$SERVER_PID"
  SERVER_PID=""
}
cleanup() {
  stop_server
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
  echo "deploy-smoke: FAIL: $* ($((SECONDS - STARTED)) s)" >&2
  exit 1
}
# The files under Prefect's result storage, one per line (none when it was never created).
stored_files() {
  find "$STORAGE" -type f 2>/dev/null | sort || true
}

# The last lines of a log, each cut short: Prefect's API errors echo the whole request.
show_log() {
  echo "--- $1 (last lines) ---" >&2
  tail -n "${2:-15}" "$1" 2>/dev/null | cut -c1-300 >&2 || true
  # ...and the API's own reason, which sits deep inside the longest of those lines.
  grep -m1 -oE "Validation failed[^\"]{0,300}" "$1" >&2 || true
}

# Through the project's helper: `prefect work-pool create` would make the server reach out.
create_pool() {
  timeout "$STEP_TIMEOUT" "$PY" -m flows.pool "$POOL"
}

# Compare the server's deployments with prefect.yaml: names, pool, schedules, parameters,
# working directory, and that the scheduler has queued future runs of each.
verify_deployments() {
  timeout "$STEP_TIMEOUT" "$PY" - "$POOL" "$PWD" <<'EOF'
import asyncio
import sys
from datetime import datetime, timezone

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.schedules import CronSchedule

POOL, PROJECT_DIR = sys.argv[1], sys.argv[2]
SCHEDULER_WAIT_S = 30


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"verify: {what}")


async def scheduled_runs(client, deployment_id) -> list:
    flt = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    runs = await client.read_flow_runs(deployment_filter=flt)
    return [r for r in runs if r.state_type is not None and r.state_type.value == "SCHEDULED"]


async def main() -> None:
    declared = yaml.safe_load(open("prefect.yaml"))["deployments"]
    async with get_client() as client:
        # Looked up by deployment name: flows differ (autorank, autorank-compare).
        by_name = {d.name: d for d in await client.read_deployments()}
        for spec in declared:
            dep = by_name.get(spec["name"])
            check(dep is not None, f"{spec['name']}: not deployed")
            check(dep.work_pool_name == POOL, f"{dep.name}: work pool {dep.work_pool_name!r}")
            check(dep.parameters == spec["parameters"], f"{dep.name}: parameters differ")
            crons = [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules
                     if isinstance(s.schedule, CronSchedule) and s.active]
            # `prefect deploy` ignores keys it does not know: a misspelled `schedules`
            # deploys fine, without schedules.
            wanted = [(s["cron"], s.get("timezone")) for s in spec.get("schedules") or []]
            check(bool(wanted), f"{dep.name}: prefect.yaml declares no schedules")
            check(crons == wanted, f"{dep.name}: active schedules {crons}, want {wanted}")
            (step,) = dep.pull_steps
            where = step["prefect.deployments.steps.set_working_directory"]["directory"]
            check(where == PROJECT_DIR, f"{dep.name}: pull step directory {where!r}")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + SCHEDULER_WAIT_S
            while not (runs := await scheduled_runs(client, dep.id)):
                check(loop.time() < deadline, f"{dep.name}: no scheduled runs after "
                      f"{SCHEDULER_WAIT_S} s")
                await asyncio.sleep(1)
            now = datetime.now(timezone.utc)
            check(all(r.expected_start_time > now for r in runs),
                  f"{dep.name}: a scheduled run is in the past")
            first = min(r.expected_start_time for r in runs)
            print(f"  {dep.name}: {crons[0][0]} {crons[0][1]}, {len(runs)} runs queued, "
                  f"next {first:%Y-%m-%d %H:%M} UTC")


asyncio.run(main())
EOF
}

# The quickstart deployment with its own parameters (only tracking and checkpoints moved to
# $TMP), through a real process worker: pull step (working directory), job variables, the
# API's parameter check, and the flow itself (~15 s of training on digits). Beside it a run
# of nightly-baseline that fails inside the flow (a missing data folder): FAILED in Prefect and
# in MLflow.
run_quickstart() {
  local flow_run_ids deadline
  flow_run_ids=$(timeout "$STEP_TIMEOUT" "$PY" - "$TMP" <<'EOF'
import asyncio
import copy
import sys

from prefect.client.orchestration import get_client

tmp = sys.argv[1]


async def main() -> None:
    async with get_client() as client:
        # The failing run is another deployment's: each allows one run at a time.
        for deployment, name, data in (
            ("quickstart", "ok", {}),
            ("nightly-baseline", "failing", {"name": "mnist", "path": f"{tmp}/no-data"}),
        ):
            dep = await client.read_deployment_by_name(f"autorank/{deployment}")
            parameters = copy.deepcopy(dep.parameters)
            config = parameters.setdefault("config", {})
            config.setdefault("data", {}).update(data)
            config.setdefault("tracking", {}).update(
                uri=f"sqlite:///{tmp}/mlflow.db", experiment=f"deploy-smoke-{name}"
            )
            config.setdefault("runtime", {})["checkpoint_dir"] = f"{tmp}/checkpoints"
            # Its traceback stays out of the worker's log (checked for tracebacks below).
            quiet = {"stream_output": False} if name == "failing" else None
            run = await client.create_flow_run_from_deployment(
                dep.id, parameters=parameters, job_variables=quiet
            )
            print(run.id)


asyncio.run(main())
EOF
  ) || return 1
  # --limit: with --run-once the worker then waits for its runs to finish before exiting.
  setsid "$PREFECT" worker start --pool "$POOL" --run-once --limit 2 --install-policy never \
    >"$TMP/worker.log" 2>&1 &
  WORKER_PID=$!
  deadline=$((SECONDS + RUN_TIMEOUT))
  while kill -0 "$WORKER_PID" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "worker still busy after ${RUN_TIMEOUT} s" >&2
      return 1
    fi
    sleep 1
  done
  wait "$WORKER_PID" || { show_log "$TMP/worker.log" 30; return 1; }
  WORKER_PID=""
  if grep -q "Traceback" "$TMP/worker.log"; then
    echo "the worker's log holds a traceback" >&2
    show_log "$TMP/worker.log" 40
    return 1
  fi
  # shellcheck disable=SC2086  # the two ids, as two arguments
  timeout "$STEP_TIMEOUT" "$PY" - "$TMP" $flow_run_ids <<'EOF' || { show_log "$TMP/worker.log" 30; return 1; }
import asyncio
import sys

from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)

tmp, flow_run_id, failing_run_id = sys.argv[1:]


async def what_prefect_shows(run_id: str) -> tuple[str, str, list[str], set[str]]:
    """The flow run's state and name, its log lines, its artifacts' keys."""
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        mine = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        artifacts = await client.read_artifacts(artifact_filter=mine)
    state = run.state.type.value if run.state else "NONE"
    return state, run.name, [log.message for log in logs], {a.key for a in artifacts}


state, name, lines, artifacts = asyncio.run(what_prefect_shows(flow_run_id))
if state != "COMPLETED":
    sys.exit(f"quickstart flow run {flow_run_id} ended {state}")
tracking = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
experiment = tracking.get_experiment_by_name("deploy-smoke-ok")
runs = tracking.search_runs([experiment.experiment_id])
statuses = [r.info.status for r in runs]
if statuses != ["FINISHED"]:
    sys.exit(f"expected one FINISHED MLflow run, got {statuses}")
if name != runs[0].info.run_name:
    sys.exit(f"flow run named {name!r}, its MLflow run {runs[0].info.run_name!r}")
rounds = [line for line in lines if line.startswith("round ") and "global accuracy" in line]
if not rounds:
    sys.exit(f"no round lines in the flow run's log ({len(lines)} lines)")
finished = [line for line in lines if line.startswith("Finished in state")]
if len(finished) > 1:  # the flow run's own closing line only, not one per task run
    sys.exit(f"{len(finished)} 'Finished in state' lines among the round lines of the log")
if not {"mlflow-run", "round-metrics"} <= artifacts:
    sys.exit(f"flow run artifacts {sorted(artifacts)}; want mlflow-run and round-metrics")
print(f"  quickstart: flow run {name!r} COMPLETED, its MLflow run FINISHED; "
      f"{len(rounds)} round lines in its log, artifacts {sorted(artifacts)}")

state, name, lines, artifacts = asyncio.run(what_prefect_shows(failing_run_id))
if state != "FAILED":
    sys.exit(f"failing flow run {failing_run_id} ended {state}, want FAILED")
experiment = tracking.get_experiment_by_name("deploy-smoke-failing")
statuses = [r.info.status for r in tracking.search_runs([experiment.experiment_id])]
if statuses != ["FAILED"]:
    sys.exit(f"failing flow run: expected one FAILED MLflow run, got {statuses}")
print(f"  failing run (missing data folder): flow run {name!r} FAILED, its MLflow run FAILED")
EOF
}

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"

# setsid: its own process group, so that stop_server ends the server and its children only.
setsid "$PREFECT" server start --host 127.0.0.1 --port "$PORT" --no-ui >"$LOG" 2>&1 &
SERVER_PID=$!

deadline=$((SECONDS + HEALTH_TIMEOUT))
until curl -fsS --max-time 2 "$PREFECT_API_URL/health" >/dev/null 2>&1; do
  kill -0 "$SERVER_PID" 2>/dev/null || { show_log "$LOG"; fail "server exited during startup"; }
  [ "$SECONDS" -lt "$deadline" ] || { show_log "$LOG"; fail "server not healthy after ${HEALTH_TIMEOUT} s"; }
  sleep 1
done
echo "deploy-smoke: server healthy on 127.0.0.1:$PORT after $((SECONDS - STARTED)) s"

create_pool || fail "could not create work pool $POOL"
timeout "$STEP_TIMEOUT" "$PREFECT" --no-prompt deploy --all >"$TMP/deploy.log" 2>&1 \
  || { show_log "$TMP/deploy.log"; fail "prefect --no-prompt deploy --all failed"; }
timeout "$STEP_TIMEOUT" "$PREFECT" deployment ls || fail "prefect deployment ls failed"
verify_deployments | tee "$TMP/verify.log" || fail "deployments on the server do not match prefect.yaml"
count=$(grep -c "runs queued" "$TMP/verify.log")
ran=""
stored_before=$(stored_files)
if [ "$RUN_QUICKSTART" = true ]; then
  run_quickstart || fail "the quickstart deployment did not run through a worker"
  ran=", quickstart ran through a worker (a failing run beside it)"
fi
stored_after=$(stored_files)
if [ "$stored_after" != "$stored_before" ]; then
  echo "$stored_after" | head -n 5 >&2
  fail "new files in Prefect's result storage $STORAGE (a failed run's pickled exception?)"
fi

stop_server
echo "deploy-smoke: OK: $count deployments on pool $POOL with live cron schedules$ran" \
  "($((SECONDS - STARTED)) s)"
