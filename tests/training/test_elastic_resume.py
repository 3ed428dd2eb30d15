"""Issue 15 item 4: resuming at another data-parallel size continues the uninterrupted loss curve.

pretrain/pretrain_latentlm.py on CPU (gloo, fp32), tiny preset over real shards, global batch 4 of
micro-batch 1: an uninterrupted DP=2 run against one stopped at DP=2 after step 5, resumed at DP=1 to
step 9, then at DP=2 to the end. Before the global sequence stream each rank packed its own documents,
so the DP=1 resume drew other global batches (1.6e-4 relative at the next step, 3.9% ten steps on).
"""
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_torchrun

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")

PRETRAIN = REPO / "pretrain" / "pretrain_latentlm.py"
STEPS = 12


def args(dataset, save, *extra):
    return ["--preset", "tiny", "--data", str(dataset), "--save", str(save), "--train.train-steps", STEPS,
            "--train.warmup-steps", 2, "--train.global-batch-size", 4, "--train.micro-batch-size", 1,
            "--parallel.tensor-parallel", 1, "--log-interval", 1, "--save-interval", 100, "--keep-last", 10,
            "--num-workers", 0, "--tensorboard", "false", *extra]


def train_records(save: Path) -> dict:
    with open(save / "metrics.jsonl") as f:
        return {r["iteration"]: r for r in map(json.loads, f) if r["split"] == "train"}


def test_resume_at_another_dp_size_gives_the_uninterrupted_losses(tiny_dataset, tmp_path):
    run_torchrun(PRETRAIN, 2, args(tiny_dataset, tmp_path / "uninterrupted"), tmp_path)
    save = tmp_path / "elastic"
    run_torchrun(PRETRAIN, 2, args(tiny_dataset, save, "--exit-after", 5), tmp_path)  # DP=2, steps 1-5
    run_torchrun(PRETRAIN, 1, args(tiny_dataset, save, "--exit-after", 4), tmp_path)  # DP=1, steps 6-9
    run_torchrun(PRETRAIN, 2, args(tiny_dataset, save), tmp_path)  # DP=2, steps 10-12

    want, got = train_records(tmp_path / "uninterrupted"), train_records(save)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = max(abs(got[it][k] - want[it][k]) / abs(want[it][k]) for it in want for k in ("lm_loss", "diffusion_loss"))
    print(f"\nDP=2 -> 1 -> 2 against uninterrupted DP=2: largest relative loss difference {worst:.2e}")
    for it in want:
        for key in ("lm_loss", "diffusion_loss"):
            assert got[it][key] == pytest.approx(want[it][key], rel=1e-5, abs=1e-7), f"iteration {it}: {key}"
    # the global stream's token share is the same whatever the layout, and it is logged
    for key in ("token_share_text", "token_share_pair", "token_share_interleaved"):
        assert got[STEPS][key] == pytest.approx(want[STEPS][key]) and 0 < want[STEPS][key] < 1
    # a different data position would give clearly different losses on these documents
    assert any(abs(want[it]["lm_loss"] - want[it + 1]["lm_loss"]) > 1e-3 for it in range(5, 10))
