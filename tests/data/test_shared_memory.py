"""Streaming's shared-memory prefix (latentlm_mcore/data/shared_memory.py), with real StreamingDatasets in real
processes (2 local ranks over gloo, as torchrun starts them): segments that appear and vanish while the ranks
start up (generations starting and dying) no longer make the run fail; a SIGKILLed run's segments and locks are removed
by the next run while a concurrently live run's stay untouched and keep working; a clean exit leaves nothing."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from latentlm_mcore.data import shared_memory
from tests.conftest import free_port

RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch.distributed as dist
    from latentlm_mcore.data.streaming_compat import import_streaming

    dataset, ctl, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    distributed = int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    streaming = import_streaming()
    (ctl / f"{name}.building").touch()
    built = [streaming.StreamingDataset(streams=[streaming.Stream(local=dataset)], batch_size=1,
                                        num_canonical_nodes=1) for _ in range(int(os.environ.get("BUILDS", 1)))]
    ds = built[-1]
    ds[0]
    (ctl / f"{name}.prefix").write_text(" ".join(str(d._shm_prefix_int) for d in built))
    while os.environ.get("HOLD") and not (ctl / f"{name}.exit").exists():
        time.sleep(0.05)
    ds[len(ds) - 1]
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    print("ok", name, flush=True)
""")


def start(tmp_path, dataset, name, rank=0, world=1, port=0, **env):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", **env)
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, str(script), str(dataset), str(tmp_path), name], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_file(path: Path, procs, timeout=300):
    end = time.time() + timeout
    while not path.exists():
        failed = [p for p in procs if p.poll() is not None and p.returncode != 0]
        assert not failed and time.time() < end, f"waiting for {path.name}: " + "".join(
            (path.parent / f"{n}.log").read_text() for n in ("holder", "rank0", "rank1", "dead")
            if (path.parent / f"{n}.log").exists())
        time.sleep(0.05)


def finish(proc, tmp_path, name, timeout=300):
    assert proc.wait(timeout=timeout) == 0, (tmp_path / f"{name}.log").read_text()


def segments(prefix: int) -> dict:
    """/dev/shm segments of a prefix: name -> inode."""
    return {p.name: p.stat().st_ino for p in Path(shared_memory.SHM_DIR).glob(f"{prefix:06}_*")}


def two_ranks(tmp_path, dataset, **env):
    port = free_port()
    return [start(tmp_path, dataset, "rank0", 0, 2, port, **env), start(tmp_path, dataset, "rank1", 1, 2, port, **env)]


@pytest.fixture
def dataset(tiny_dataset):
    return tiny_dataset / "text"


CHURN_SCRIPT = textwrap.dedent("""
    import os, random, sys, time
    from multiprocessing.shared_memory import SharedMemory
    from streaming.base.constant import SHM_TO_CLEAN

    # Runs that start and die at the lowest free prefix, as generations relaunched after SIGKILLs do. Like a real
    # run, one owns a prefix by creating its `_locals` first: a prefix whose `_locals` appeared since the scan is
    # someone else's (the run under test), and planting segments there would be a bug no real run has.
    stop = sys.argv[1]
    while not os.path.exists(stop):
        prefix = next(p for p in range(10**6) if not os.path.exists(f"/dev/shm/{p:06}_locals"))
        try:
            made = [SharedMemory(f"{prefix:06}_locals", True, 8)]
        except FileExistsError:
            continue
        for name in SHM_TO_CLEAN:
            if name == "locals":
                continue
            try:
                made.append(SharedMemory(f"{prefix:06}_{name}", True, 8))
            except FileExistsError:
                pass
        time.sleep(random.random() * 0.003)
        for shm in made:
            shm.close()
            shm.unlink()
        time.sleep(random.random() * 0.003)
""")


@pytest.mark.slow
def test_segments_that_come_and_go_during_start_up_do_not_fail_the_run(dataset, tmp_path):
    # Streaming's own scan has each local rank guess the prefix; with segments appearing and vanishing meanwhile,
    # rank 1 guesses another one than its leader registered and the run dies ("does not match local leader").
    (tmp_path / "churn.py").write_text(CHURN_SCRIPT)
    churn = subprocess.Popen([sys.executable, str(tmp_path / "churn.py"), str(tmp_path / "churn.stop")],
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        ranks = two_ranks(tmp_path, dataset, BUILDS="30")
        for name, proc in zip(("rank0", "rank1"), ranks):
            finish(proc, tmp_path, name)
    finally:
        (tmp_path / "churn.stop").touch()
        churn.wait(timeout=60)
    assert (tmp_path / "rank0.prefix").read_text() == (tmp_path / "rank1.prefix").read_text()


@pytest.mark.slow
def test_a_killed_runs_segments_go_and_a_live_runs_stay(dataset, tmp_path):
    live = start(tmp_path, dataset, "holder", HOLD="1")
    procs = [live]
    try:
        wait_file(tmp_path / "holder.prefix", [live])
        live_prefix = int((tmp_path / "holder.prefix").read_text())
        live_segments = segments(live_prefix)
        dead = start(tmp_path, dataset, "dead", HOLD="1")
        procs.append(dead)
        wait_file(tmp_path / "dead.prefix", [dead, live])
        dead_prefix = int((tmp_path / "dead.prefix").read_text())
        dead_segments = segments(dead_prefix)
        os.killpg(dead.pid, signal.SIGKILL)  # with its resource tracker: nothing unlinks its segments
        dead.wait()
        assert segments(dead_prefix) == dead_segments
        (tmp_path / f"{dead_prefix:06}_barrier_filelock").touch()  # the lock an iterating run leaves too
        time.sleep(shared_memory.MIN_AGE_S + 0.5)

        ranks = two_ranks(tmp_path, dataset)
        procs += ranks
        for name, proc in zip(("rank0", "rank1"), ranks):
            finish(proc, tmp_path, name)
        ours = int((tmp_path / "rank0.prefix").read_text())
        assert segments(live_prefix) == live_segments, "a live run's segments are untouched"
        # The killed run's files are gone, unless a live process holds them: streaming 0.13's own scan (another
        # run on this host) attaches to every segment it passes and keeps it until it exits.
        held = shared_memory.paths_in_use()
        left = {n for n, ino in segments(dead_prefix).items() if dead_segments.get(n) == ino}
        left |= {n for n in [f"{dead_prefix:06}_barrier_filelock"] if (tmp_path / n).exists()}
        unheld = [n for n in left if f"{shared_memory.SHM_DIR}/{n}" not in held and str(tmp_path / n) not in held]
        assert not (unheld and not any(f"{shared_memory.SHM_DIR}/{n}" in held for n in left)), \
            f"the killed run's files are still there, held by nobody: {sorted(left)}"
        assert not segments(ours), "our clean exit unlinks our segments"
        assert not list(tmp_path.glob(f"{ours:06}_*_filelock")), "our clean exit removes our lock files"
        (tmp_path / "holder.exit").touch()
        finish(live, tmp_path, "holder")  # the live run still reads its dataset and exits cleanly
    finally:  # a failed assertion must not leave the holders running
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

def test_remove_dead_prefixes_spares_files_in_use_and_fresh_ones(tmp_path):
    prefix = 999_000 + os.getpid() % 999
    paths = [Path(shared_memory.SHM_DIR) / f"{prefix:06}_{n}" for n in ("locals", "barrier")]
    for p in paths:
        p.write_bytes(b"\0" * 8)
    try:
        assert prefix not in shared_memory.remove_dead_prefixes(str(tmp_path)), "created just now: may be live"
        time.sleep(shared_memory.MIN_AGE_S + 0.2)
        with open(paths[1], "rb"):  # held open by a live process (this one)
            assert prefix not in shared_memory.remove_dead_prefixes(str(tmp_path))
            assert all(p.exists() for p in paths)
        assert prefix in shared_memory.remove_dead_prefixes(str(tmp_path))
        assert not any(p.exists() for p in paths)
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
