"""Activation memory: the planner's formula (training/memory.py, unfused attention as on CPU) against the
bytes torch's memory tracker measures at the end of one micro-batch's forward (what backward and every
in-flight micro-batch of the pipeline schedule hold), over a grid of hidden size, sequence length,
micro-batch and recompute; plus the time one layout plan takes for mllm-1.3b and a 70B-class shape.

  python bench/memory_activations.py
Writes bench/results/memory_activations.json.
"""
import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from latentlm_mcore.config import ModelConfig, ParallelConfig
from latentlm_mcore.training.memory import activation_bytes

LATENT_FRACTION = 0.25


def grid_model(hidden: int, seq: int, layers: int = 2) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=3 * hidden, num_attention_heads=4,
                       vocab_size=2048, seq_length=seq, latent_dim=16, head_layers=2)


def compare(model_cfg: ModelConfig, mbs: int, recompute) -> dict:
    from latentlm_mcore.training.memory_measure import measure_activations

    measured = measure_activations(model_cfg, mbs, recompute, LATENT_FRACTION)["forward_end"]
    estimate = activation_bytes(model_cfg, mbs, recompute=recompute, latent_fraction=LATENT_FRACTION,
                                flash_attention=False)
    return {"hidden": model_cfg.hidden_size, "seq": model_cfg.seq_length, "micro_batch": mbs,
            "recompute": recompute or "none", "measured_bytes": measured, "estimate_bytes": int(estimate),
            "ratio": round(estimate / measured, 4)}


def rank_state_seconds(model_cfg: ModelConfig, layout) -> float:
    """Seconds to build every distinct rank kind of one layout on meta (megatron already imported)."""
    from latentlm_mcore.training.memory import rank_states

    rank_states(model_cfg, layout)  # first call: imports, fake process group setup
    start = time.perf_counter()
    rank_states(model_cfg, layout)
    return round(time.perf_counter() - start, 2)


def plan_seconds(extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "tools/plan_run.py", "--preset", "mllm-1.3b", "--gpu-memory", "80", *extra],
                   check=True, capture_output=True)
    return round(time.perf_counter() - start, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench/results/memory_activations.json")
    args = p.parse_args()
    from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed

    init_distributed(ParallelConfig())
    rows = []
    for hidden, seq, mbs, recompute in itertools.product((128, 256), (256, 512), (1, 2), (None, "selective", "full")):
        rows.append(compare(grid_model(hidden, seq), mbs, recompute))
        print(json.dumps(rows[-1]), flush=True)
    shutdown_distributed()
    worst = max(abs(r["ratio"] - 1) for r in rows)
    seventy_b = ["--model.num-layers", "80", "--model.hidden-size", "8192", "--model.ffn-hidden-size", "28672",
                 "--model.num-attention-heads", "64", "--model.num-query-groups", "8"]
    from latentlm_mcore.config import apply_overrides, get_preset
    from latentlm_mcore.training.memory import Layout

    seventy_b_model = apply_overrides(get_preset("mllm-1.3b"), {"model." + k.lstrip("-").split(".")[1].replace("-", "_"): v
                                                                for k, v in zip(seventy_b[::2], seventy_b[1::2])}).model
    result = {"device": "cpu", "dtype": "bf16", "torch": torch.__version__, "latent_fraction": LATENT_FRACTION,
              "grid": rows, "worst_relative_error": round(worst, 4),
              "one_layout_seconds": {
                  "mllm-1.3b TP1 PP1 DP128": rank_state_seconds(get_preset("mllm-1.3b").model, Layout(1, 1, 128)),
                  "70B-class TP8 PP8 DP8": rank_state_seconds(seventy_b_model, Layout(8, 8, 8, sp=True))},
              "plan_run_seconds": {"mllm-1.3b, 16x8 GPUs": plan_seconds(["--nodes", "16"]),
                                   "70B-class, 64x8 GPUs": plan_seconds(["--nodes", "64", *seventy_b])}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"worst |estimate/measured - 1| = {worst:.3f}; one layout {result['one_layout_seconds']}; "
          f"whole plan_run {result['plan_run_seconds']}")


if __name__ == "__main__":
    main()
