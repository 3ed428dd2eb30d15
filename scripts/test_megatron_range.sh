#!/usr/bin/env bash
# The tests that touch megatron-core internals (the CPU switch, Megatron-vs-reference parity, kill/resume with
# dist checkpoints) on both ends of the supported range: .venv (0.16.1, what Python 3.11 resolves) and a second
# venv with the newest tested release, .venv-mcore-$HIGH (made by scripts/setup_env.sh with MEGATRON_CORE).
#   bash scripts/test_megatron_range.sh            # both ends
#   HIGH=0.19.2 bash scripts/test_megatron_range.sh -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
HIGH="${HIGH:-0.19.2}"
tests=(tests/compat/test_cpu_fallbacks.py tests/model/test_parity.py tests/training/test_resume.py)
bash scripts/setup_env.sh
VENV=".venv-mcore-$HIGH" MEGATRON_CORE="$HIGH" bash scripts/setup_env.sh
rc=0
for venv in .venv ".venv-mcore-$HIGH"; do
  version="$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("megatron-core"))')"
  echo "test_megatron_range: megatron-core $version ($venv)"
  "$venv/bin/python" -m pytest -q "${tests[@]}" "$@" || rc=1
done
exit "$rc"
