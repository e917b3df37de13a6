#!/usr/bin/env bash
# The checks that need a GPU, in one go: the `gpu`-marked tests and the engines' throughput on
# CUDA (docs/performance.md). Prints measured figures and the device's name; writes the logs to
# $OUT (or ./gpu-checks) as well.
#
#   bash scripts/gpu_checks.sh               # in a checkout set up with scripts/setup.sh
#
# On a machine whose Python already holds torch and peft but not the project's other needs, put
# their wheels in .whl/ first (pydantic and its dependencies are all the engines need): they are
# installed into /tmp/site and the checkout itself goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-checks}"
mkdir -p "$out"

python=python3
if [ -x .venv/bin/python ]; then
    python=.venv/bin/python
elif compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_checks: CUDA is not available to $python; expected a machine with an NVIDIA GPU" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
"$python" -c "import torch, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'peft', peft.__version__)" | tee -a "$out/device.txt"

status=0
# The gpu-marked tests, from the files that hold them (the command line's -m replaces the
# configured 'not slow').
mapfile -t gpu_files < <(grep -rl "mark.gpu" tests --include="test_*.py")
timeout 120 "$python" -m pytest -p no:cacheprovider -q -m gpu "${gpu_files[@]}" 2>&1 |
    tee "$out/gpu_tests.log" || status=1

# (a) engine throughput: the benchmark's clients (~60 samples each), then larger shares.
timeout 180 "$python" benchmarks/engine_throughput.py --device cuda --threads 4 \
    --clients 10 100 1000 --models mlp cnn 2>&1 | tee "$out/engine_cuda.log" || status=1
timeout 150 "$python" benchmarks/engine_throughput.py --device cuda --threads 4 \
    --clients 1000 --samples 600 --repeat 1 --models mlp cnn 2>&1 | tee "$out/engine_cuda_600.log" ||
    status=1
exit "$status"
