"""Ranks die with their launcher.

torchrun starts every worker in a session of its own, so a SIGKILL to the torchrun agent (an operator's
`kill -9`, the OOM killer) used to leave the ranks training on, publishing checkpoints into a directory
that the next launch also writes. `die_with_launcher()` ties a rank to its parent:

- `prctl(PR_SET_PDEATHSIG, SIGKILL)` (Linux): the kernel kills the rank the moment its parent exits,
  even while the rank is blocked in a collective or in a long kernel;
- every process the rank forks afterwards (data-loader workers) is armed the same way, and
  `die_with_parent` is the initializer for spawned helpers (megatron's checkpoint-writer Manager),
  so nothing of a dead rank lingers;
- a watchdog thread polls the parent pid (where prctl is missing, or when the parent died before the
  signal was armed) and, when it changes, kills the rank's descendants and exits.

`launcher_alive()` is what a checkpoint publisher asks before its atomic renames: a rank whose launcher
is gone never publishes (a half-written `iter_N.tmp` is debris the next run deletes).
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.5  # the watchdog thread's period: the bound when prctl is unavailable

_launcher_pid: int | None = None  # the parent this process was armed against
_started = False


class LauncherGone(RuntimeError):
    """The process's launcher has exited: this process must not publish anything."""


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """Arm SIGKILL on the death of this process's parent: for helper processes (a multiprocessing
    initializer). Exits at once if the parent is already gone."""
    parent = os.getppid()
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # died before the signal was armed (the launcher may be pid 1: containers)
        os._exit(1)


def _arm_forked_child() -> None:
    global _launcher_pid, _started
    _launcher_pid, _started = os.getppid(), False
    _set_parent_death_signal(signal.SIGKILL)


def _kill_descendants() -> None:
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def _watch(parent: int) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_SECONDS):
        if os.getppid() != parent:
            print(f"[pid {os.getpid()}] launcher (pid {parent}) is gone: exiting without publishing",
                  file=sys.stderr, flush=True)
            _kill_descendants()
            os._exit(1)


def under_launcher() -> bool:
    """Started by torchrun (its agent sets TORCHELASTIC_RUN_ID) or as a task of an srun step."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_STEP_ID" in os.environ


def die_with_launcher() -> int | None:
    """Tie this rank to its launcher (its parent process). Idempotent; returns the launcher's pid.
    A process started directly (`python pretrain/...`, `nohup`) is left alone: its parent is a shell."""
    global _launcher_pid, _started
    if _started or not under_launcher():
        return _launcher_pid
    _launcher_pid = os.getppid()
    if not _set_parent_death_signal(signal.SIGKILL):
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable: relying on the %.1f s parent watchdog", POLL_SECONDS)
    if os.getppid() != _launcher_pid:  # the parent died between getppid and prctl
        os._exit(1)
    os.register_at_fork(after_in_child=_arm_forked_child)
    threading.Thread(target=_watch, args=(_launcher_pid,), name="launcher-watchdog", daemon=True).start()
    _started = True
    return _launcher_pid


def launcher_alive() -> bool:
    """False once the launcher this process was armed against has exited (True when never armed)."""
    return _launcher_pid is None or os.getppid() == _launcher_pid


def check_launcher() -> None:
    """Raise LauncherGone when the launcher has exited: call before publishing a checkpoint."""
    if not launcher_alive():
        raise LauncherGone(f"launcher pid {_launcher_pid} has exited: not publishing")
