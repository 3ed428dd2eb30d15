"""mosaicml-streaming's shared-memory prefix, chosen once per node and robust against SIGKILLed runs.

Every `StreamingDataset` keeps its state in POSIX shared memory named `/dev/shm/<prefix:06>_<name>` (and
file locks `<TMPDIR>/<prefix:06>_{barrier,cache}_filelock`), under the lowest prefix that no segment or
lock uses. In streaming 0.13 *every* local rank scans `/dev/shm` for that prefix on its own, and only the
local leader then registers it (`<prefix>_locals`); the others open what they guessed. When segments
appear or vanish between the ranks' scans — a killed generation's resource tracker unlinking them, an
earlier generation's rank still exiting, another run starting — the ranks guess different prefixes and
the run dies at start-up ("shared memory registered does not match local leader", "prefix=8 was not
registered by local leader", "File exists: '/000007_locals'"). A run killed by a signal also leaves its
segments and locks behind, which move every later prefix up (and, for a remote dataset, make the next run
on the same cache directory fail with "Reused local directory").

`get_shm_prefix` below replaces streaming's (`install()` patches the name `streaming.base.dataset` calls):
- only the local leader scans, under a host-wide lock, after removing the segments and locks of *dead*
  prefixes: those that no live process maps or holds open (`/proc/*/maps`, `/proc/*/fd`) and that were
  created over `MIN_AGE_S` before the scan (a live creator maps its segment within microseconds of creating
  it, so a live prefix cannot look dead). Live runs' segments, ours or anyone's, are never touched — unlike
  streaming's `clean_stale_shared_memory()`, which wipes every prefix on the machine;
- the leader registers the prefix (trying the next one if another run claimed it first) and sends it to
  the other local ranks over torch.distributed; they open exactly that one;
- at a clean exit the leader also removes its prefix's lock files (streaming unlinks the segments itself).
"""
from __future__ import annotations

import atexit
import fcntl
import os
import re
import time
from tempfile import gettempdir

SHM_DIR = "/dev/shm"
HOST_LOCK = os.path.join(SHM_DIR, "latentlm_streaming_prefix.lock")  # /dev/shm is host-wide; TMPDIR may not be
MIN_AGE_S = 1.0
CLAIM_TIMEOUT_S = 30.0

_gloo_group = None


def _streaming_names():
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

    return list(SHM_TO_CLEAN), [BARRIER_FILELOCK, CACHE_FILELOCK]


def paths_in_use() -> set[str]:
    """Every file that a live process on this host maps or holds open (processes we may not read are skipped:
    they belong to other users, who cannot open our 0600 segments)."""
    used = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find("/")
                    if i >= 0:
                        used.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
            fd_dir = f"/proc/{pid}/fd"
            for fd in os.listdir(fd_dir):
                try:
                    used.add(os.readlink(os.path.join(fd_dir, fd)))
                except OSError:
                    pass
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return used


def files_by_prefix(lock_dir: str) -> dict[int, list[str]]:
    """Streaming's segments in /dev/shm and its lock files in `lock_dir`, grouped by prefix."""
    shm_names, lock_names = _streaming_names()
    groups: dict[int, list[str]] = {}
    for folder, names in ((SHM_DIR, shm_names), (lock_dir, lock_names)):
        pattern = re.compile(r"(\d{6})_(%s)" % "|".join(map(re.escape, names)))
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            continue
        for entry in entries:
            m = pattern.fullmatch(entry)
            if m:
                groups.setdefault(int(m.group(1)), []).append(os.path.join(folder, entry))
    return groups


def remove_dead_prefixes(lock_dir: str | None = None, min_age_s: float = MIN_AGE_S) -> list[int]:
    """Unlink the segments and lock files of every prefix that no live process uses; returns those prefixes."""
    lock_dir = lock_dir or gettempdir()
    scan_start = time.time()
    groups = files_by_prefix(lock_dir)
    if not groups:
        return []
    used = paths_in_use()
    removed = []
    for prefix, paths in sorted(groups.items()):
        if any(p in used for p in paths):
            continue
        try:
            stats = {p: os.stat(p) for p in paths}
        except FileNotFoundError:
            continue  # changing right now: leave it to the next scan
        if any(s.st_ctime > scan_start - min_age_s or s.st_uid != os.geteuid() for s in stats.values()):
            continue
        for p, s in stats.items():
            try:
                if os.stat(p).st_ino == s.st_ino:
                    os.unlink(p)
            except (FileNotFoundError, PermissionError):
                pass
        removed.append(prefix)
    return removed


def first_free_prefix(streams_local: list[str], streams_remote: list, lock_dir: str) -> int:
    """The lowest prefix with no segment and no lock file; ValueError if a registered prefix has one of our
    remote streams' cache directories. Streaming's own scan attaches to every segment it passes and keeps
    them open until exit, which pins every prefix a process ever saw as in use; this one only reads files."""
    from streaming.base.shared.prefix import _unpack_locals

    shm_names, lock_names = _streaming_names()
    for prefix in range(10**6):
        if any(os.path.exists(os.path.join(lock_dir, f"{prefix:06}_{n}")) for n in lock_names):
            continue
        present = [n for n in shm_names if os.path.exists(os.path.join(SHM_DIR, f"{prefix:06}_{n}"))]
        if not present:
            return prefix
        if "locals" in present and any(streams_remote):
            try:
                with open(os.path.join(SHM_DIR, f"{prefix:06}_locals"), "rb") as f:
                    their_locals, _ = _unpack_locals(f.read())
            except Exception:  # unreadable or half-written: taken, whatever it holds
                continue
            reused = [loc for loc, remote in zip(streams_local, streams_remote) if remote and loc in their_locals]
            if reused:
                raise ValueError(f"cache directories {reused} are in use by another live run (shared-memory prefix "
                                 f"{prefix}); give this run another cache directory")
    raise RuntimeError(f"no free streaming shared-memory prefix in {SHM_DIR}")


def _claim_prefix(streams_local: list[str], streams_remote: list) -> tuple[int, object]:
    """Local leader: remove dead prefixes, then register the lowest free prefix with our locals."""
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _check_self, _get_path, _pack_locals

    _check_self(streams_local)
    deadline, last = time.monotonic() + CLAIM_TIMEOUT_S, None
    fd = os.open(HOST_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        while time.monotonic() < deadline:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                remove_dead_prefixes()
                try:
                    prefix = first_free_prefix(streams_local, streams_remote, gettempdir())
                except ValueError as e:  # our cache directory is registered by a live run (or one dying now)
                    last = e
                else:
                    data = _pack_locals(streams_local, prefix)
                    try:
                        shm = SharedMemory(_get_path(prefix, LOCALS), True, len(data))
                    except FileExistsError as e:  # a run that does not take our lock claimed it meanwhile
                        last = e
                    else:
                        shm.buf[:len(data)] = data
                        atexit.register(_remove_lock_files, prefix, gettempdir())
                        return prefix, shm
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            time.sleep(0.2)
    finally:
        os.close(fd)
    raise RuntimeError(f"no streaming shared-memory prefix for {streams_local} within {CLAIM_TIMEOUT_S:.0f} s: {last}")


def _remove_lock_files(prefix: int, lock_dir: str) -> None:
    _, lock_names = _streaming_names()
    for name in lock_names:
        try:
            os.unlink(os.path.join(lock_dir, f"{prefix:06}_{name}"))
        except OSError:
            pass


def _group():
    """A gloo group for the small exchange (the default one when it is gloo already), made once."""
    global _gloo_group
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if _gloo_group is None:
        _gloo_group = dist.new_group(backend="gloo")
    return _gloo_group


def get_shm_prefix(streams_local, streams_remote, world, retry: int = 100):
    """Drop-in for `streaming.base.shared.prefix.get_shm_prefix`: (prefix, our `<prefix>_locals` segment)."""
    import torch.distributed as dist
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed and world.ranks_per_node > 1:  # ranks with no channel between them: streaming's own way
        from streaming.base.shared.prefix import get_shm_prefix as streaming_get_shm_prefix

        return streaming_get_shm_prefix(streams_local, streams_remote, world, retry)
    claimed, error = None, None
    if world.is_local_leader:
        try:
            claimed = _claim_prefix(streams_local, streams_remote)
        except Exception as e:  # every rank raises it below, instead of the others waiting forever
            error = f"{type(e).__name__}: {e}"
    if not distributed:
        if error:
            raise RuntimeError(error)
        return claimed
    leaders = [None] * dist.get_world_size()
    dist.all_gather_object(leaders, (world.node, world.is_local_leader, claimed and claimed[0], error),
                           group=_group())
    node_leader = next((x for x in leaders if x[0] == world.node and x[1]), None)
    if node_leader is None:
        raise RuntimeError(f"no local leader on node {world.node} among {leaders}")
    if node_leader[3]:
        raise RuntimeError(f"streaming's local leader on node {world.node} found no shared-memory prefix: "
                           f"{node_leader[3]}")
    if world.is_local_leader:
        return claimed
    prefix = node_leader[2]
    shm = SharedMemory(_get_path(prefix, LOCALS), False)
    their_locals, their_prefix = _unpack_locals(bytes(shm.buf))
    if their_locals != list(streams_local) or their_prefix != prefix:
        raise RuntimeError(f"shared memory prefix {prefix} holds {their_locals} (prefix {their_prefix}), "
                           f"the local leader registered {streams_local}: do all local ranks read the same data?")
    return prefix, shm


def install() -> None:
    """Make `StreamingDataset` take its prefix from `get_shm_prefix` above. Idempotent."""
    import streaming.base.dataset as streaming_dataset

    streaming_dataset.get_shm_prefix = get_shm_prefix
