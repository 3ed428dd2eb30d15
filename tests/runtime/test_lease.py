"""runtime/lease.py with real processes: a live holder is refused by name, a waiter gets the lease when
it is released, a SIGKILLed holder's lease (also one still locked by its forked orphan) and a lease
whose heartbeat stopped are taken over and logged, and the stalled holder then learns it lost it."""
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from latentlm_mcore.runtime import lease as lease_mod
from latentlm_mcore.runtime.lease import DirectoryLease, LeaseHeld, LeaseLost
from tests.conftest import REPO

HOLDER = r"""
import os, sys, time
from latentlm_mcore.runtime.lease import DirectoryLease, LeaseLost
lease = DirectoryLease(sys.argv[1], name=sys.argv[3]).acquire()
if sys.argv[2] == "fork" and os.fork() == 0:  # a child that inherits the locked descriptor
    time.sleep(120)
    os._exit(0)
print("held", flush=True)
command = sys.stdin.readline().strip()
if command == "check":
    try:
        lease.check()
        print("still held", flush=True)
    except LeaseLost as e:
        print(f"lost: {e}", flush=True)
elif command.startswith("sleep"):
    time.sleep(float(command.split()[1]))
lease.release()
"""


def start_holder(directory, mode="plain", name="LEASE"):
    """A process holding the lease on `directory` (the file `name`) until it reads a line on stdin."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), mode, name], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    return proc


def snapshot(directory):
    return {p: (os.stat(os.path.join(directory, p)).st_mtime_ns, open(os.path.join(directory, p), "rb").read())
            for p in sorted(os.listdir(directory))}


def test_a_live_holder_is_refused_by_name_and_nothing_changes(tmp_path):
    holder = start_holder(tmp_path)
    try:
        before = snapshot(tmp_path)
        with pytest.raises(LeaseHeld, match=rf"pid {holder.pid} on {os.uname().nodename}"):
            DirectoryLease(str(tmp_path)).acquire()
        assert snapshot(tmp_path) == before
        info = json.loads((tmp_path / "LEASE").read_text())
        assert info["pid"] == holder.pid and info["host"] == os.uname().nodename and info["started"] <= time.time()
    finally:
        holder.communicate("\n", timeout=30)


def test_a_waiter_gets_the_lease_once_it_is_released(tmp_path, caplog):
    holder = start_holder(tmp_path)
    holder.stdin.write("sleep 1\n")
    holder.stdin.flush()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), DirectoryLease(str(tmp_path), wait=60) as lease:
        assert holder.wait(timeout=30) == 0
        assert time.monotonic() - start >= 0.5, "it must have waited for the holder"
        assert json.loads((tmp_path / "LEASE").read_text())["pid"] == os.getpid()
        lease.check()
    assert "taking" not in caplog.text, "a released lease is not a takeover"
    assert (tmp_path / "LEASE").read_text() == "", "a clean release empties the file"


@pytest.mark.parametrize("mode", ["plain", "fork"])
def test_a_killed_holders_lease_is_taken_over_and_logged(tmp_path, caplog, mode):
    holder = start_holder(tmp_path, mode)
    orphans = []
    if mode == "fork":
        import psutil
        orphans = psutil.Process(holder.pid).children()
        assert orphans, "the holder's forked child must be running"
    holder.kill()
    holder.wait()
    try:
        with caplog.at_level(logging.WARNING), DirectoryLease(str(tmp_path)) as lease:
            lease.check()
            assert json.loads((tmp_path / "LEASE").read_text())["pid"] == os.getpid()
        assert f"pid {holder.pid}" in caplog.text and "taking" in caplog.text
        if mode == "fork":  # the orphan still locks the old file: it was replaced, not waited for
            assert "its process is dead" in caplog.text
    finally:
        for p in orphans:
            p.kill()


def test_a_stale_heartbeat_is_taken_over_and_the_stalled_holder_learns_it(tmp_path, caplog):
    holder = start_holder(tmp_path)
    try:
        old = time.time() - lease_mod.STALE_SECONDS - 60
        os.utime(tmp_path / "LEASE", (old, old))  # as if its heartbeat had stopped two minutes ago
        with caplog.at_level(logging.WARNING), DirectoryLease(str(tmp_path)) as lease:
            assert "no heartbeat for" in caplog.text and f"pid {holder.pid}" in caplog.text
            out, _ = holder.communicate("check\n", timeout=30)
            assert out.startswith(f"lost: {tmp_path / 'LEASE'}") and f"pid {os.getpid()}" in out
            lease.check()
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_lease_that_is_taken_over_refuses_to_publish(tmp_path):
    lease = DirectoryLease(str(tmp_path)).acquire()
    os.unlink(tmp_path / "LEASE")
    taker = DirectoryLease(str(tmp_path)).acquire()  # what a takeover does: a new file at the path, locked
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()
    taker.check()
    taker.release()
