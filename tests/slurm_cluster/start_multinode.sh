#!/bin/bash
# Start a 3-node Slurm on this machine as root: a "hub" network namespace holds a bridge, munged and
# slurmctld (host "ctl", $SUBNET.254); node1..node3 each get a network namespace joined to the bridge by a
# veth pair ($SUBNET.11-13), a UTS hostname, a mount namespace with the cluster's /etc/hosts, a private
# /dev/shm and a node-local /var/tmp. The file system is otherwise shared (the cluster file system).
# Nothing is added to the root network namespace: every link lives in a namespace named $PREFIX-*.
# Usage: STATE=dir PREFIX=ltlcNNN [SUBNET=10.213.0] bash start_multinode.sh ; stop with stop_multinode.sh
# Slurm commands from outside: ip netns exec $PREFIX-hub squeue (or $STATE/bin on PATH).
set -euo pipefail
STATE=${STATE:?set STATE}; PREFIX=${PREFIX:?set PREFIX}; SUBNET=${SUBNET:-10.213.0}
export STATE
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
hub=$PREFIX-hub
mkdir -p "$STATE"/{munge,log,state,spool,run,bin,nodes}
chmod 755 "$STATE/munge"
sed -e "s#@STATE@#$STATE#g" -e "s#@SUBNET@#$SUBNET#g" "$here/multinode.conf.in" > "$STATE/slurm.conf"
export SLURM_CONF=$STATE/slurm.conf
printf '127.0.0.1 localhost\n%s.254 ctl\n%s.11 node1\n%s.12 node2\n%s.13 node3\n' $SUBNET $SUBNET $SUBNET $SUBNET > "$STATE/hosts"
# client wrappers: outside the namespaces they enter the hub; inside a node they run as they are
for tool in sbatch squeue scontrol scancel sinfo srun; do
  cat > "$STATE/bin/$tool" <<W
#!/bin/bash
[ -z "\$(ip netns identify)" ] && exec ip netns exec $hub /usr/bin/$tool "\$@"
exec /usr/bin/$tool "\$@"
W
  chmod +x "$STATE/bin/$tool"
done

ip netns add "$hub"
ip -n "$hub" link set lo up
ip -n "$hub" link add br0 type bridge
ip -n "$hub" addr add "$SUBNET.254/24" dev br0
ip -n "$hub" link set br0 up
for i in 1 2 3; do
  ns=$PREFIX-node$i
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$hub" link add "v$i" type veth peer name eth0 netns "$ns"
  ip -n "$hub" link set "v$i" master br0 up
  ip -n "$ns" addr add "$SUBNET.1$i/24" dev eth0
  ip -n "$ns" link set eth0 up
done

in_ns() {  # in_ns NETNS HOST CMD...: a daemon in that network namespace, new UTS and mount namespaces
  local ns=$1 host=$2; shift 2
  mkdir -p "$STATE/spool/$host"
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private bash "$here/enter_node.sh" "$host" "$@"
}
if [ ! -f "$STATE/munge/munge.key" ]; then
  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1 count=1024 2>/dev/null
  chmod 400 "$STATE/munge/munge.key"
fi
# 10 threads, not munged's 2: every daemon and client here shares this one munged (Slurm's own advice
# when credentials fail under load; CI saw squeue die of SIGPIPE as a job finished)
in_ns "$hub" ctl munged -F -f --num-threads=10 --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
  --log-file="$STATE/log/munged.log" --pid-file="$STATE/run/munged.pid" --seed-file="$STATE/munge/munged.seed" \
  > "$STATE/log/munged.out" 2>&1 &
for _ in $(seq 1 40); do [ -S "$STATE/munge/munge.socket" ] && break; sleep 0.25; done
in_ns "$hub" ctl slurmctld -D -i > "$STATE/log/slurmctld.out" 2>&1 &
for i in ${NODES_AT_START:-1 2 3}; do
  in_ns "$PREFIX-node$i" "node$i" slurmd -D -N "node$i" > "$STATE/log/slurmd-node$i.out" 2>&1 &
done
for _ in $(seq 1 120); do
  n=$(ip netns exec "$hub" sinfo -h -N -o '%N %T' 2>/dev/null | grep -c idle || true)
  [ "$n" -ge "$(echo ${NODES_AT_START:-1 2 3} | wc -w)" ] && { echo "slurm up: $SLURM_CONF"; exit 0; }
  sleep 0.5
done
echo "start_multinode.sh: the nodes never became idle; logs in $STATE/log" >&2
ip netns exec "$hub" sinfo -N >&2 || true
tail -n 20 "$STATE"/log/*.log "$STATE"/log/*.out >&2 || true
exit 1
