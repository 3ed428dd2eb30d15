"""One writer per run, end to end under torchrun (TP=2 on 2 CPU processes, real shards):
(a) SIGKILL to the torchrun launcher only: every rank is gone within LAUNCHER_DEATH_BOUND_S and no
    checkpoint newer than the kill appears; (b) a second launch into a --save that a live run holds is
    refused, names the holder and changes nothing there; (c) a soak of random kills (launcher only, one
    rank only, the whole tree; during start-up, mid-step, mid-save), each followed by a plain relaunch,
    ends with the loss sequence of an uninterrupted run and no process of any earlier generation alive
    (N=3 here, N=20 in the `slow` tier that CI also runs)."""
import json
import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, kill_tree, run_torchrun, spawn_torchrun

PRETRAIN = REPO / "pretrain" / "pretrain_latentlm.py"
LAUNCHER_DEATH_BOUND_S = 30  # measured: ~1 s (README, resume section); generous for a loaded CI machine
SOAK_STEPS = 24  # kills land on the way (a mid-step kill at most 7 steps after the resumed checkpoint)
TEARDOWN_BOUND_S = 120  # one rank killed: torchrun's agent stops the others (SIGTERM, then SIGKILL after 30 s)


def args(dataset, save, steps, *extra):
    return ["--preset", "tiny", "--data", str(dataset), "--save", str(save), "--train.train-steps", steps,
            "--train.warmup-steps", 2, "--train.global-batch-size", 4, "--train.micro-batch-size", 2,
            "--parallel.tensor-parallel", 2, "--log-interval", 1, "--save-interval", 3, "--keep-last", 100,
            "--num-workers", 0, "--tensorboard", "false", *extra]


def train_losses(save: Path) -> list[tuple[int, float]]:
    with open(save / "metrics.jsonl") as f:
        return [(r["iteration"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


def iterations_done(log: Path) -> int:
    lines = log.read_text().splitlines() if log.exists() else []
    return max((int(x.split()[1].split("/")[0]) for x in lines if x.startswith("iter ")), default=0)


def latest(save: Path) -> int:
    f = save / "latest"
    return int(f.read_text().split("_")[1]) if f.exists() else 0


def published(save: Path) -> set:
    return {p.name for p in save.glob("iter_*") if not p.name.endswith(".tmp")} if save.exists() else set()


def tmp_dirs(save: Path) -> set:
    found = set()
    for p in save.glob("iter_*.tmp") if save.exists() else ():
        try:  # the trainer may publish (rename) the directory between the listing and the stat
            found.add((p.name, p.stat().st_ino))
        except FileNotFoundError:
            pass
    return found


def wait_for(condition, proc, timeout=600, poll=0.01):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False  # the launch ended (finished or failed) before the condition held
        time.sleep(poll)
    raise AssertionError("timed out waiting")


def generation(proc) -> list[psutil.Process]:
    """The launcher and every process below it, as psutil handles (safe against pid reuse)."""
    root = psutil.Process(proc.pid)
    return [root] + root.children(recursive=True)


def ranks(proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children() if str(PRETRAIN) in " ".join(p.cmdline())]


def is_gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def death_times(processes, timeout) -> dict:
    """Seconds from now until each process is gone; fails naming those still alive after `timeout`."""
    start, gone = time.monotonic(), {}
    while len(gone) < len(processes) and time.monotonic() - start < timeout:
        for p in processes:
            if p not in gone and is_gone(p):
                gone[p] = time.monotonic() - start
        time.sleep(0.01)
    alive = [p for p in processes if p not in gone]
    assert not alive, f"alive {timeout} s later: {alive}"
    return gone


def wait_gone(processes, timeout) -> float:
    start = time.monotonic()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"alive {timeout} s later: {[(p.pid, p.cmdline()[:3]) for p in alive]}"
    return time.monotonic() - start


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """Uninterrupted runs, by number of steps."""
    runs = {}

    def get(steps):
        if steps not in runs:
            tmp = tmp_path_factory.mktemp(f"uninterrupted{steps}")
            run_torchrun(PRETRAIN, 2, args(tiny_dataset, tmp / "ckpt", steps), tmp)
            runs[steps] = train_losses(tmp / "ckpt")
        return runs[steps]
    return get


@pytest.mark.slow  # launches torchrun
def test_ranks_die_with_the_launcher_and_publish_nothing_after(tiny_dataset, tmp_path):
    save = tmp_path / "ckpt"
    proc = spawn_torchrun(PRETRAIN, 2, args(tiny_dataset, save, 1000), tmp_path, tmp_path / "run.log")
    try:
        assert wait_for(lambda: latest(save) >= 3 and iterations_done(tmp_path / "run.log") >= 4, proc)
        everyone = generation(proc)
        workers = ranks(proc)
        assert len(workers) == 2
        names = ", ".join(f"{p.pid}: {' '.join(p.cmdline()[1:4])[:60]}" for p in everyone[1:])
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only
        proc.wait()
        at_kill = published(save), latest(save)
        gone = death_times(everyone[1:], LAUNCHER_DEATH_BOUND_S)
        print(f"launcher SIGKILLed: last rank gone {max(gone[w] for w in workers):.2f} s later, all "
              f"{len(gone)} processes below it {max(gone.values()):.2f} s ({names})")
        time.sleep(2)
        assert (published(save), latest(save)) == at_kill, "a checkpoint appeared after the launcher died"
    finally:
        kill_tree(proc)


@pytest.mark.slow  # launches torchrun
def test_a_second_launch_is_refused_names_the_holder_and_changes_nothing(tiny_dataset, reference, tmp_path):
    save = tmp_path / "ckpt"
    first = spawn_torchrun(PRETRAIN, 2, args(tiny_dataset, save, SOAK_STEPS), tmp_path, tmp_path / "first.log")
    stopped = []
    try:
        assert wait_for(lambda: iterations_done(tmp_path / "first.log") >= 2, first)
        stopped = generation(first)
        for p in stopped:  # freeze the first run, so that any change in the directory is the second's
            p.suspend()
        holder = json.loads((save / "LEASE").read_text())
        assert holder["pid"] in {w.pid for w in ranks(first)}
        before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in save.rglob("*")}
        second = spawn_torchrun(PRETRAIN, 2, args(tiny_dataset, save, SOAK_STEPS), tmp_path, tmp_path / "second.log")
        assert second.wait(timeout=600) != 0
        log = (tmp_path / "second.log").read_text()
        assert f"is being written by pid {holder['pid']} on {holder['host']}" in log, log[-3000:]
        assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in save.rglob("*")} == before
        for p in stopped:
            p.resume()
        stopped = []
        assert first.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()[-3000:]
        assert train_losses(save) == reference(SOAK_STEPS), "the first run goes on undisturbed"
    finally:
        for p in stopped:
            p.resume()
        kill_tree(first)


def kill_somehow(rng, proc, save, log, resumed_at) -> tuple[str, list]:
    """One random kill of one launch, waiting until all of it is gone; returns what was done (the launch
    may finish first: 'finished') and its processes."""
    how = rng.choice(["launcher", "one rank", "whole tree"])
    when = rng.choice(["start-up", "mid-step", "mid-save"])
    debris = tmp_dirs(save)
    if when == "start-up":
        end = time.time() + rng.uniform(0.5, 10)
        landed = wait_for(lambda: time.time() > end, proc)
    elif when == "mid-step":
        target = min(resumed_at + rng.randint(1, 7), SOAK_STEPS - 1)
        landed = wait_for(lambda: iterations_done(log) >= target, proc)
    else:
        landed = wait_for(lambda: iterations_done(log) > resumed_at and tmp_dirs(save) - debris, proc)
    if not landed:
        return "finished", []
    everyone = generation(proc)
    if how == "launcher":
        os.kill(proc.pid, signal.SIGKILL)
    elif how == "one rank":
        workers = ranks(proc)
        if not workers:  # still starting: no rank yet
            os.kill(proc.pid, signal.SIGKILL)
            how = "launcher (no rank yet)"
        else:
            rng.choice(workers).kill()
    else:
        kill_tree(proc)
    everyone += generation_leftovers(everyone)
    proc.wait(timeout=TEARDOWN_BOUND_S)
    wait_gone(everyone, TEARDOWN_BOUND_S)
    return f"{how} {when}", everyone


def generation_leftovers(everyone):
    """Processes started by a generation after its tree was listed (e.g. a Manager spawned at the save)."""
    more = []
    for p in everyone:
        try:
            more += p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return [p for p in more if p not in everyone]


def soak(tiny_dataset, reference, tmp_path, kills: int):
    steps = SOAK_STEPS
    save = tmp_path / "ckpt"
    rng = random.Random()
    every_generation, done = [], []
    for gen in range(kills):
        log = tmp_path / f"gen{gen}.log"
        resumed_at = latest(save)
        proc = spawn_torchrun(PRETRAIN, 2, args(tiny_dataset, save, steps), tmp_path, log)
        try:
            what, processes = kill_somehow(rng, proc, save, log, resumed_at)
            every_generation += processes
        finally:
            kill_tree(proc)
        done.append(f"gen {gen} from iteration {resumed_at}: {what}")
        if what == "finished":  # ended on its own: every rank's error lines, not only the launcher's summary
            errors = [line for line in log.read_text().splitlines() if "rror" in line and "[rank" in line]
            assert proc.returncode == 0, f"{log}:\n" + "\n".join(errors[-40:])
            break
    print("\n".join(done))
    run_torchrun(PRETRAIN, 2, args(tiny_dataset, save, steps), tmp_path)  # the plain relaunch that ends it
    assert train_losses(save) == reference(steps)
    assert [it for it, _ in train_losses(save)] == list(range(1, steps + 1))
    alive = [p for p in every_generation if not is_gone(p)]
    assert not alive, f"processes of earlier generations alive: {alive}"


@pytest.mark.slow  # launches torchrun and kills it (soak)
def test_soak_of_random_kills(tiny_dataset, reference, tmp_path):
    soak(tiny_dataset, reference, tmp_path, kills=3)


@pytest.mark.slow
def test_soak_of_twenty_random_kills(tiny_dataset, reference, tmp_path):
    soak(tiny_dataset, reference, tmp_path, kills=20)
