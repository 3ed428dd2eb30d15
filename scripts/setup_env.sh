#!/usr/bin/env bash
# Makes a virtual environment (default .venv/ in the repository root; idempotent) and installs latentlm_mcore.
#   bash scripts/setup_env.sh            # CPU: torch 2.13.0 CPU wheel pinned
#   LATENTLM_KEEP_TORCH=1 bash scripts/setup_env.sh   # GPU cluster: keep the torch already in the base python
#   EXTRAS=test,gpu bash scripts/setup_env.sh         # choose extras (default: test)
#   VENV=.venv-mcore-0.19.2 MEGATRON_CORE=0.19.2 bash scripts/setup_env.sh
#       # a second environment with another megatron-core of the supported range (scripts/test_megatron_range.sh).
#       # It is installed with --no-deps --ignore-requires-python: 0.17+ declare Python >= 3.12 but run on 3.11,
#       # and their runtime dependencies (torch, numpy, packaging; triton, undeclared) are installed beside.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-test}"
VENV="${VENV:-.venv}"
MEGATRON_CORE="${MEGATRON_CORE:-}"
if [ ! -x "$VENV/bin/python" ]; then
  if [ "${LATENTLM_KEEP_TORCH:-0}" = 1 ]; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
quiet_pip() {  # this machine's pip config names local indexes that may be absent: hide that noise only
  "${pip[@]}" "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}
stamp="$VENV/.latentlm-installed"
want="$(cat setup.py constraints.txt | sha256sum | cut -c1-16)-$EXTRAS-${MEGATRON_CORE:-pinned}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup_env: $VENV is up to date"; exit 0
fi
drop='^$'  # constraints lines to leave out
[ "${LATENTLM_KEEP_TORCH:-0}" = 1 ] && drop='^torch=='
[ -n "$MEGATRON_CORE" ] && drop="$drop|^megatron-core"
grep -Ev "$drop" constraints.txt > "$VENV/constraints.txt"
cons=(-c "$VENV/constraints.txt")
if [ "${LATENTLM_KEEP_TORCH:-0}" != 1 ]; then
  echo "setup_env: installing torch 2.13.0 (CPU wheel) into $VENV ..."
  quiet_pip install "${cons[@]}" torch==2.13.0
fi
if [ -n "$MEGATRON_CORE" ]; then
  echo "setup_env: installing megatron-core==$MEGATRON_CORE into $VENV ..."
  quiet_pip install --no-deps --ignore-requires-python "megatron-core==$MEGATRON_CORE"
  quiet_pip install triton  # 0.19 imports it at `import megatron.core`; torch's CPU wheel does not bring it
fi
echo "setup_env: installing latentlm_mcore[${EXTRAS}] and its dependencies (megatron-core, mosaicml-streaming," \
  "transformers, ...; a few minutes the first time) ..."
quiet_pip install "${cons[@]}" -e ".[${EXTRAS}]"
if [[ ",$EXTRAS," == *",test,"* ]] && [ -z "$MEGATRON_CORE" ]; then  # not for the megatron range venv
  # tests/hf runs an exported folder on transformers 5 too (.venv keeps 4.x: mosaicml-streaming caps it below 5);
  # installed beside the venv, not in it, and put on PYTHONPATH by that test only. Its numpy is dropped: the
  # venv's serves (torch and streaming were built against it).
  echo "setup_env: installing transformers 5 into $VENV/transformers-5 (tests/hf only) ..."
  rm -rf "$VENV/transformers-5"
  # (pip then reports that streaming wants transformers < 5: true of the target, not of the venv; hence the log)
  if ! "${pip[@]}" install --target "$VENV/transformers-5" "transformers>=5,<6" > "$VENV/transformers-5.log" 2>&1; then
    cat "$VENV/transformers-5.log" >&2; exit 1
  fi
  rm -rf "$VENV"/transformers-5/numpy "$VENV"/transformers-5/numpy.libs "$VENV"/transformers-5/numpy-*.dist-info
fi
# PyPI has no CPU torchvision for torch 2.13 and `import streaming` imports torchvision: where its compiled ops
# cannot load, an import hook repairs it on first import (latentlm_mcore/compat/torchvision_hook.py)
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -f "$site/_latentlm_torchvision_hook.py" "$site/_latentlm_torchvision_hook.pth"
if ! "$VENV/bin/python" -c 'import sys; from latentlm_mcore.compat.torchvision_ops import _compiled_ops_load as ok
sys.exit(0 if ok() else 1)'; then
  cp latentlm_mcore/compat/torchvision_hook.py "$site/_latentlm_torchvision_hook.py"
  echo "import _latentlm_torchvision_hook" > "$site/_latentlm_torchvision_hook.pth"
  echo "setup_env: torchvision's compiled ops do not load beside this torch; installed the import repair"
fi
echo "$want" > "$stamp"
echo "setup_env: installed latentlm_mcore[${EXTRAS}] into $root/$VENV"
