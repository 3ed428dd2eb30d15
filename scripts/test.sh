#!/usr/bin/env bash
# The test command: makes/updates .venv, then runs the whole suite (CPU, gloo; multi-process tests
# launch torchrun themselves). Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/model -x`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
