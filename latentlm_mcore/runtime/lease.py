"""One writer per output directory: an exclusive lease on `--save` (pretraining), `--out-dir` (σ-VAE)
or a preprocessing part.

The lease is `<dir>/LEASE`: a file held under `flock(LOCK_EX)` for the life of the run, holding JSON
{host, pid, started, argv}; a heartbeat thread touches its mtime every `HEARTBEAT_SECONDS`. A second
launch finds the lock taken and refuses with `LeaseHeld` naming the holder, or waits up to `wait`
seconds for it. A lease is stale, and taken over with a warning, when its holder is dead on this host
(a forked child that inherited the lock can keep it held for a moment) or its heartbeat is older than
`STALE_SECONDS` (a holder on another host that died where the lock was not released: NFS without a
lock manager). Taking over replaces the file, so a holder that was only stalled sees, at its next
heartbeat, that the path no longer names its file: `check()` then raises `LeaseLost` and it must not
publish anything.

Where flock is safe: local file systems; NFSv4 (flock is emulated with byte-range locks held by the
server, released when the client's lease expires); Lustre mounted with `-o flock` (not `localflock`,
which only excludes processes of one client); GPFS / Spectrum Scale; BeeGFS with
`tuneUseGlobalFileLocks`. Not NFSv3 without a running lockd (locks are then only local to each client;
the heartbeat still detects a writer on another host whose lease is older than STALE_SECONDS, not a
live one), and not `localflock` Lustre across nodes. Heartbeats compare mtimes set by the file server
with this host's clock: keep clocks within a small fraction of STALE_SECONDS (NTP does).

Multi-node runs: only global rank 0 takes the lease (ranks on other hosts trust it): the trainers
agree on the outcome with one collective so every rank stops together.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time

log = logging.getLogger(__name__)

LEASE_NAME = "LEASE"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0  # 12 missed heartbeats


class LeaseHeld(RuntimeError):
    """Another live process holds the lease."""


class LeaseLost(RuntimeError):
    """This process's lease was taken over (it was judged stale): stop writing."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(path: str) -> dict:
    """The holder info in a lease file ({} when empty, unreadable or half-written), plus its age."""
    try:
        with open(path) as f:
            info = json.loads(f.read() or "{}")
        info["heartbeat_age_s"] = time.time() - os.stat(path).st_mtime
        return info
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    if not info.get("pid"):
        return "an unknown process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return (f"pid {info['pid']} on {info.get('host', '?')} (started {started}, heartbeat "
            f"{info.get('heartbeat_age_s', float('nan')):.0f} s ago): {' '.join(info.get('argv', []))}")


class DirectoryLease:
    """`with DirectoryLease(directory, wait=0):` hold the directory's lease for the block."""

    def __init__(self, directory: str, wait: float = 0.0, name: str = LEASE_NAME):
        self.directory, self.wait = directory, wait
        self.path = os.path.join(directory, name)
        self._fd: int | None = None
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ acquire / release
    def acquire(self) -> "DirectoryLease":
        os.makedirs(self.directory, exist_ok=True)
        deadline = time.monotonic() + self.wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = read_holder(self.path)
                stale = self._stale_reason(holder)
                if stale:
                    log.warning("%s: taking over the stale lease of %s (%s)", self.path, describe(holder), stale)
                    self._break(holder)
                    continue
                if time.monotonic() >= deadline:
                    raise LeaseHeld(f"{self.directory} is being written by {describe(holder)}; refusing to write "
                                    f"into it too (lease {self.path}). Stop that run, or wait for it (--lease-wait "
                                    f"SECONDS); if it is gone, its lease goes stale {STALE_SECONDS:.0f} s after its "
                                    f"last heartbeat.")
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            if os.fstat(fd).st_ino != self._inode_at_path():  # replaced while we locked it: retry
                os.close(fd)
                continue
            previous = read_holder(self.path)
            if previous.get("pid"):
                log.warning("%s: previous holder %s ended without releasing its lease; taking it over",
                            self.path, describe(previous))
            self._fd = fd
            self._write_info()
            self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
            self._thread.start()
            return self

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._lost and os.fstat(self._fd).st_ino == self._inode_at_path():
            os.ftruncate(self._fd, 0)  # empty: released cleanly (the next holder logs no takeover)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    # ------------------------------------------------------------ while held
    def check(self) -> None:
        """Raise LeaseLost unless this process still holds the lease: call before publishing."""
        if self._fd is None or self._lost or os.fstat(self._fd).st_ino != self._inode_at_path():
            self._lost = True
            raise LeaseLost(f"{self.path}: this process's lease was taken over by {describe(read_holder(self.path))}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.check()
                os.utime(self.path)
            except LeaseLost as e:
                log.error("%s", e)
                return

    # ------------------------------------------------------------ internals
    def _inode_at_path(self) -> int | None:
        try:
            return os.stat(self.path).st_ino
        except FileNotFoundError:
            return None

    def _write_info(self) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "argv": sys.argv}
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    @staticmethod
    def _stale_reason(holder: dict) -> str | None:
        if holder.get("host") == socket.gethostname() and holder.get("pid") and not _pid_alive(holder["pid"]):
            return "its process is dead"
        if holder.get("heartbeat_age_s", 0) > STALE_SECONDS:
            return f"no heartbeat for {holder['heartbeat_age_s']:.0f} s"
        return None

    def _break(self, holder: dict) -> None:
        """Unlink the stale file (a forked orphan may still hold its lock), so a fresh one can be locked."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def lease_on_rank0(directory: str, wait: float = 0.0) -> DirectoryLease | None:
    """The lease on `directory` for a distributed run: rank 0 takes it, and every rank of the default process
    group (when one is up) learns the outcome from one all-reduce, so all refuse together instead of rank 0
    alone. Returns the lease on rank 0, None elsewhere; raises LeaseHeld (rank 0: its own error) on refusal."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    lease, error = None, None
    if not distributed or dist.get_rank() == 0:
        try:
            lease = DirectoryLease(directory, wait=wait).acquire()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
            error = e
    if distributed:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        ok = torch.tensor([0.0 if error else 1.0], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if error is None and not ok.item():
            raise LeaseHeld(f"{directory}: rank 0 could not take the directory's lease (see its error)")
    if error is not None:
        raise error
    return lease


def check_may_publish(lease: DirectoryLease | None) -> None:
    """Raise instead of publishing a checkpoint when this rank's launcher died or the lease was taken over."""
    from latentlm_mcore.runtime.watchdog import check_launcher

    check_launcher()
    if lease is not None:
        lease.check()
