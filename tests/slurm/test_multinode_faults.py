"""Faults on the 3-node Slurm of tests/slurm/conftest.py, with slurm/pretrain_mllm_1.3b.sh on 2 nodes x 2 CPU
tasks (TP=2 inside a node, DP=2 across nodes):
(a) USR1 from Slurm to the batch shell mid-run: the tasks checkpoint and exit, the job requeues itself, resumes
    on 2 nodes and its loss curve equals an uninterrupted run's, no iteration lost or repeated;
(c) a host whose slurmd comes up late: the job waits for it and then trains the same curve."""
import subprocess
import time

import pytest

from tests.slurm.commands import sh, wait
from tests.slurm.test_multinode import STEPS, losses, run_job, submit

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")


def trained(save) -> int:
    try:
        return len(losses(save))
    except (FileNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def reference(multinode_cluster, tiny_dataset, tmp_path_factory):
    """The losses of an uninterrupted 2-node run."""
    save, out, _ = run_job(multinode_cluster, tiny_dataset, tmp_path_factory.mktemp("reference"), "reference",
                           nodes=2, tasks_per_node=2)
    assert f"stopped at iteration {STEPS}: finished" in out, out[-5000:]
    return losses(save)


def test_usr1_checkpoints_requeues_and_resumes_with_the_same_losses(multinode_cluster, tiny_dataset, tmp_path, reference,
                                                                    record_seconds):
    env, job, save, log = submit(multinode_cluster, tiny_dataset, tmp_path, "preempted", nodes=2, tasks_per_node=2)
    start = time.time()
    try:
        wait(lambda: trained(save) >= 2, "2 training iterations", log)
        sh(env, "scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@300 sends at the time limit
        wait(lambda: sh(env, "squeue", "-h", "-j", job, "-o", "%T") == "PENDING", "the job to requeue itself", log)
        preempted_at = (save / "latest").read_text().strip()
        # skip Slurm's 2-minute requeue hold, but not within the second of the requeue: slurmd revokes the old
        # run's credential by the second and would kill the restart as "Job credential revoked"
        time.sleep(2)
        sh(env, "scontrol", "update", f"JobId={job}", "StartTime=now")
        wait(lambda: sh(env, "squeue", "-h", "-j", job, "-o", "%T") == "", "the requeued job to finish", log)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    wall = time.time() - start
    out = log.read_text()
    stop = int(out.split("stopped at iteration ")[1].split(":")[0])
    assert "signal SIGUSR1" in out.split("stopped at iteration ")[1].splitlines()[0], out[-4000:]
    assert preempted_at == f"iter_{stop:07d}" and stop < STEPS
    assert "restart 1" in out and "2 nodes, 4 tasks" in out.split("restart 1")[1]
    assert f"resumed from {save / preempted_at} at iteration {stop}" in out
    assert f"stopped at iteration {STEPS}: finished" in out
    assert losses(save) == reference, "the requeued run must continue the uninterrupted curve exactly"
    record_seconds("usr1_requeue_scenario", wall)
    print(f"wall: preempted at iteration {stop}, requeued and finished in {wall:.0f}s")


def test_a_slow_to_start_host_delays_the_job_but_not_its_losses(multinode_cluster, tiny_dataset, tmp_path, reference,
                                                                record_seconds):
    """node3's slurmd is down when the job (pinned to node1 + node3) is submitted and comes up 15 s later."""
    cluster = multinode_cluster
    state = lambda: sh(cluster.env, "sinfo", "-h", "-n", "node3", "-o", "%T")  # noqa: E731
    cluster.node("kill", 3)
    start = time.time()
    try:
        wait(lambda: "down" in state(), "slurmctld to see node3 down", tmp_path / "none", timeout=120)
        env, job, save, log = submit(cluster, tiny_dataset, tmp_path, "slow-host", nodes=2, tasks_per_node=2,
                                     sbatch_args=("--nodelist=node1,node3",))
        time.sleep(15)
        assert sh(env, "squeue", "-h", "-j", job, "-o", "%T") == "PENDING", "the job must wait for node3"
    finally:
        cluster.node("start", 3)
    try:
        wait(lambda: sh(env, "squeue", "-h", "-j", job, "-o", "%T") == "", "the job to finish", log)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    out = log.read_text()
    assert "2 nodes, 4 tasks, master node1:" in out and f"stopped at iteration {STEPS}: finished" in out, out[-4000:]
    assert losses(save) == reference, "a late host must not change the run"
    record_seconds("slow_start_host_scenario", time.time() - start)
    cluster.wait_idle(3)
