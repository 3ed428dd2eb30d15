import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: Path, nproc: int, args: list[str], tmp_path: Path, timeout: int = 900) -> str:
    """Run `script` under torchrun with `nproc` CPU processes (gloo); TMPDIR is private to the test
    and the whole process group is killed on timeout. Returns the combined output; raises on failure."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(script), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{script.name} timed out after {timeout}s:\n{out[-5000:]}")
    if proc.returncode != 0:
        raise AssertionError(f"{script.name} failed with exit code {proc.returncode}:\n{out[-8000:]}")
    return out


@pytest.fixture
def torchrun():
    return run_torchrun
