#!/bin/bash
# The prepared GPU check (bench/gpu_check.py, issue 19): one run of a few minutes on one GPU machine that has
# Python 3.12 and its own torch but no network and no megatron-core.
#
#   bash scripts/gpu_check.sh --collect     # here (network): megatron-core's cp312 wheel into .whl/ (gitignored)
#   bash scripts/gpu_check.sh OUT_DIR       # there: install .whl/ beside the machine's torch, run the check
#
# On the lent device machine (the `run` tool), from the repository root, carrying .whl:
#   run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
# The JSON report is OUT_DIR/gpu_check.json, the full log OUT_DIR/gpu_check.log. Budget: about 6 minutes on one
# H200 (model builds and steps of parts a, c-f take seconds; the 1.3B bench of part b most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PYTHON_VERSION=${PYTHON_VERSION:-3.12}

if [ "${1:-}" = "--collect" ]; then
  here=${PYTHON:-.venv/bin/python}
  version=$("$here" -c "from importlib.metadata import version; print(version('megatron-core'))")
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # megatron-core ships one wheel per CPython: ask for the target machine's, not this one's
  "$here" -m pip download "megatron-core==$version" --no-deps --only-binary=:all: \
      --python-version "$PYTHON_VERSION" --platform manylinux_2_28_x86_64 -d "$WHEELS"
  ls -l "$WHEELS"
  exit 0
fi

OUT=${1:?usage: scripts/gpu_check.sh --collect | OUT_DIR}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1 || { echo "no $WHEELS/megatron_core-*.whl: run 'bash scripts/gpu_check.sh --collect' first (and carry $WHEELS)" >&2; exit 2; }
# beside the machine's own torch, numpy, packaging: --no-deps, into a folder of our own
"$PYTHON" -m pip install --quiet --no-deps --no-index --target "$WHEELS/site" "$WHEELS"/*.whl
export PYTHONPATH="$PWD/$WHEELS/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu_check.log" || true
set -o pipefail
"$PYTHON" bench/gpu_check.py --out "$OUT" "${@:2}" 2>&1 | tee -a "$OUT/gpu_check.log"
