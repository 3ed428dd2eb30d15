"""Convert a Megatron distributed checkpoint (saved at any TP/PP) to a Hugging Face folder.

  python tools/convert_ckpt_to_hf.py --checkpoint runs/mllm/ckpt --output exports/mllm [--iteration N] [--dtype bf16]
  python tools/convert_ckpt_to_hf.py --checkpoint runs/imagenet-l --output exports/imagenet-l --use-ema

The checkpoint is loaded at TP=1/PP=1 on the CPU in this process. The folder loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`; its backbone also loads as a
plain `LlamaForCausalLM`. The tokenizer and σ-VAE come from the checkpoint's provenance (the σ-VAE found by its sha256) unless given here.
An existing non-empty output is never replaced without --overwrite.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentlm_mcore.runtime.logs import install_warning_filters  # noqa: E402
install_warning_filters()  # first: known-benign library warnings once or not at all (LATENTLM_VERBOSE=1: all)

from latentlm_mcore.hf.convert import convert_checkpoint  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Megatron save directory (its latest) or one iter_* directory")
    p.add_argument("--iteration", type=int, help="convert this iteration instead of the latest")
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--tokenizer", help="tokenizer spec (default: the checkpoint's provenance)")
    p.add_argument("--sigma-vae", help="σ-VAE file (default: the checkpoint's, found by its sha256)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--use-ema", action="store_true",
                   help="export the EMA of the weights the run kept (train.ema_decay > 0) instead of the raw weights")
    args = p.parse_args(argv)
    try:
        source = convert_checkpoint(args.checkpoint, args.output, iteration=args.iteration, dtype=args.dtype,
                                    tokenizer=args.tokenizer, sigma_vae=args.sigma_vae, overwrite=args.overwrite,
                                    max_shard_size=args.max_shard_size, use_ema=args.use_ema)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        sys.exit(f"convert_ckpt_to_hf: {e}")
    print(f"converted {source}{' (EMA weights)' if args.use_ema else ''} -> {args.output}")


if __name__ == "__main__":  # dist_checkpointing may start worker processes: keep the guard
    main()
