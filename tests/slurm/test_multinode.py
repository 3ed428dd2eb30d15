"""slurm/pretrain_mllm_1.3b.sh across hosts, on the 3-node Slurm of tests/slurm/conftest.py (each node its
own network, hostname, /dev/shm): 2 nodes x 2 CPU tasks (TP=2 inside a node, DP=2 across the nodes) give the
same loss curve, bit for bit, as the same 4-task layout on one node."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")

STEPS = 6


def sh(env, *cmd) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stdout}{out.stderr}"
    return out.stdout.strip()


def losses(save: Path) -> list[tuple[int, float, float]]:
    with open(save / "metrics.jsonl") as f:
        return [(r["iteration"], r["lm_loss"], r["diffusion_loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def submit(cluster, data, tmp_path, name, nodes, tasks_per_node, sbatch_args=()) -> tuple[dict, str, Path, Path]:
    """sbatch the launcher with the tiny preset; returns (environment, job id, save folder, job output)."""
    save, log = tmp_path / name, tmp_path / f"{name}.out"
    env = dict(cluster.env, DATA=str(data), SAVE=str(save), PRESET="tiny", FP8="none", PYTHON=sys.executable,
               TMPDIR="/var/tmp", OMP_NUM_THREADS="1")  # /var/tmp is node-local, as on a real cluster
    job = sh(env, "sbatch", "--parsable", f"-N{nodes}", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
             "--cpus-per-task=1", "--time=15", f"--output={log}", f"--chdir={REPO}", *sbatch_args,
             str(REPO / "slurm/pretrain_mllm_1.3b.sh"),
             "--parallel.tensor-parallel", "2", "--train.train-steps", str(STEPS), "--train.warmup-steps", "2",
             "--train.global-batch-size", "4", "--train.micro-batch-size", "1", "--log-interval", "1",
             "--save-interval", "100", "--num-workers", "0", "--tensorboard", "false")
    return env, job, save, log


def run_job(cluster, data, tmp_path, name, nodes, tasks_per_node, timeout=900) -> tuple[Path, str, float]:
    """sbatch the launcher and wait for it; returns (save folder, job output, wall seconds)."""
    start = time.time()
    env, job, save, log = submit(cluster, data, tmp_path, name, nodes, tasks_per_node)
    try:
        while sh(env, "squeue", "-h", "-j", job, "-o", "%T"):
            assert time.time() - start < timeout, f"job {job} still running after {timeout}s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    return save, log.read_text(), time.time() - start


def test_two_nodes_give_the_one_node_loss_curve(multinode_cluster, tiny_dataset, tmp_path):
    two, out2, wall2 = run_job(multinode_cluster, tiny_dataset, tmp_path, "two-nodes", nodes=2, tasks_per_node=2)
    assert "2 nodes, 4 tasks, master node1:" in out2, out2[-3000:]
    assert f"stopped at iteration {STEPS}: finished" in out2, out2[-5000:]
    one, out1, wall1 = run_job(multinode_cluster, tiny_dataset, tmp_path, "one-node", nodes=1, tasks_per_node=4)
    assert f"stopped at iteration {STEPS}: finished" in out1, out1[-5000:]
    curve = losses(two)
    assert [it for it, *_ in curve] == list(range(1, STEPS + 1))
    assert curve == losses(one), "DP across hosts must give the one-host losses exactly (same layout, same order)"
    print(f"wall: 2 nodes {wall2:.0f}s, 1 node {wall1:.0f}s")


def test_dead_host_ends_the_step_and_the_requeue_resumes_on_the_healthy_nodes(multinode_cluster, tiny_dataset, tmp_path):
    """node.sh kill takes a node's link down and SIGKILLs its slurmd and tasks (peers see silence, not a
    closed socket). slurmctld marks it DOWN after SlurmdTimeout, ends the job's step on the other node and
    requeues the job (--requeue); it resumes from the last complete checkpoint on the two healthy nodes."""
    cluster, steps = multinode_cluster, 12
    save, log = tmp_path / "ckpt", tmp_path / "job.out"
    env = dict(cluster.env, DATA=str(tiny_dataset), SAVE=str(save), PRESET="tiny", FP8="none", PYTHON=sys.executable,
               TMPDIR="/var/tmp", OMP_NUM_THREADS="1")
    job = sh(env, "sbatch", "--parsable", "-N2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
             "--time=20", f"--output={log}", f"--chdir={REPO}", str(REPO / "slurm/pretrain_mllm_1.3b.sh"),
             "--parallel.tensor-parallel", "2", "--train.train-steps", str(steps), "--train.warmup-steps", "2",
             "--train.global-batch-size", "4", "--train.micro-batch-size", "1", "--log-interval", "1",
             "--save-interval", "4", "--num-workers", "0", "--tensorboard", "false")
    state = lambda: sh(env, "squeue", "-h", "-j", job, "-o", "%T")  # noqa: E731
    done = lambda: [r[0] for r in losses(save)] if (save / "metrics.jsonl").exists() else []  # noqa: E731
    try:
        end = time.time() + 600
        while len(done()) < 6:
            assert time.time() < end, log.read_text()[-4000:]
            time.sleep(0.5)
        victim = sh(env, "squeue", "-h", "-j", job, "-o", "%N").replace("node[", "").split(",")[-1].strip("]")
        victim = int(victim.split("-")[-1].replace("node", ""))
        killed = time.time()
        cluster.node("kill", victim)
        while state() == "RUNNING":
            assert time.time() - killed < 300, f"the job hangs after node{victim} died:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        fail_fast = time.time() - killed
        kept = (save / "latest").read_text().strip()
        assert kept in ("iter_0000004", "iter_0000008") and (save / kept).is_dir()
        while state() not in ("PENDING", ""):
            time.sleep(0.5)
        time.sleep(2)  # not within the second of the requeue: slurmd would reject the restart (credential revoked)
        sh(env, "scontrol", "update", f"JobId={job}", "StartTime=now")  # skip Slurm's requeue hold
        end = time.time() + 600
        while state():
            assert time.time() < end, log.read_text()[-4000:]
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
        cluster.node("start", victim) if "victim" in locals() else None
    out = log.read_text()
    assert f"resumed from {save / kept}" in out, out[-5000:]
    assert f"stopped at iteration {steps}: finished" in out, out[-5000:]
    assert done() == list(range(1, steps + 1)), "no iteration lost or repeated across the node failure"
    print(f"node{victim} killed: job off the node after {fail_fast:.0f}s")
