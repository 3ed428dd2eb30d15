"""slurm/train_sigma_vae.sh on the one-node Slurm of tests/conftest.py: srun's tasks become torch.distributed
ranks, and a torchrun launch of the entry point resumes the run the job wrote."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from latentlm_mcore.vae import load_sigma_vae
from tests.conftest import REPO as _REPO, free_port
from tests.slurm.commands import job_fields

REPO = str(_REPO)


# Loaded by every Python process of the job (it is put first on PYTHONPATH): on a normal exit each records
# the Slurm task it was and the torch.distributed rank the launcher gave it.
TASK_RECORDER = """import atexit, json, os

def _record():
    keys = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "RANK", "LOCAL_RANK", "WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT")
    with open(os.path.join(os.environ["TASK_RECORDS"], f"{os.getpid()}.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in keys}, f)

if os.environ.get("TASK_RECORDS") and "train_sigma_vae.py" in " ".join(__import__("sys").argv):
    atexit.register(_record)
"""


@pytest.mark.slow  # starts the one-node Slurm cluster and torchrun
def test_two_process_gloo_ddp_via_slurm_launcher_then_torchrun_resume(slurm_cluster, photo_dirs, tmp_path):
    """slurm/train_sigma_vae.sh submitted to a real one-node Slurm (the `slurm_cluster` fixture): srun starts 2
    CPU tasks (gloo), the GPU defaults overridden on the sbatch command line; then a torchrun invocation of the
    entry point resumes the same run."""
    out_dir, job_log = tmp_path / "run", tmp_path / "sigma-vae.out"
    (tmp_path / "tmp").mkdir()
    env = dict(slurm_cluster, TMPDIR=str(tmp_path / "tmp"), OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "REPO_DIR"):
        env.pop(name, None)
    common = ["--train-data", str(photo_dirs[0]), "--eval-data", str(photo_dirs[1]), "--batch-size", "4",
              "--save-interval", "2", "--eval-interval", "2", "--stats-samples", "16", "--num-workers", "0",
              "--tensorboard", "false"]

    def run(cmd, extra_env):
        proc = subprocess.run(cmd, env=dict(env, **extra_env), cwd=tmp_path, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    # Submitted from the repository root, as documented: the job finds the repository by $SLURM_SUBMIT_DIR
    # (sbatch runs a copy of the script from its spool folder).
    master_port = free_port()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(TASK_RECORDER)
    (tmp_path / "tasks").mkdir()
    job_env = dict(env, PYTHONPATH=f"{tmp_path / 'site'}:{REPO}", TASK_RECORDS=str(tmp_path / "tasks"),
                   PYTHON=sys.executable, OUT_DIR=str(out_dir), PRESET="tiny", WANDB_PROJECT="",
                   MASTER_PORT=str(master_port))
    sbatch = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
              "--time=5", f"--output={job_log}", os.path.join("slurm", "train_sigma_vae.sh"), "--train-steps", "2"]
    submit = subprocess.run(sbatch + common, env=job_env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    job_output = lambda: job_log.read_text() if job_log.exists() else "(no job output)"  # noqa: E731
    finished = False
    try:
        deadline = time.monotonic() + 180  # no accounting (sacct) here: gone from squeue means finished
        while subprocess.run(["squeue", "-h", "-j", job_id], env=job_env, capture_output=True, text=True,
                             timeout=30).stdout.strip():
            if time.monotonic() > deadline:
                job = job_fields(job_env, job_id)[0]
                raise AssertionError(f"job {job_id} still {job.get('JobState')} ({job.get('Reason')}) after 180 s:"
                                     f"\n{job_output()[-5000:]}")
            time.sleep(2)
        finished = True
    finally:
        if not finished:
            subprocess.run(["scancel", job_id], env=job_env, capture_output=True, timeout=30)
    first = job_output()
    job = job_fields(job_env, job_id)[0]
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job.get('Reason')}\n{first[-5000:]}"
    assert (job["NumTasks"], job["NumNodes"]) == ("2", "1") and "gpu" not in job["TRES"], job
    assert job["WorkDir"] == REPO, job
    hostname = socket.gethostname().split(".")[0]
    assert f"1 node(s), 2 GPUs, master {hostname}:{master_port}, out {out_dir}" in first, first[-5000:]
    assert "world size 2" in first and "step 2: saved" in first, first[-5000:]
    assert torch.load(out_dir / "checkpoint.pt", weights_only=True)["step"] == 2
    assert (out_dir / "sigma_vae.pt").exists()
    # Both srun tasks of the job's first step ran the trainer to a normal exit, with ranks taken from Slurm's ids.
    tasks = sorted((json.loads(f.read_text()) for f in (tmp_path / "tasks").glob("*.json")),
                   key=lambda t: t["SLURM_PROCID"])
    expected = [{"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r),
                 "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": hostname,
                 "MASTER_PORT": str(master_port)} for r in range(2)]
    assert tasks == expected, first[-5000:]
    # Each evaluated half of the 12 held-out images and the counts were summed.
    evals = [e for e in map(json.loads, open(out_dir / "metrics.jsonl")) if e["split"] == "eval"]
    assert [(e["iteration"], e["images"]) for e in evals] == [(2, 12)]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                os.path.join(REPO, "pretrain", "train_sigma_vae.py"), "--preset", "tiny", "--out-dir", str(out_dir),
                "--train-steps", "4"] + common
    second = run(torchrun, {})
    assert "resumed" in second and "at step 2" in second and "world size 2" in second
    evals = [e for e in map(json.loads, open(out_dir / "metrics.jsonl")) if e["split"] == "eval"]
    assert [e["iteration"] for e in evals] == [2, 4]
    assert all(e["images"] == 12 for e in evals)  # each rank evaluated half; the counts were summed
    assert torch.load(out_dir / "checkpoint.pt", weights_only=True)["step"] == 4
    assert load_sigma_vae(out_dir / "sigma_vae.pt").latent_stats is not None
