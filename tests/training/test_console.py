"""A pretraining run's console holds the progress lines and none of the library warnings that
runtime/logs.py hides (FutureWarning from torch, megatron's "Apex"/"Transformer Engine" notes, ...)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from latentlm_mcore.runtime.logs import BENIGN_WARNINGS

pytestmark = pytest.mark.slow  # a pretraining launch plus the tiny dataset: over ~10 s, outside the fast tier

REPO = Path(__file__).resolve().parents[2]


def test_pretraining_console_has_progress_and_no_library_warnings(tiny_dataset, tmp_path):
    # Python's own filters, as a user's shell has them: FutureWarning and UserWarning print, Deprecation- and
    # ResourceWarning from libraries do not (PYTHONWARNINGS=default would show those too: not what users see)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    for key in ("PYTHONWARNINGS", "LATENTLM_VERBOSE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain" / "pretrain_latentlm.py"), "--preset", "tiny", "--data", str(tiny_dataset),
         "--save", str(tmp_path / "run"), "--train.train-steps", "2", "--train.warmup-steps", "1",
         "--train.global-batch-size", "2", "--train.micro-batch-size", "1", "--log-interval", "1",
         "--save-interval", "100", "--num-workers", "0", "--tensorboard", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "iter 2/2" in console, console[-4000:]  # the lines a user wants did reach the console
    hidden = [m for action, m, _, _ in BENIGN_WARNINGS if action == "ignore" and m and re.search(m, console)]
    assert not hidden, f"warnings runtime/logs.py hides reached the console: {hidden}"
    warning_lines = [line for line in console.splitlines() if re.search(r"\b\w*Warning\b|Apex|Transformer Engine", line)]
    assert not warning_lines, "\n".join(warning_lines[:20])
