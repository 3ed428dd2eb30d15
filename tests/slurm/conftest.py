import os
import subprocess
import time

import psutil
import pytest

from tests.conftest import REPO

CLUSTER = REPO / "tests/slurm_cluster"
PREFIX_STEM = "ltlc"  # every namespace the multi-node cluster makes is named ltlc<pytest pid>-*


def _remove_stale_clusters() -> None:
    """Namespaces left by a run whose pytest died before its teardown (named after its pid)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for prefix in {n.split("-")[0] for n in names if n.startswith(PREFIX_STEM) and "-" in n}:
        pid = prefix[len(PREFIX_STEM):]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            subprocess.run(["bash", str(CLUSTER / "stop_multinode.sh")], env=dict(os.environ, PREFIX=prefix))


class MultiNodeCluster:
    """A running 3-node Slurm (tests/slurm_cluster/start_multinode.sh). `env` runs Slurm commands from
    outside the namespaces (its PATH has wrappers that enter the hub); `kill_node`/`start_node` make a dead
    host and bring its slurmd back."""

    def __init__(self, state, prefix):
        self.state, self.prefix = state, prefix
        self.env = dict(os.environ, STATE=str(state), PREFIX=prefix, SLURM_CONF=str(state / "slurm.conf"),
                        PATH=f"{state / 'bin'}:{os.environ['PATH']}")

    def node(self, action: str, i: int) -> None:
        subprocess.run(["bash", str(CLUSTER / "node.sh"), action, str(i)], env=self.env, check=True, timeout=60)

    def wait_idle(self, nodes: int, timeout=120) -> None:
        end = time.time() + timeout
        while time.time() < end:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True).stdout
            if out.count("idle") >= nodes:
                return
            time.sleep(0.5)
        raise AssertionError(f"fewer than {nodes} idle nodes after {timeout}s:\n{out}")


@pytest.fixture(scope="session")
def multinode_cluster(tmp_path_factory):
    """slurmctld + node1..node3, each slurmd in its own network, UTS and mount namespace (private /dev/shm,
    node-local /var/tmp), the file system otherwise shared. Torn down by namespace name even when a test
    fails: every process in the namespaces is killed, then the namespaces and their links are deleted."""
    _remove_stale_clusters()
    state = tmp_path_factory.mktemp("multinode")
    cluster = MultiNodeCluster(state, f"{PREFIX_STEM}{os.getpid()}")
    try:
        start = subprocess.run(["bash", str(CLUSTER / "start_multinode.sh")], env=cluster.env, capture_output=True,
                               text=True, timeout=180)
        if start.returncode != 0:
            pytest.fail("could not start the 3-node Slurm (needs root, iproute2, util-linux, and "
                        "scripts/setup_system.sh's slurm packages):\n" + start.stdout + start.stderr)
        yield cluster
    finally:
        subprocess.run(["bash", str(CLUSTER / "stop_multinode.sh")], env=cluster.env, capture_output=True, timeout=120)


BENCH = REPO / "bench/results/multinode.json"


@pytest.fixture(scope="session")
def record_seconds():
    """`record_seconds(name, seconds)`: a scenario's wall time, written into bench/results/multinode.json at
    the end of the session (entries of scenarios that did not run this time are kept)."""
    import datetime
    import json

    from latentlm_mcore.runtime.files import write_json_atomic

    measured = {}
    yield lambda name, seconds: measured.__setitem__(name, round(seconds, 1))
    if measured:
        old = json.loads(BENCH.read_text()) if BENCH.exists() else {}
        write_json_atomic(BENCH, {
            "what": "wall seconds of the tests/slurm/test_multinode*.py scenarios on the 3-node netns Slurm "
                    "(tests/slurm_cluster/start_multinode.sh), tiny preset, CPU gloo",
            "conditions": f"{os.cpu_count()} CPU cores shared by the 3 nodes; the machine was also running other "
                          f"work (loaded), so these are upper figures; {datetime.date.today().isoformat()}",
            "seconds": dict(old.get("seconds", {}), **measured)})
