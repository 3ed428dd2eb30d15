"""runtime/watchdog.py with real processes: a rank started in a session of its own (as torchrun starts
its workers) dies with its launcher, and so do the processes it forked and its spawned Manager; without
prctl the watchdog thread does the same within its poll period."""
import os
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO

RANK = r"""
import os, sys, time
from multiprocessing import get_context
from multiprocessing.managers import SyncManager
from latentlm_mcore.runtime import watchdog
if sys.argv[1] == "no-prctl":
    watchdog._set_parent_death_signal = lambda sig: False
watchdog.die_with_launcher()
if os.fork() == 0:  # a data-loader worker
    time.sleep(300)
    os._exit(0)
manager = SyncManager(ctx=get_context("spawn"))
manager.start(initializer=watchdog.die_with_parent)
queue = manager.Queue()
print("ready", flush=True)
time.sleep(300)
"""

LAUNCHER = r"""
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True,
                        stdout=sys.stdout, stderr=sys.stderr)
print(rank.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("mode", ["prctl", "no-prctl"])
def test_a_rank_and_its_helpers_die_with_the_launcher(mode):
    env = dict(os.environ, TORCHELASTIC_RUN_ID="test")  # as torchrun's agent sets it
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, mode], cwd=REPO, text=True, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rank = psutil.Process(int(launcher.stdout.readline()))
    assert launcher.stdout.readline().strip() == "ready"
    everyone = [rank] + rank.children(recursive=True)
    assert len(everyone) >= 3, "rank, forked worker, Manager"
    try:
        launcher.kill()
        launcher.wait()
        killed = time.monotonic()
        gone, alive = psutil.wait_procs(everyone, timeout=30)
        elapsed = time.monotonic() - killed
        assert not alive, f"still running {elapsed:.1f} s after the launcher died: {alive}"
        print(f"{mode}: every process gone {elapsed:.2f} s after the launcher died")
        if mode == "no-prctl":
            assert "launcher (pid" in launcher.stderr.read()
    finally:
        for p in everyone:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_a_process_started_directly_is_left_alone():
    """`python pretrain/...` (or under nohup) has a shell for a parent: its exit must not stop training."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "SLURM_STEP_ID")}
    out = subprocess.run([sys.executable, "-c", "from latentlm_mcore.runtime import watchdog; "
                          "print(watchdog.die_with_launcher(), watchdog.launcher_alive())"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["None", "True"], out.stderr
