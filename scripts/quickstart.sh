#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, then run the main job on the embedded digits data.
# Extra arguments go to `autorank run`, e.g. scripts/quickstart.sh --set training.rounds=5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/autorank run "$@"
