"""slurm/preprocess_interleaved.sh submitted to a real one-node Slurm (the `slurm_cluster` fixture): a job
array of preprocessing parts, then the merge job that waits for it with --dependency=afterok."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from latentlm_mcore.data import schema

from tests.conftest import REPO as _REPO
from tests.data.conftest import make_documents, write_jsonl
from tests.slurm.commands import job_fields

REPO = str(_REPO)


def _queue(env, job_ids) -> str:
    return subprocess.run(["squeue", "-j", ",".join(job_ids), "-o", "%i %j %T %r %E"], env=env, capture_output=True,
                          text=True, timeout=30).stdout


def _logs(folder: Path) -> str:
    return "".join(f"\n--- {f.name} (tail)\n{f.read_text()[-3000:]}" for f in sorted(folder.glob("*.out")))


def _submit(env, cwd):
    """Run the launcher as a user would on the login node; returns (array job id, merge job id)."""
    submit = subprocess.run(["bash", os.path.join(REPO, "slurm", "preprocess_interleaved.sh")], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=60)
    ids = re.search(r"submitted array job (\d+)\S* \(2 parts\) and merge job (\d+)", submit.stdout)
    assert submit.returncode == 0 and ids, f"submission failed:\n{submit.stdout}{submit.stderr}"
    return ids.groups()


def _wait_until_gone(env, job_ids, logs: Path, timeout=150):
    """Poll squeue until none of `job_ids` is queued or running (no accounting here: no sacct)."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], env=env, capture_output=True, text=True,
                         timeout=30).stdout.strip():
        assert time.monotonic() < deadline, \
            f"jobs {job_ids} still queued after {timeout} s: {_queue(env, job_ids)}{_logs(logs)}"
        time.sleep(2)


def _launcher_env(slurm_cluster, tmp_path, **changes):
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = dict(slurm_cluster, TMPDIR=str(tmp_path / "tmp"), PYTHONPATH=REPO, PYTHON=sys.executable,
               OMP_NUM_THREADS="1", NUM_SHARDS="2", GPUS_PER_TASK="0", CPUS_PER_TASK="1", TIME="5", **changes)
    env.pop("REPO_DIR", None)  # the launcher finds the repository itself
    return env


@pytest.mark.slow  # over ~10 s (fast-tier measurement, 2026-12-04)
def test_launcher_array_then_dependent_merge_on_real_slurm(slurm_cluster, tmp_path, image_root, vae_checkpoint):
    root, names = image_root
    raw = tmp_path / "raw"
    raw.mkdir()
    docs = make_documents(np.random.default_rng(3), names, 3, 2, 1)
    bad = {"id": "bad-missing", "source": "pair", "segments": [{"text": "a photo"}, {"image": "no/such.jpg"}]}
    write_jsonl(raw / "x.jsonl", docs[:3])
    write_jsonl(raw / "y.jsonl", docs[3:] + [bad])
    out = tmp_path / "out"
    env = _launcher_env(slurm_cluster, tmp_path, INPUT=f"{raw}/x.jsonl {raw}/y*.jsonl", IMAGE_ROOT=str(root),
                        VAE=vae_checkpoint, OUTPUT=str(out))
    array_id, merge_id = _submit(env, tmp_path)
    finished = False
    try:
        # Just submitted (the tasks need seconds to import torch): the merge waits on the whole array.
        merge = job_fields(env, merge_id)[0]
        assert merge["JobState"] == "COMPLETED" or (
            merge["JobState"] == "PENDING" and merge["Dependency"].startswith(f"afterok:{array_id}")), merge
        _wait_until_gone(env, [array_id, merge_id], out / "slurm")
        finished = True
    finally:
        if not finished:
            subprocess.run(["scancel", array_id, merge_id], env=env, capture_output=True, timeout=30)

    logs = _logs(out / "slurm")
    tasks = sorted(job_fields(env, array_id), key=lambda j: int(j["ArrayTaskId"]))
    merge = job_fields(env, merge_id)[0]
    assert [(t["ArrayTaskId"], t["JobState"], t["ExitCode"]) for t in tasks] == \
        [("0", "COMPLETED", "0:0"), ("1", "COMPLETED", "0:0")], logs
    assert (merge["JobState"], merge["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert all("gpu" not in t["TRES"] for t in tasks + [merge])  # GPUS_PER_TASK=0 asks for none
    # afterok: the merge started only once every part had finished.
    assert merge["StartTime"] >= max(t["EndTime"] for t in tasks), (merge, tasks)
    assert sorted(f.name for f in (out / "slurm").glob("*.out")) == \
        [f"preprocess-{array_id}_0.out", f"preprocess-{array_id}_1.out", f"preprocess-merge-{merge_id}.out"], logs

    manifest = schema.read_manifest(str(out))
    assert manifest["num_parts"] == 2
    assert manifest["documents_written"] == {"text": 3, "pair": 2, "interleaved": 1}, logs
    assert manifest["documents_rejected"] == {schema.IMAGE_MISSING: 1}, logs
    assert manifest["images_written"] == sum("image" in s for d in docs[3:] for s in d["segments"])
    parts = [json.load(open(out / "parts" / f"{schema.part_name(k, 2)}.json")) for k in range(2)]
    assert [sum(p["documents_written"].values()) for p in parts] == [3, 3]  # one file per task
    rejects = [json.loads(line) for k in range(2)
               for line in open(out / "parts" / f"{schema.part_name(k, 2)}.rejects.jsonl")]
    assert [(r["id"], r["reason"]) for r in rejects] == [("bad-missing", schema.IMAGE_MISSING)]
    for source, n in manifest["documents_written"].items():
        index = json.load(open(out / source / "index.json"))
        assert sum(s["samples"] for s in index["shards"]) == n


@pytest.mark.slow  # over ~10 s (fast-tier measurement, 2026-12-04)
def test_failed_part_cancels_the_merge_instead_of_leaving_it_pending(slurm_cluster, tmp_path, image_root):
    """afterok can never be met once a task failed; without --kill-on-invalid-dep the merge would sit in the
    queue for ever (DependencyNeverSatisfied)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl(raw / "x.jsonl", make_documents(np.random.default_rng(4), image_root[1], 2, 0, 0))
    out = tmp_path / "out"
    env = _launcher_env(slurm_cluster, tmp_path, INPUT=f"{raw}/x.jsonl", IMAGE_ROOT=str(image_root[0]),
                        VAE=str(tmp_path / "no-such-vae.pt"), OUTPUT=str(out))
    array_id, merge_id = _submit(env, tmp_path)
    finished = False
    try:
        _wait_until_gone(env, [array_id, merge_id], out / "slurm", timeout=90)
        finished = True
    finally:
        if not finished:
            subprocess.run(["scancel", array_id, merge_id], env=env, capture_output=True, timeout=30)
    logs = _logs(out / "slurm")
    tasks = job_fields(env, array_id)
    merge = job_fields(env, merge_id)[0]
    assert sorted(t["JobState"] for t in tasks) == ["FAILED", "FAILED"], logs
    assert "no-such-vae.pt" in logs  # each task said why
    assert (merge["JobState"], merge["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), merge
    assert not (out / schema.MANIFEST_NAME).exists() and not list((out / "slurm").glob("preprocess-merge-*"))
