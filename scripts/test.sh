#!/usr/bin/env bash
# The test command: installs the system packages the tests need (scripts/setup_system.sh: Slurm, munge, ...),
# makes/updates .venv, then runs the whole suite (CPU, gloo; multi-process tests launch torchrun themselves).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/model -x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
system_rc=0
bash scripts/setup_system.sh || system_rc=$?
bash scripts/setup_env.sh
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$system_rc" -ne 0 ]; then
  echo "test.sh: system packages are missing (see setup_system's message above); exiting non-zero" >&2
  [ "$rc" -eq 0 ] && rc=$system_rc
fi
exit "$rc"
