"""Step time and MFU of a preset on one GPU, BF16 and (when Transformer Engine imports) FP8, side by side.

On a GPU machine with its own torch (NGC containers and the lent H200 run Python 3.12), megatron-core and our
pure-Python dependencies carried as wheels for that Python (`scripts/gpu_check.sh --collect` does this):
    python -m pip download megatron-core==0.16.1 --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 -d .whl/                       # here, before the run (cp312 wheel)
    python -m pip install --no-deps --target .whl/site .whl/*.whl && \\
        PYTHONPATH=.whl/site:. python bench/gpu_step.py --preset mllm-1.3b --micro-batch-size 1   # there
Each numeric mode runs in a fresh process (TE's FP8 state is global), on random packed batches at the
preset's sequence length, through the real training step (megatron DDP, distributed optimizer,
schedule). Prints a table plus the FP8/BF16 speed-up and writes bench/results/gpu_step.json.
On a CPU it runs too (`--preset tiny`, fp32) as a smoke test of the script.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gpu_step.json"


def measure(preset: str, mode: str, micro_batch_size: int, microbatches: int, steps: int, warmup: int) -> dict:
    import torch

    import dataclasses

    from latentlm_mcore.config import ParallelConfig, RunConfig, get_preset
    from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed
    from latentlm_mcore.training.flops import training_flops
    from latentlm_mcore.training.metrics import device_peak_tflops
    from latentlm_mcore.data.loader.synthetic import random_packed_batch
    from latentlm_mcore.training.trainer import Trainer

    cfg = get_preset(preset)
    cfg.parallel = ParallelConfig()
    cfg.train = dataclasses.replace(cfg.train, micro_batch_size=micro_batch_size,
                                    global_batch_size=micro_batch_size * microbatches)
    m = cfg.model
    run = RunConfig(precision="bf16" if mode != "fp32" else "fp32", fp8="hybrid" if mode == "fp8" else None)
    init_distributed(cfg.parallel, seed=0)
    trainer = Trainer(cfg, run)
    latents_per_image = min(256, m.seq_length // 4)
    images = max(1, m.seq_length // (4 * (latents_per_image + 2)))  # ~25% of positions are latents
    # host batches, as the loader yields them: the step copies them (its HOST_FIELDS stay on the host)
    batches = (random_packed_batch(micro_batch_size, m.seq_length, m.vocab_size, m.latent_dim,
                                   latents_per_image, images, seed=i) for i in range(10**9))
    times, mem = [], 0
    for i in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = trainer.step(batches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            mem = max(mem, torch.cuda.max_memory_allocated() / 2**30)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    sequences = micro_batch_size * microbatches
    flops = training_flops(m, m.seq_length, num_latent_targets=sequences * images * latents_per_image,
                           num_sequences=sequences)
    peak, peak_description = device_peak_tflops(None, "fp8" if mode == "fp8" else "bf16")
    out = {"mode": mode, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "median_step_s": step, "tokens_per_s": sequences * m.seq_length / step,
           "tflops": flops / step / 1e12, "mfu": flops / step / 1e12 / peak if peak else None, "peak": peak_description,
           "max_memory_gib": mem, "last_loss": result["loss"], "sequences_per_step": sequences}
    shutdown_distributed()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mllm-1.3b")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", help=argparse.SUPPRESS)  # internal: one measurement in this process
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(measure(args.preset, args.mode, args.micro_batch_size, args.microbatches,
                                               args.steps, args.warmup)), flush=True)
        return 0

    import torch
    modes = ["bf16"] if torch.cuda.is_available() else ["fp32"]
    if torch.cuda.is_available():
        try:
            import transformer_engine.pytorch  # noqa: F401
            modes.append("fp8")
        except Exception as e:  # noqa: BLE001
            print(f"Transformer Engine unavailable ({type(e).__name__}: {e}); FP8 not measured")
    results = []
    for mode in modes:
        env = dict(os.environ, MASTER_PORT=str(29600 + len(results)), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        cmd = [sys.executable, __file__, "--mode", mode] + sys.argv[1:]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{mode}: failed (exit {proc.returncode})\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        r = results[-1]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{args.preset} {mode:>4} on {r['device']}: {r['median_step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tok/s, "
              f"{r['tflops']:.1f} TFLOP/s, MFU {mfu} ({r['peak']}), peak mem {r['max_memory_gib']:.1f} GiB", flush=True)
    summary = {"preset": args.preset, "results": results}
    by_mode = {r["mode"]: r for r in results}
    if "bf16" in by_mode and "fp8" in by_mode:
        summary["fp8_speedup_over_bf16"] = by_mode["bf16"]["median_step_s"] / by_mode["fp8"]["median_step_s"]
        print(f"FP8 / BF16 speed-up: {summary['fp8_speedup_over_bf16']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
