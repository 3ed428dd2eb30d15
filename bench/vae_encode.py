"""Batched σ-VAE encode throughput vs a one-image-at-a-time loop, measured side by side in one run.

    python bench/vae_encode.py                       # tiny preset, CPU
    python bench/vae_encode.py --preset paper        # on a GPU machine (bf16)

Prints the ratio (batched images/s over looped images/s) and writes bench/results/vae_encode.json.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentlm_mcore.vae import SIGMA_VAE_PRESETS, SigmaVAE  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(SIGMA_VAE_PRESETS), default="tiny")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each mode; the median counts")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "vae_encode.json"))
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = SIGMA_VAE_PRESETS[args.preset]
    torch.manual_seed(0)
    vae = SigmaVAE(cfg).to(device=device, dtype=dtype).eval()
    images = (torch.rand(args.images, 3, cfg.image_size, cfg.image_size) * 2 - 1).to(device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def batched():
        for chunk in images.split(args.batch_size):
            vae.encode(chunk)

    def looped():
        for i in range(len(images)):
            vae.encode(images[i:i + 1])

    def timed(fn):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    with torch.inference_mode():
        # Same encodings both ways (up to kernel-choice rounding): the comparison is of the same work.
        ref = vae.encode(images[:4]).float()
        one = torch.cat([vae.encode(images[i:i + 1]) for i in range(4)]).float()
        max_diff = (ref - one).abs().max().item()
        batched(), looped()  # warm-up: allocator, kernel selection
        # Alternate the modes so drift in machine load hits both alike.
        times = {"batched": [], "looped": []}
        for _ in range(args.repeats):
            times["batched"].append(timed(batched))
            times["looped"].append(timed(looped))

    batched_s, looped_s = statistics.median(times["batched"]), statistics.median(times["looped"])
    result = {
        "preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "images": args.images,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "batched_s": batched_s, "looped_s": looped_s,
        "batched_images_per_s": args.images / batched_s, "looped_images_per_s": args.images / looped_s,
        "ratio_batched_over_looped": looped_s / batched_s, "max_abs_diff_batched_vs_single": max_diff,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(f"{args.preset} σ-VAE encode on {result['device']} ({result['dtype']}): batched {args.batch_size}: "
          f"{result['batched_images_per_s']:.1f} img/s, one at a time: {result['looped_images_per_s']:.1f} img/s, "
          f"ratio {result['ratio_batched_over_looped']:.2f}x  -> {args.out}")


if __name__ == "__main__":
    main()
