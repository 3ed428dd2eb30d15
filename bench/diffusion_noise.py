"""Where to draw the diffusion noise: on the device (what the model does) or on the host in the loader.

    python bench/diffusion_noise.py [--repeats 20]

The model draws, per sequence, timesteps [s, k] and noise [s, k, D] for every position from a generator on
the compute device seeded by the sequence's host-side noise_seed, and gathers the latent-target rows. The
alternative is to draw only the latent-target rows on the host, in the loader workers, and ship them with
the batch (same noise on any hardware, but CPU time in the workers and bytes to copy). Measured side by
side on this machine, per sequence, for each preset's shape (mllm-1.3b: a quarter of the positions are
latent targets; imagenet: 256 of 260):
- host draw of the target rows (what the loader would do), and of every position (what the model draws);
- bytes the target rows' noise and timesteps add to the batch, as a ratio to the batch's bytes today.
On a GPU the device draw is a few kernels with no host work; this CPU cannot measure it.
Printed and written to bench/results/diffusion_noise.json.
"""
import argparse
import json
import os
import statistics
import time

import torch

from latentlm_mcore.config import get_preset

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "diffusion_noise.json")
SHAPES = {"mllm-1.3b": 0.25, "imagenet-xl": 256 / 260}  # preset -> share of positions that are latent targets


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def draw(rows: int, k: int, d: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, T, (rows, k), generator=g), torch.randn(rows, k, d, generator=g)


def measure(preset: str, target_share: float, repeats: int) -> dict:
    m = get_preset(preset).model
    s, k, d, T = m.seq_length, m.batch_mul, m.latent_dim, m.num_timesteps
    targets = int(s * target_share)
    # today's batch per sequence: tokens, labels, position_ids int64; loss_mask, diffusion_mask float32;
    # latent_mask bool; latents and diffusion_targets float32 [s, D]; noise_seed int64
    batch_bytes = s * (3 * 8 + 2 * 4 + 1 + 2 * 4 * d) + 8
    noise_bytes = targets * k * (8 + 4 * d)
    return {"preset": preset, "seq_length": s, "batch_mul": k, "latent_dim": d, "latent_targets": targets,
            "host_draw_target_rows_ms": median_ms(lambda: draw(targets, k, d, T, 1), repeats),
            "host_draw_every_position_ms": median_ms(lambda: draw(s, k, d, T, 1), repeats),
            "batch_bytes": batch_bytes, "noise_bytes": noise_bytes, "noise_to_batch_bytes": noise_bytes / batch_bytes}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(1)  # one loader worker's share
    results = {"threads": 1, "shapes": [measure(name, share, args.repeats) for name, share in SHAPES.items()]}
    for r in results["shapes"]:
        print(f"{r['preset']:<12} {r['latent_targets']:>5} latent targets of {r['seq_length']}: host draw "
              f"{r['host_draw_target_rows_ms']:.2f} ms (targets) / {r['host_draw_every_position_ms']:.2f} ms "
              f"(every position) per sequence; noise adds {r['noise_to_batch_bytes']:.2f}x the batch's bytes")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
