#!/bin/bash
# Stop what start.sh started, by PID (running jobs are killed with their slurmd).
STATE=${STATE:?set STATE}
for d in slurmd slurmctld munged; do
  f="$STATE/run/$d.bgpid"
  [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null
  rm -f "$f"
done
exit 0
