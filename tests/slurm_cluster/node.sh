#!/bin/bash
# One node of start_multinode.sh's cluster: `node.sh kill N` kills everything in node N's network
# namespace (its slurmd and its job's tasks: a dead host); `node.sh start N` starts its slurmd again.
set -euo pipefail
STATE=${STATE:?set STATE}; PREFIX=${PREFIX:?set PREFIX}
export STATE SLURM_CONF=$STATE/slurm.conf
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ns=$PREFIX-node$2
case $1 in
kill)  # the link goes first, so that no FIN or RST reaches the peers: they see a silent host
  ip -n "$ns" link set eth0 down
  for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done ;;
start)
  mkdir -p "$STATE/spool/node$2"
  ip -n "$ns" link set eth0 up
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private bash "$here/enter_node.sh" "node$2" \
    slurmd -D -N "node$2" >> "$STATE/log/slurmd-node$2.out" 2>&1 & ;;
*) echo "usage: node.sh kill|start N" >&2; exit 2 ;;
esac
