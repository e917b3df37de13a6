#!/usr/bin/env bash
# One command on a fresh machine: set up .venv, then run the main job on the embedded digits data.
# Extra arguments go to `autorank run`, e.g. scripts/quickstart.sh --set training.rounds=5
set -euo pipefail
cd "$(dirname "$0")/.."
echo "quickstart: setting up .venv (scripts/setup.sh; 2-3 minutes on a fresh clone)"
bash scripts/setup.sh
echo "quickstart: running .venv/bin/autorank run${*:+ $*} (the main job: digits, 10 clients, 20 rounds)"
exec .venv/bin/autorank run "$@"
