"""slurm/preprocess_interleaved.sh against a stand-in `sbatch` that runs each job in order on this machine."""

import json
import os
import signal
import subprocess

from latentlm_mcore.data import schema

from .conftest import make_documents, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs the submitted script at once: each array index in turn with SLURM_ARRAY_TASK_ID, and records the
# options it was given. Real Slurm would queue the merge behind the array (--dependency afterok).
FAKE_SBATCH = r"""#!/bin/bash
echo "$@" >> "$SBATCH_LOG"
array=""; script="${@: -1}"
while [ $# -gt 1 ]; do
  case "$1" in --array) array="$2"; shift;; esac; shift
done
if [ -n "$array" ]; then
  range=${array%%\%*}
  for i in $(seq ${range%-*} ${range#*-}); do SLURM_ARRAY_TASK_ID=$i bash "$script" >> "$SBATCH_LOG.out" 2>&1 || exit 1; done
else
  bash "$script" >> "$SBATCH_LOG.out" 2>&1 || exit 1
fi
echo $RANDOM
"""


def test_launcher_submits_array_and_dependent_merge(tmp_path, image_root, vae_checkpoint):
    root, names = image_root
    import numpy as np

    raw = tmp_path / "raw"
    raw.mkdir()
    docs = make_documents(np.random.default_rng(3), names, 3, 2, 1)
    write_jsonl(raw / "x.jsonl", docs[:3])
    write_jsonl(raw / "y.jsonl", docs[3:])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    os.chmod(bin_dir / "sbatch", 0o755)
    out = tmp_path / "out"
    log = tmp_path / "sbatch.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_LOG=str(log), TMPDIR=str(tmp_path),
               PYTHONPATH=REPO, PYTHON=os.path.join(REPO, ".venv", "bin", "python"),
               INPUT=f"{raw}/x.jsonl {raw}/y*.jsonl", IMAGE_ROOT=str(root), VAE=vae_checkpoint, OUTPUT=str(out),
               NUM_SHARDS="2", GPUS_PER_TASK="0")
    # Its own session, so that a hung run is killed with everything it started (by the launcher's PID).
    proc = subprocess.Popen(["bash", os.path.join(REPO, "slurm", "preprocess_interleaved.sh")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr + (open(f"{log}.out").read() if os.path.exists(f"{log}.out") else "")
    submitted = log.read_text().splitlines()
    assert "--array 0-1%64" in submitted[0] and "--gpus-per-task" not in submitted[0]
    assert "--dependency afterok:" in submitted[1]
    manifest = schema.read_manifest(str(out))
    assert manifest["num_parts"] == 2
    assert manifest["documents_written"] == {"text": 3, "pair": 2, "interleaved": 1}
    parts = [json.load(open(out / "parts" / f"{schema.part_name(k, 2)}.json")) for k in range(2)]
    assert [sum(p["documents_written"].values()) for p in parts] == [3, 3]  # one file per task
