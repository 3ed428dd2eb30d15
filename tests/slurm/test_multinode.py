"""slurm/pretrain_mllm_1.3b.sh across hosts, on the 3-node Slurm of tests/slurm/conftest.py (each node its
own network, hostname, /dev/shm): 2 nodes x 2 CPU tasks (TP=2 inside a node, DP=2 across the nodes) give the
same loss curve, bit for bit, as the same 4-task layout on one node; a host that dies mid-run ends the job
within seconds, and the run resumed on one node (DP=1) trains every global sequence once over the whole run
(sample-id log) with the losses of an uninterrupted one-node run."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentlm_mcore.training.sample_ids import committed_steps
from tests.conftest import REPO
from tests.slurm.commands import sh

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")

STEPS = 6


def losses(save: Path) -> list[tuple[int, float, float]]:
    with open(save / "metrics.jsonl") as f:
        return [(r["iteration"], r["lm_loss"], r["diffusion_loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def submit(cluster, data, tmp_path, name, nodes, tasks_per_node, sbatch_args=(), steps=STEPS, save_interval=100,
           extra=(), save=None) -> tuple[dict, str, Path, Path]:
    """sbatch the launcher with the tiny preset; returns (environment, job id, save folder, job output)."""
    save, log = save or tmp_path / name, tmp_path / f"{name}.out"
    env = dict(cluster.env, DATA=str(data), SAVE=str(save), PRESET="tiny", FP8="none", PYTHON=sys.executable,
               TMPDIR="/var/tmp", OMP_NUM_THREADS="1")  # /var/tmp is node-local, as on a real cluster
    job = sh(env, "sbatch", "--parsable", f"-N{nodes}", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
             "--cpus-per-task=1", "--time=15", f"--output={log}", f"--chdir={REPO}", *sbatch_args,
             str(REPO / "slurm/pretrain_mllm_1.3b.sh"),
             "--parallel.tensor-parallel", "2", "--train.train-steps", str(steps), "--train.warmup-steps", "2",
             "--train.global-batch-size", "4", "--train.micro-batch-size", "1", "--log-interval", "1",
             "--save-interval", str(save_interval), "--num-workers", "0", "--tensorboard", "false", *extra)
    return env, job, save, log


def wait_job(env, job, log, start, timeout=900) -> None:
    try:
        while sh(env, "squeue", "-h", "-j", job, "-o", "%T"):
            assert time.time() - start < timeout, f"job {job} still running after {timeout}s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)


def run_job(cluster, data, tmp_path, name, nodes, tasks_per_node, timeout=900, **submit_args) -> tuple[Path, str, float]:
    """sbatch the launcher and wait for it; returns (save folder, job output, wall seconds)."""
    start = time.time()
    env, job, save, log = submit(cluster, data, tmp_path, name, nodes, tasks_per_node, **submit_args)
    wait_job(env, job, log, start, timeout)
    return save, log.read_text(), time.time() - start


def test_two_nodes_give_the_one_node_loss_curve(multinode_cluster, tiny_dataset, tmp_path, record_seconds):
    two, out2, wall2 = run_job(multinode_cluster, tiny_dataset, tmp_path, "two-nodes", nodes=2, tasks_per_node=2)
    assert "2 nodes, 4 tasks, master node1:" in out2, out2[-3000:]
    assert f"stopped at iteration {STEPS}: finished" in out2, out2[-5000:]
    one, out1, wall1 = run_job(multinode_cluster, tiny_dataset, tmp_path, "one-node", nodes=1, tasks_per_node=4)
    assert f"stopped at iteration {STEPS}: finished" in out1, out1[-5000:]
    curve = losses(two)
    assert [it for it, *_ in curve] == list(range(1, STEPS + 1))
    assert curve == losses(one), "DP across hosts must give the one-host losses exactly (same layout, same order)"
    record_seconds("two_nodes_loss_curve_run", wall2)
    record_seconds("one_node_loss_curve_run", wall1)
    print(f"wall: 2 nodes {wall2:.0f}s, 1 node {wall1:.0f}s")


def check_each_sequence_once(committed: dict, steps: int, batch: int) -> None:
    """The committed steps consumed the global sequences 0 .. steps*batch-1 once each, step i the i-th batch,
    and their document pieces follow one another through the document stream: none repeated or skipped."""
    sequences = [q for it in range(1, steps + 1) for q in committed[it]["sequences"]]
    assert [q["index"] for q in sequences] == list(range(steps * batch))
    for it in range(1, steps + 1):
        assert [q["index"] for q in committed[it]["sequences"]] == list(range((it - 1) * batch, it * batch))
    pieces = [tuple(p) for q in sequences for p in q["documents"]]
    assert len(set(pieces)) == len(pieces), "a document piece trained twice"
    for (g0, _, _, end0), (g1, _, start1, _) in zip(pieces, pieces[1:]):
        assert (g1 == g0 and start1 == end0) or (g1 > g0 and start1 == 0), f"gap between {g0}:{end0} and {g1}:{start1}"


def test_dead_host_fails_fast_and_the_run_resumes_on_one_node_with_each_sample_once(
        multinode_cluster, tiny_dataset, tmp_path, record_seconds):
    """node.sh kill takes a node's link down and SIGKILLs its slurmd and tasks (peers see silence, not a
    closed socket). slurmctld marks it DOWN after SlurmdTimeout, ends the job's step on the other node and
    requeues the job (--requeue); the requeued job is cancelled and the run resubmitted on ONE node (TP=2,
    DP=1) with the same SAVE. The sample-id log (--log-sample-ids) shows every global sequence trained
    once over the run, the steps redone after the last checkpoint told apart, and the losses are those of an
    uninterrupted one-node run."""
    cluster, steps, batch = multinode_cluster, 12, 4
    ids = ("--log-sample-ids", "true")
    start = time.time()
    env, job, save, log = submit(cluster, tiny_dataset, tmp_path, "dead-host", 2, 2, steps=steps, save_interval=4,
                                 extra=ids, sbatch_args=("--time=20",))
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
        end = time.time() + 300
        while state() not in ("PENDING", ""):  # requeued (held by Slurm for ~2 min)
            assert time.time() < end, log.read_text()[-4000:]
            time.sleep(0.5)
        sh(env, "scancel", job)
        while state():
            time.sleep(0.5)
        # the same run on one healthy host: TP=2, DP=1, twice the micro-batches per step
        healthy = next(f"node{i}" for i in (1, 2, 3) if i != victim)
        env1, job1, _, log1 = submit(cluster, tiny_dataset, tmp_path, "dead-host-resumed", 1, 2, steps=steps,
                                     save_interval=4, extra=ids, save=save, sbatch_args=(f"--nodelist={healthy}",))
        wait_job(env1, job1, log1, time.time(), timeout=600)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
        cluster.node("start", victim) if "victim" in locals() else None
    wall = time.time() - start
    out = log1.read_text()
    resumed_at = int(kept.split("_")[1])
    assert f"stopped at iteration {steps}: finished" in out and "1 nodes, 2 tasks" in out, out[-5000:]
    assert f"resumed from {save / kept} at iteration {resumed_at}" in out, out[-5000:]
    assert done() == list(range(1, steps + 1)), "no iteration lost or repeated across the node failure"

    committed, replaced = committed_steps(save)
    assert sorted(committed) == list(range(1, steps + 1))
    check_each_sequence_once(committed, steps, batch)
    assert [r["dp_size"] for r in committed.values()] == [2] * resumed_at + [1] * (steps - resumed_at)
    assert committed[resumed_at]["checkpoint"] and committed[resumed_at]["resumed_from"] == 0
    # what the dead job trained after its last checkpoint was redone at DP=1 on the same sequences
    redone = sorted(r["iteration"] for r in replaced)
    assert redone and redone == list(range(resumed_at + 1, redone[-1] + 1)) and redone[-1] >= 6, redone
    for r in replaced:
        assert r["dp_size"] == 2 and not r["checkpoint"]
        again = committed[r["iteration"]]
        assert again["resumed_from"] == resumed_at and again["sequences"] == [
            dict(q, dp_rank=0) for q in r["sequences"]]  # DP=1: one rank trains every sequence
        assert again["lm_loss"] == pytest.approx(r["lm_loss"], rel=1e-5)
    reference, _, wall_reference = run_job(cluster, tiny_dataset, tmp_path, "one-node-uninterrupted", 1, 2,
                                           steps=steps, save_interval=100, extra=ids)
    want, _ = committed_steps(reference)
    assert [q for r in want.values() for q in r["sequences"]] == [
        dict(q, dp_rank=0) for r in committed.values() for q in r["sequences"]], "the uninterrupted run's samples"
    worst = 0.0
    for it, record in want.items():
        for key in ("lm_loss", "diffusion_loss"):
            worst = max(worst, abs(committed[it][key] - record[key]) / abs(record[key]))
            assert committed[it][key] == pytest.approx(record[key], rel=1e-5), f"iteration {it}: {key}"
    record_seconds("dead_host_fail_fast", fail_fast)
    record_seconds("dead_host_scenario_submit_to_one_node_resume_finished", wall)
    record_seconds("one_node_uninterrupted_reference_run", wall_reference)
    print(f"node{victim} killed after step 6: job off the node after {fail_fast:.0f}s; resumed on {healthy} from {kept}; "
          f"steps {redone} redone; {steps * batch} sequences each trained once; worst relative loss difference "
          f"to the uninterrupted one-node run {worst:.1e}; scenario {wall:.0f}s")
