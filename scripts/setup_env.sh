#!/usr/bin/env bash
# Makes .venv/ in the repository root (idempotent) and installs latentlm_mcore into it.
#   bash scripts/setup_env.sh            # CPU: torch 2.13.0 CPU wheel pinned
#   LATENTLM_KEEP_TORCH=1 bash scripts/setup_env.sh   # GPU cluster: keep the torch already in the base python
#   EXTRAS=test,gpu bash scripts/setup_env.sh         # choose extras (default: test)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-test}"
if [ ! -x .venv/bin/python ]; then
  if [ "${LATENTLM_KEEP_TORCH:-0}" = 1 ]; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
quiet_pip() {  # this machine's pip config names local indexes that may be absent: hide that noise only
  "${pip[@]}" "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}
stamp=".venv/.latentlm-installed"
want="$(cat setup.py constraints.txt | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup_env: .venv is up to date"; exit 0
fi
cons=(-c constraints.txt)
if [ "${LATENTLM_KEEP_TORCH:-0}" = 1 ]; then
  grep -v '^torch==' constraints.txt > .venv/constraints-keep-torch.txt
  cons=(-c .venv/constraints-keep-torch.txt)
else
  echo "setup_env: installing torch 2.13.0 (CPU wheel) into .venv ..."
  quiet_pip install "${cons[@]}" torch==2.13.0
fi
echo "setup_env: installing latentlm_mcore[${EXTRAS}] and its dependencies (megatron-core, mosaicml-streaming," \
  "transformers, ...; a few minutes the first time) ..."
quiet_pip install "${cons[@]}" -e ".[${EXTRAS}]"
echo "$want" > "$stamp"
echo "setup_env: installed latentlm_mcore[${EXTRAS}] into $root/.venv"
