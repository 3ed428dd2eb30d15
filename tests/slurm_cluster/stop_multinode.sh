#!/bin/bash
# Stop what start_multinode.sh started: every process in the $PREFIX-* network namespaces (daemons and
# job tasks alike; their mounts go with their mount namespaces), then the namespaces and their links.
PREFIX=${PREFIX:?set PREFIX}
for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-"); do
  for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null; done
done
sleep 0.5
for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-"); do ip netns del "$ns"; done
exit 0
