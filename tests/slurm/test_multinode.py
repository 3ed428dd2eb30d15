"""slurm/pretrain_mllm_1.3b.sh across hosts, on the 3-node Slurm of tests/slurm/conftest.py (each node its
own network, hostname, /dev/shm): 2 nodes x 2 CPU tasks (TP=2 inside a node, DP=2 across the nodes) give the
same loss curve, bit for bit, as the same 4-task layout on one node."""
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

STEPS = 6


def sh(env, *cmd) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stdout}{out.stderr}"
    return out.stdout.strip()


def losses(save: Path) -> list[tuple[int, float, float]]:
    with open(save / "metrics.jsonl") as f:
        return [(r["iteration"], r["lm loss"], r["diffusion loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def submit(cluster, data, tmp_path, name, nodes, tasks_per_node) -> tuple[dict, str, Path, Path]:
    """sbatch the launcher with the tiny preset; returns (environment, job id, save folder, job output)."""
    save, log = tmp_path / name, tmp_path / f"{name}.out"
    env = dict(cluster.env, DATA=str(data), SAVE=str(save), PRESET="tiny", FP8="none", PYTHON=sys.executable,
               TMPDIR="/var/tmp", OMP_NUM_THREADS="1")  # /var/tmp is node-local, as on a real cluster
    job = sh(env, "sbatch", "--parsable", f"-N{nodes}", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
             "--cpus-per-task=1", "--time=15", f"--output={log}", f"--chdir={REPO}",
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
