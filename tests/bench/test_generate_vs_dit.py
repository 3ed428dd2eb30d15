"""bench/generate_vs_dit.py runs at a tiny size and writes the JSON its README figures come from (no timings
asserted: only that every run happened, with matched parameter counts and the recipe's step counts)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # runs the bench script in a fresh interpreter: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_bench_runs_and_writes_its_fields(tmp_path):
    out = tmp_path / "generate_vs_dit.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "generate_vs_dit.py"), "--hidden", "64", "--layers", "2",
                    "--grid", "4", "--batch-sizes", "1,2", "--output", str(out)], cwd=REPO, check=True,
                   env=dict(os.environ, TMPDIR=str(tmp_path)), capture_output=True, timeout=900)
    result = json.loads(out.read_text())
    assert result["grid"] == 4 and result["latentlm"]["head_steps"] == 20
    assert result["dit"]["steps"] == {"dit_ddpm_250": 250, "dit_dpm_solver_50": 50}
    lm, dit = result["latentlm"]["parameters"], result["dit"]["parameters"]
    assert abs(dit - lm) / lm < 0.25, (lm, dit)  # the nearest DiT depth at this width
    assert [row["batch"] for row in result["results"]] == [1, 2]
    for row in result["results"]:
        runs = {"latentlm_kv_cache", "dit_ddpm_250", "dit_dpm_solver_50"}
        assert set(row["images_per_s"]) == set(row["images_per_cpu_s"]) == runs
        assert all(v > 0 for v in row["images_per_s"].values())
        assert set(row["latentlm_speedup"]) == {"dit_ddpm_250", "dit_dpm_solver_50"}
    assert str(tmp_path) not in out.read_text() and "/work" not in out.read_text()  # no machine paths
