#!/bin/bash
# Start a one-node Slurm cluster as root without systemd: munged, slurmctld, slurmd, all under $STATE.
# Needs Debian's packages: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge
# Usage: STATE=/some/dir bash start.sh   then   export SLURM_CONF=$STATE/slurm.conf ... bash stop.sh
set -euo pipefail
STATE=${STATE:?set STATE to a directory for the cluster state}
HOST=$(hostname -s)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for tool in munged slurmctld slurmd sinfo; do
  command -v $tool >/dev/null || { echo "start.sh: $tool not found; apt-get install --no-install-recommends slurmctld slurmd slurm-client munge" >&2; exit 1; }
done
mkdir -p "$STATE"/{munge,log,state,spool,run}
chmod 755 "$STATE/munge"
# nproc --all: plain nproc obeys OMP_NUM_THREADS, and a node sized at 1 CPU leaves 2-task jobs pending
sed -e "s#@STATE@#$STATE#g" -e "s#@HOST@#$HOST#g" -e "s#@CPUS@#$(nproc --all)#g" \
    -e "s#@CTLD_PORT@#${CTLD_PORT:-6817}#g" -e "s#@SLURMD_PORT@#${SLURMD_PORT:-6818}#g" \
    "$here/slurm.conf.in" > "$STATE/slurm.conf"
export SLURM_CONF=$STATE/slurm.conf
if [ ! -f "$STATE/munge/munge.key" ]; then
  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1 count=1024 2>/dev/null
  chmod 400 "$STATE/munge/munge.key"
fi
# 10 threads, not munged's 2: every daemon and client here shares this one munged (Slurm's own advice
# when credentials fail under load; CI saw squeue die of SIGPIPE as a job finished)
munged -F -f --num-threads=10 --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
  --log-file="$STATE/log/munged.log" --pid-file="$STATE/run/munged.pid" --seed-file="$STATE/munge/munged.seed" \
  > "$STATE/log/munged.out" 2>&1 &
echo $! > "$STATE/run/munged.bgpid"
for _ in $(seq 1 40); do [ -S "$STATE/munge/munge.socket" ] && break; sleep 0.25; done
slurmctld -D -i > "$STATE/log/slurmctld.out" 2>&1 &
echo $! > "$STATE/run/slurmctld.bgpid"
slurmd -D > "$STATE/log/slurmd.out" 2>&1 &
echo $! > "$STATE/run/slurmd.bgpid"
for _ in $(seq 1 120); do
  sinfo -h -o %T 2>/dev/null | grep -q idle && { echo "slurm up: $SLURM_CONF"; exit 0; }
  sleep 0.5
done
echo "start.sh: the node never became idle; logs in $STATE/log" >&2
tail -n 20 "$STATE"/log/*.log >&2 || true
exit 1
