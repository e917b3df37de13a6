#!/usr/bin/env bash
# Create .venv and install AutoRank with its dev tools. Idempotent; safe to re-run.
# Here torch==2.13.0 resolves to the CPU wheel; on a GPU machine install the CUDA build of
# torch 2.13.0 into .venv first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# Modules are compiled at install time (not --no-compile, which halved the install here): where
# PYTHONDONTWRITEBYTECODE is set, as on these machines, nothing is compiled later, so every
# command would compile torch, Prefect and MLflow from source at each start (CI: +2.5 min).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
