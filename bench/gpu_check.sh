#!/usr/bin/env bash
# The prepared GPU check (`make bench-gpu`): cifarkit against airbench94 on one GPU, within 9 minutes.
#   bench/gpu_check.sh OUT_DIR                     on a machine with one recent NVIDIA GPU, no network
#   GPU_CHECK_SMOKE=1 bench/gpu_check.sh OUT_DIR   every step on the CPU on a small subset (~2 minutes)
# It needs Python with torch, lightning, torchmetrics, safetensors and matplotlib. What a bare GPU
# machine lacks travels beside the checkout, in git-ignored folders:
#   .whl/        wheels of grad-cam and ttach (installed here into /tmp/site, with no network)
#   .airbench/   airbench94.py and airbench94_muon.py, unmodified, from github.com/KellerJordan/cifar10-airbench,
#                and cifar10-jpeg.tar.gz (the data: CIFARKIT_DATA points at it when it is there)
# Results: OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import cifarkit" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${CIFARKIT_DATA:-}" ] && [ -f .airbench/cifar10-jpeg.tar.gz ]; then
    export CIFARKIT_DATA=$PWD/.airbench/cifar10-jpeg.tar.gz
fi
exec "$PY" bench/gpu_check.py --out "$OUT" "${@:2}"
