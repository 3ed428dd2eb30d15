"""Slurm client calls for the launcher tests: `sh` runs one and returns its output, `wait` polls a condition,
`job_fields` reads `scontrol show job`."""
import subprocess
import time
from pathlib import Path

CLIENT_TRIES = 3  # a client that a signal killed is retried this often before the test fails on it


def sh(env, *cmd) -> str:
    """Run a Slurm client; fails naming the command and its output. A client killed by a signal (CI saw squeue
    die of SIGPIPE while the controller and munged were busy with a finishing job) is retried: polling the
    queue again is what a user's watch loop does, and a real error (non-zero exit) still fails at once."""
    for attempt in range(CLIENT_TRIES):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        if out.returncode >= 0:
            break
        time.sleep(1 + attempt)
    assert out.returncode == 0, f"{' '.join(cmd)} (exit {out.returncode}): {out.stdout}{out.stderr}"
    return out.stdout.strip()


def wait(condition, what: str, log: Path, timeout=600):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; job output:\n{log.read_text()[-4000:] if log.exists() else ''}")


def job_fields(env, job_id) -> list[dict]:
    """`scontrol show job` of one job (or of every task of an array) as one dict per job."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", str(job_id)], env=env, capture_output=True,
                         text=True, timeout=30).stdout
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]
