#!/usr/bin/env bash
# The system packages the test suite needs, installed from Debian when they are missing.
#   slurmctld slurmd slurm-client munge: the Slurm launcher tests start their own one-node cluster
#   espeak-ng sox: speech tools of the data pipeline
# As root with apt-get: installs the missing ones. Otherwise: names them and the tests that will not run,
# and exits 1 (never a silent skip). `scripts/test.sh` calls this; the quickstart does not need it.
set -uo pipefail
# package:command pairs, one command that each package provides
wanted=(slurmctld:slurmctld slurmd:slurmd slurm-client:sinfo munge:munged espeak-ng:espeak-ng sox:sox)
missing=()
for pair in "${wanted[@]}"; do
  command -v "${pair#*:}" >/dev/null 2>&1 || missing+=("${pair%%:*}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

uid=${SETUP_SYSTEM_UID:-$EUID}  # SETUP_SYSTEM_UID: lets a test play a non-root user
if [ "$uid" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup_system: installing ${missing[*]} (Debian packages) ..."
  apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  still=()
  for pair in "${wanted[@]}"; do
    command -v "${pair#*:}" >/dev/null 2>&1 || still+=("${pair%%:*}")
  done
  [ ${#still[@]} -eq 0 ] && { echo "setup_system: installed ${missing[*]}"; exit 0; }
  missing=("${still[@]}")
  why="apt-get did not install them"
elif [ "$uid" -ne 0 ]; then
  why="installing them needs root"
else
  why="there is no apt-get on this machine"
fi
{  # builtins only: this must work on the barest machine
  echo "setup_system: missing system packages: ${missing[*]} ($why)."
  echo "  Install them:  sudo apt-get install --no-install-recommends ${missing[*]}"
  echo "  Until then these tests fail (they need a local Slurm cluster: slurmctld slurmd slurm-client munge):"
  echo "    tests/slurm/test_pretrain_launcher.py, tests/data/prep/test_slurm_preprocess.py,"
  echo "    tests/vae/test_trainer_slurm.py::test_two_process_gloo_ddp_via_slurm_launcher_then_torchrun_resume"
} >&2
exit 1
