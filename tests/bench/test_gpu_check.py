"""The prepared GPU check runs its parts on the CPU (all but the sync count, which needs CUDA) and writes its
report; its launcher refuses clearly when the carried wheels are missing."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_gpu_check_parts_pass_on_the_cpu(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    parts = report["parts"]
    assert proc.returncode == 0, {k: v.get("error") or v.get("ok") for k, v in parts.items()}
    assert set(parts) == set("abcdef")
    assert parts["e"]["ok"] is None and "no GPU" in parts["e"]["skipped"]
    assert all(parts[p]["ok"] for p in "abcdf")
    assert parts["a"]["tp_backend"] == "gloo" and parts["a"]["param_devices"] == ["cpu"]
    assert parts["b"]["tiny"]["results"][0]["mode"] == "fp32"
    assert parts["c"]["images"] >= 1 and all(parts["c"]["kv_cache_equals_recompute"])
    assert parts["d"]["resumed"] == parts["d"]["uninterrupted"] and len(parts["d"]["resumed"]) == 4
    assert parts["f"]["losses"]["full"] == parts["f"]["losses"]["none"]
    assert report["machine"]["gpu"] is None


def test_launcher_without_carried_wheels_says_what_to_do(tmp_path):
    repo_copy = tmp_path / "repo"
    (repo_copy / "scripts").mkdir(parents=True)
    (repo_copy / "scripts" / "gpu_check.sh").write_bytes((REPO / "scripts" / "gpu_check.sh").read_bytes())
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=repo_copy,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--collect" in proc.stderr
