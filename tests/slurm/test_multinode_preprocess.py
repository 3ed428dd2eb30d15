"""Issue 15 item 5: slurm/preprocess_interleaved.sh across hosts, on the 3-node Slurm of tests/slurm/conftest.py.

The array of 6 parts runs one task per node at a time (each task asks for a node's 4 CPUs) over node1..node3;
task 1 is SIGKILLed while it encodes, so the merge job (afterok) is cancelled; the same command run again
skips the 5 finished parts, redoes part 1 and merges. The dataset equals, byte for byte, the one the same
6-part split gives when every part is written in one process on one host: the parts are split the same
way (line k, k+6, ... of the input), so every shard holds the same documents in the same order, and the
σ-VAE encodes the same batches with one thread (OMP_NUM_THREADS=1) in both. (A 1-part run orders the
documents differently, so its shards differ; its decoded samples are the same documents.)"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from latentlm_mcore.data.schema import part_name
from tests.conftest import REPO
from tests.slurm.commands import sh

pytestmark = pytest.mark.slow  # over ~15 s: outside the fast tier (-m "not slow")

PARTS, KILLED = 6, 1


def raw_input(tiny_dataset: Path, tmp_path: Path) -> Path:
    """The tiny dataset's raw documents four times over (new ids): enough work that a task runs a few seconds."""
    lines = (tiny_dataset.parent / "raw.jsonl").read_text().splitlines()
    docs = [dict(json.loads(line), id=f"{json.loads(line)['id']}-copy{c}") for c in range(4) for line in lines]
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def submit(env) -> tuple[str, str]:
    out = sh(env, "bash", str(REPO / "slurm/preprocess_interleaved.sh"))
    words = out.split()  # submitted array job A (6 parts) and merge job M -> OUTPUT
    return words[words.index("array") + 2], words[words.index("merge") + 2]


def part_processes(output: Path, part: int) -> list[psutil.Process]:
    """The array task writing `part` (the nodes share the host's pid namespace)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(a.endswith("preprocess_interleaved.py") for a in cmd) and str(output) in cmd \
                and "--shard-index" in cmd and cmd[cmd.index("--shard-index") + 1] == str(part):
            found.append(proc)
    return found


def stop(procs: list[psutil.Process]) -> None:
    """SIGSTOP, and wait until they have stopped (delivery is asynchronous): only then look at their files."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGSTOP)
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(p) for p in procs):
        time.sleep(0.001)


def resume(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGCONT)


def _running(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
    return False


def freeze_mid_part(output: Path, part: int, queued, start: float, hosts: set) -> None:
    """Leave the task of `part` SIGSTOPped while it reads documents and encodes (its `.rejects.jsonl.tmp`
    exists). It runs in 50 ms slices and is only looked at while stopped: a part this small lives a
    second or less, so watching the file of a running task missed it (seen in CI)."""
    victim = output / "parts" / f"{part_name(part, PARTS)}.rejects.jsonl.tmp"
    done = output / "parts" / f"{part_name(part, PARTS)}.json"
    procs, looked = [], 0.0
    while True:
        assert time.time() - start < 300, f"task {part} not seen mid-way in 300 s: {queued()!r}"
        if time.time() - looked > 0.5:  # not at every slice: a Slurm client call takes a while
            state, looked = queued(), time.time()
            hosts |= running_on(state)
            assert state or procs, f"the jobs left the queue before task {part} was seen: {slurm_logs(output)}"
        procs = procs or part_processes(output, part)
        if not procs:
            time.sleep(0.05)
            continue
        stop(procs)
        if victim.exists():
            return
        assert not done.exists(), f"part {part} finished within one 50 ms slice"
        resume(procs)
        time.sleep(0.05)


def running_on(squeue: str) -> set[str]:
    """The nodes of the RUNNING lines of `squeue -o "%i %T %N"` (a task just started may not name one yet)."""
    return {w[2] for w in map(str.split, squeue.splitlines()) if len(w) == 3 and w[1] == "RUNNING"}


def slurm_logs(output: Path) -> dict:
    """The tail of each Slurm log of the run, for a failure message."""
    return {p.name: p.read_text()[-2000:] for p in sorted((output / "slurm").glob("*.out"))}


def files(folder: Path) -> dict:
    """Every file of a dataset but the parts' own records (timings) and leases, and the Slurm logs."""
    skip = lambda p: p.parts[0] == "slurm" or (p.parts[0] == "parts" and not p.name.endswith(".rejects.jsonl"))  # noqa: E731
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not skip(p.relative_to(folder))}


def test_preprocessing_array_over_three_hosts_with_a_killed_task_gives_the_one_host_dataset(
        multinode_cluster, tiny_dataset, tmp_path, record_seconds):
    cluster, root = multinode_cluster, tiny_dataset.parent
    raw, output = raw_input(tiny_dataset, tmp_path), tmp_path / "mds"
    env = dict(cluster.env, INPUT=str(raw), IMAGE_ROOT=str(root / "images"), VAE=str(root / "vae.pt"),
               OUTPUT=str(output), NUM_SHARDS=str(PARTS), GPUS_PER_TASK="0", CPUS_PER_TASK="4", TIME="10",
               PYTHON=sys.executable, TMPDIR="/var/tmp", OMP_NUM_THREADS="1")
    queued = lambda *jobs: sh(env, "squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i %T %N")  # noqa: E731
    start = time.time()
    array, merge = submit(env)
    hosts = set()
    try:
        freeze_mid_part(output, KILLED, lambda: queued(array, merge), start, hosts)
        # Frozen first: scancel's SIGKILL travels slurmctld -> slurmd and can arrive after a task this
        # small has finished (seen in CI). A stopped process still dies of SIGKILL.
        sh(env, "scancel", "--full", "--signal=KILL", f"{array}_{KILLED}")
        while queued(array, merge):
            assert time.time() - start < 600, queued(array, merge)
            hosts |= running_on(queued(array))
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", array, merge], env=env, capture_output=True)
    finished = sorted(p.name for p in (output / "parts").glob("part-*-of-*.json"))
    assert finished == [f"{part_name(i, PARTS)}.json" for i in range(PARTS) if i != KILLED], "task 1 was not killed mid-way"
    assert not (output / "manifest.json").exists(), "the merge must not run after a failed task"
    assert len(hosts) == 3, f"the array ran on {sorted(hosts)} only"

    records = [output / "parts" / name for name in finished]
    finished_at = {p.name: p.stat().st_mtime_ns for p in records}
    again = time.time()
    array, merge = submit(env)  # the same command: finished parts are skipped
    try:
        while queued(array, merge):
            assert time.time() - again < 600, queued(array, merge)
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", array, merge], env=env, capture_output=True)
    wall = time.time() - start
    manifest = json.loads((output / "manifest.json").read_text())
    tiny = json.loads((tiny_dataset / "manifest.json").read_text())
    assert manifest["num_parts"] == PARTS
    assert sum(manifest["documents_written"].values()) == 4 * sum(tiny["documents_written"].values())
    redone = json.loads((output / "parts" / f"{part_name(KILLED, PARTS)}.json").read_text())
    logs = {p.name: p.read_text() for p in (output / "slurm").glob("preprocess-*.out")}
    assert sum(f"{part_name(KILLED, PARTS)}: written" in text for text in logs.values()) == 1  # the redo only
    assert sum(": written" in text for text in logs.values()) == PARTS + PARTS - 1  # 5, then 6 (5 of them skipped)
    assert redone["documents_written"]
    assert {p.name: p.stat().st_mtime_ns for p in records} == finished_at, "finished parts must not be redone"

    # the one-host run: the same 6 parts written one after another in one process, then merged
    one_host = tmp_path / "one-host"
    script = ("import sys; from latentlm_mcore.data.prep.preprocess import PreprocessConfig, preprocess_part, merge_parts\n"
              f"for k in range({PARTS}):\n"
              f"    preprocess_part(PreprocessConfig(inputs=[{str(raw)!r}], output={str(one_host)!r}, "
              f"image_root={str(root / 'images')!r}, vae_checkpoint={str(root / 'vae.pt')!r}, num_shards={PARTS}, "
              f"shard_index=k, device='cpu', progress=False))\n"
              f"merge_parts({str(one_host)!r}, {PARTS})\n")
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=600,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    got, want = files(output), files(one_host)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == [], "the dataset differs from the one-host run"
    assert any(name.endswith(".mds.zstd") for name in want) and "manifest.json" in want
    record_seconds("preprocess_array_3_nodes_kill_and_rerun", wall)
    print(f"preprocessing: 6 parts on {sorted(hosts)}, part {KILLED} killed and redone, merged in {wall:.0f}s; "
          f"{len(want)} files byte-identical to the one-host run")
