#!/bin/bash
# Run inside a fresh UTS + mount namespace (start_multinode.sh enters it): become host $1, see the
# cluster's /etc/hosts, get a private /dev/shm and a node-local /var/tmp, then exec the rest.
set -euo pipefail
host=$1; shift
hostname "$host"
mount --bind "$STATE/hosts" /etc/hosts
mount -t tmpfs -o size=4g,mode=1777 "shm-$host" /dev/shm
mkdir -p "$STATE/nodes/$host/tmp"
mount --bind "$STATE/nodes/$host/tmp" /var/tmp
exec "$@"
