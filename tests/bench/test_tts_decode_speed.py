"""bench/tts_decode_speed.py runs at a tiny size and writes the JSON its README figures come from (no timings
asserted: only that every rate ran with the paper's sampler and produced the right number of latents and samples)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # runs the bench script in a fresh interpreter: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_bench_runs_every_rate_and_writes_ratios(tmp_path):
    out = tmp_path / "tts_decode_speed.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "tts_decode_speed.py"), "--size", "tiny", "--seconds", "1",
                    "--output", str(out)], cwd=REPO, check=True, env=dict(os.environ, TMPDIR=str(tmp_path)),
                   capture_output=True, timeout=900)
    result = json.loads(out.read_text())
    assert result["cfg_scale"] == 4.0 and result["diffusion_steps"] == 5
    rows = result["results"]
    assert set(rows) == {"15hz", "7.5hz", "3.75hz", "75hz_baseline"}
    # latent counts follow the frame rates (24 kHz / hop), one second of audio each
    assert {r: rows[r]["latents_per_utterance"] for r in rows} == {"15hz": 15, "7.5hz": 8, "3.75hz": 4,
                                                                   "75hz_baseline": 75}
    assert [rows[r]["latent_dim"] for r in ("15hz", "7.5hz", "3.75hz", "75hz_baseline")] == [32, 64, 128, 8]
    for r in rows.values():
        assert set(r["audio_s_per_wall_s"]) == {"lm", "vae_decode", "lm_plus_vae"}
        assert all(v > 0 for v in r["audio_s_per_wall_s"].values())
    assert rows["75hz_baseline"]["speedup_vs_75hz"]["lm"] == 1.0
    assert str(tmp_path) not in out.read_text() and "/work" not in out.read_text()  # no machine paths
