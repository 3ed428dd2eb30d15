"""A fresh interpreter of this venv reads MDS shards with plain mosaicml-streaming: `import streaming`
imports torchvision, whose CUDA build cannot load its ops beside the CPU torch; the import hook that
scripts/setup_env.sh installs (compat/torchvision_hook.py) repairs that without importing latentlm_mcore."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

READ = """
import json, sys
from streaming import StreamingDataset
dataset = StreamingDataset(local=sys.argv[1], batch_size=1, shuffle=False)
print(json.dumps({"n": len(dataset), "tokens": [dataset[i]["tokens"].tolist() for i in range(len(dataset))],
                  "ours_imported": sorted(m for m in sys.modules if m.startswith("latentlm_mcore"))}))
"""


@pytest.mark.slow  # a fresh interpreter imports streaming: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_plain_streaming_reads_shards_in_a_fresh_interpreter(tmp_path):
    from streaming import MDSWriter

    rows = [np.arange(i, i + 5, dtype=np.int32) for i in range(7)]
    with MDSWriter(out=str(tmp_path / "shards"), columns={"tokens": "ndarray:int32"}) as writer:
        for row in rows:
            writer.write({"tokens": row})
    run = subprocess.run([sys.executable, "-c", READ, str(tmp_path / "shards")], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    read = json.loads(run.stdout.strip().splitlines()[-1])
    assert read["n"] == 7 and read["tokens"] == [r.tolist() for r in rows]
    assert read["ours_imported"] == []
