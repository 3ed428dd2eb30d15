"""slurm/pretrain_mllm_1.3b.sh on a real one-node Slurm, with CPU overrides (1 node, 2 tasks, tiny
preset, TP=2): it trains and checkpoints; `scontrol requeue` makes the tasks checkpoint and exit and
the requeued job resumes from that checkpoint and finishes."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.commands import sh, wait

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")

STEPS = 16


def job_field(env, job: str, field: str) -> str:
    return sh(env, "squeue", "-h", "-j", job, "-o", field)


def iterations(save: Path) -> list[int]:
    try:
        with open(save / "metrics.jsonl") as f:
            return [r["iteration"] for r in map(json.loads, f) if r["split"] == "train"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_sbatch_trains_checkpoints_and_resumes_after_requeue(slurm_cluster, tiny_dataset, tmp_path):
    env = dict(slurm_cluster, DATA=str(tiny_dataset), SAVE=str(tmp_path / "ckpt"), PRESET="tiny", FP8="none",
               PYTHON=sys.executable, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", MASTER_PORT="29731")
    log = tmp_path / "job.out"
    job = sh(env, "sbatch", "--parsable", "-N1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
             "--time=15", f"--output={log}", f"--chdir={REPO}", str(REPO / "slurm/pretrain_mllm_1.3b.sh"),
             "--parallel.tensor-parallel", "2", "--train.train-steps", str(STEPS), "--train.warmup-steps", "2",
             "--train.global-batch-size", "4", "--train.micro-batch-size", "2", "--log-interval", "1",
             "--save-interval", "4", "--num-workers", "0", "--tensorboard", "false")
    save = tmp_path / "ckpt"
    try:
        wait(lambda: len(iterations(save)) >= 6, "6 training iterations", log)
        sh(env, "scontrol", "requeue", job)
        wait(lambda: job_field(env, job, "%T") == "PENDING", "the job to be requeued", log)
        preempted_at = (save / "latest").read_text().strip()
        time.sleep(2)  # not within the second of the requeue: slurmd would reject the restart (credential revoked)
        sh(env, "scontrol", "update", f"JobId={job}", "StartTime=now")  # skip Slurm's 2-minute requeue hold
        wait(lambda: job_field(env, job, "%T") == "", "the requeued job to finish", log)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    out = log.read_text()
    assert "restart 1" in out, out[-3000:]
    stop = int(out.split("stopped at iteration ")[1].split(":")[0])
    assert "signal" in out.split("stopped at iteration ")[1].splitlines()[0], "the tasks must stop on the signal"
    assert preempted_at == f"iter_{stop:07d}", "the preemption checkpoint is the newest one"
    assert f"resumed from {save / preempted_at} at iteration {stop}" in out
    assert f"stopped at iteration {STEPS}: finished" in out
    assert (save / "latest").read_text().strip() == f"iter_{STEPS:07d}"
    assert iterations(save) == list(range(1, STEPS + 1)), "no iteration lost or repeated across the requeue"
    assert (save / "loss_curve.png").stat().st_size > 0
