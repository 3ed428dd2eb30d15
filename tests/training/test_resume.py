"""pretrain/pretrain_latentlm.py at TP=2 on 2 CPU processes over real shards: SIGKILL at a random step,
SIGKILL in the middle of a checkpoint save, and SIGTERM, each followed by a resume, give exactly the
loss sequence and the final model + Adam state of an uninterrupted run; resuming at TP=1 continues
from the same data position."""
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import REPO, kill_tree, run_torchrun, spawn_torchrun

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")

PRETRAIN = REPO / "pretrain" / "pretrain_latentlm.py"
STEPS = 20


def args(dataset, save, *extra):
    return ["--preset", "tiny", "--data", str(dataset), "--save", str(save), "--train.train-steps", STEPS,
            "--train.warmup-steps", 2, "--train.global-batch-size", 4, "--train.micro-batch-size", 2,
            "--parallel.tensor-parallel", 2, "--log-interval", 1, "--save-interval", 5, "--keep-last", 10,
            "--num-workers", 0, "--tensorboard", "false",
            "--eval-data", str(dataset), "--eval-interval", 10, "--eval-iters", 2, *extra]


def train_losses(save: Path) -> list[tuple[int, float]]:
    with open(save / "metrics.jsonl") as f:
        return [(r["iteration"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def iterations_done(log: Path) -> int:
    """The last iteration this launch has logged (its own output, not metrics.jsonl, which still
    holds the entries of the killed run until the new one has resumed)."""
    done = [int(line.split()[1].split("/")[0]) for line in log.read_text().splitlines() if line.startswith("iter ")]
    return max(done, default=0)


def tmp_dirs(save: Path) -> set:
    return {p.name for p in save.iterdir() if p.name.endswith(".tmp") and p.is_dir()}


def wait_for(condition, proc, timeout=600, poll=0.005):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before the condition held")
        time.sleep(poll)
    raise AssertionError("timed out waiting")


def checkpoint_tensors(ckpt: Path, tmp_path: Path) -> dict:
    """Every tensor of a megatron torch_dist checkpoint, read without any process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp_path / f"{ckpt.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif torch.is_tensor(value):
            flat[prefix] = value
    walk("", torch.load(out, weights_only=False))
    return flat


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_torchrun(PRETRAIN, 2, args(tiny_dataset, tmp / "ckpt"), tmp)
    return tmp / "ckpt"


def test_kills_and_sigterm_resume_exactly(tiny_dataset, uninterrupted, tmp_path):
    save = tmp_path / "ckpt"
    rng = random.Random()
    kill_at = rng.randint(6, 12)
    print(f"SIGKILL after iteration {kill_at}")

    # 1. SIGKILL at a random step
    proc = spawn_torchrun(PRETRAIN, 2, args(tiny_dataset, save), tmp_path, tmp_path / "run1.log")
    wait_for(lambda: iterations_done(tmp_path / "run1.log") >= kill_at, proc)
    kill_tree(proc)

    # 2. resume, then SIGKILL in the middle of the next checkpoint save
    before = (save / "latest").read_text().strip()
    old_debris = tmp_dirs(save)
    proc = spawn_torchrun(PRETRAIN, 2, args(tiny_dataset, save), tmp_path, tmp_path / "run2.log")
    wait_for(lambda: iterations_done(tmp_path / "run2.log") > 0 and tmp_dirs(save) - old_debris, proc)
    kill_tree(proc)
    assert tmp_dirs(save) - old_debris, "the kill must land while a checkpoint is being written"
    latest = (save / "latest").read_text().strip()
    assert (save / latest / "run_config.json").exists(), "latest must still name a complete checkpoint"
    assert latest >= before

    # 3. resume, then SIGTERM (what Slurm sends): the run saves where it is and exits cleanly
    proc = spawn_torchrun(PRETRAIN, 2, args(tiny_dataset, save), tmp_path, tmp_path / "run3.log")
    resumed_at = int(latest.split("_")[1])
    wait_for(lambda: iterations_done(tmp_path / "run3.log") >= resumed_at + 2, proc)
    for worker in psutil.Process(proc.pid).children():  # torchrun's workers, as srun signals its tasks
        worker.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, (tmp_path / "run3.log").read_text()[-3000:]
    log = (tmp_path / "run3.log").read_text()
    stopped = int(log.split("stopped at iteration ")[1].split(":")[0])
    assert "signal SIGTERM" in log and stopped < STEPS
    assert (save / "latest").read_text().strip() == f"iter_{stopped:07d}"

    # 4. resume to the end
    run_torchrun(PRETRAIN, 2, args(tiny_dataset, save), tmp_path)

    assert train_losses(save) == train_losses(uninterrupted)  # exact, every iteration 1..20
    assert [it for it, _ in train_losses(save)] == list(range(1, STEPS + 1))
    final = f"iter_{STEPS:07d}"
    want = checkpoint_tensors(uninterrupted / final, tmp_path)
    got = checkpoint_tensors(save / final, tmp_path)
    assert got.keys() == want.keys()
    adam = [k for k in want if "exp_avg" in k]
    assert adam, "the checkpoint must hold the Adam moments"
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs after resuming"


def test_periodic_evaluation_reports_perplexity_and_diffusion_loss(uninterrupted):
    with open(uninterrupted / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert [r["iteration"] for r in evals] == [10, 20]
    for r in evals:
        assert r["lm_ppl"] == pytest.approx(math.exp(r["lm_loss"]))
        assert 0 < r["diffusion_loss"] < 10 and 0 < r["lm_loss"] < 20
    assert evals[1]["lm_loss"] < evals[0]["lm_loss"], "held-out LM loss falls while training"


def test_resume_at_tp1_continues_from_the_same_data_position(tiny_dataset, uninterrupted, tmp_path):
    save = tmp_path / "tp1"
    extra = ["--load", str(uninterrupted / "iter_0000010"), "--exit-after", 3]
    tp1 = [a if a != 2 or prev != "--parallel.tensor-parallel" else 1 for prev, a in
           zip([None] + args(tiny_dataset, save), args(tiny_dataset, save))]
    run_torchrun(PRETRAIN, 1, tp1 + extra, tmp_path)
    got = dict(train_losses(save))
    want = dict(train_losses(uninterrupted))
    assert sorted(got) == [11, 12, 13]
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=1e-4), f"iteration {it}"
    # a different data position would give clearly different losses on these documents
    assert any(abs(want[it] - want[it + 1]) > 1e-3 for it in (11, 12))


def test_data_the_model_cannot_read_is_refused_by_name(tiny_dataset, tmp_path):
    """cl100k shards (vocabulary 100,288) into a model of vocabulary 8,256: a clear error before training."""
    import subprocess
    import sys

    cmd = [sys.executable, str(PRETRAIN), *map(str, args(tiny_dataset, tmp_path / "ckpt")), "--model.vocab-size", "8256"]
    cmd[cmd.index("--parallel.tensor-parallel") + 1] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert proc.returncode != 0
    assert "tokenizer cl100k_base needs a vocabulary of 100288, the model has 8256" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "ckpt" / "latest").exists()
