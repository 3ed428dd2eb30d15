"""Raw JSONL (text / image-text pairs / interleaved / class-labelled images) -> ids + σ-VAE latents -> MDS shards.

One process:
    python tools/preprocess_interleaved.py --input 'raw/*.jsonl' --image-root images \
        --vae sigma_vae.pt --output data/mllm
Slurm job array (see slurm/preprocess_interleaved.sh): task k of N writes part k, then one merge:
    python tools/preprocess_interleaved.py ... --num-shards N --shard-index k
    python tools/preprocess_interleaved.py --merge --output data/mllm --num-shards N
Class-conditional images (data_prep/convert.py imagefolder) take a class vocabulary and, as DiT, flips:
    python tools/preprocess_interleaved.py --input imagenet.jsonl --image-root /data/imagenet/train \
        --vae sigma_vae.pt --tokenizer classes:1000 --hflip --output data/imagenet
Speech (data_prep/convert.py librispeech|libriheavy, data_prep/speech_digits.py) takes the audio σ-VAE instead:
    python tools/preprocess_interleaved.py --input speech.jsonl --audio-root /data/LibriSpeech \
        --audio-vae audio_vae.pt --output data/tts
Re-running skips finished parts. Skipped documents are listed in <output>/parts/*.rejects.jsonl and
counted by reason in <output>/manifest.json.
"""

import argparse
import json
import os

from latentlm_mcore.runtime.logs import install_warning_filters
install_warning_filters()  # first: known-benign library warnings once or not at all (LATENTLM_VERBOSE=1: all)
from latentlm_mcore.data.prep.preprocess import PreprocessConfig, merge_parts, preprocess_part  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--num-shards", type=int, default=1, help="parts the work is split into (Slurm array size)")
    p.add_argument("--merge", action="store_true", help="only join the finished parts into the dataset")
    p.add_argument("--latent-normalisation", choices=("global", "per_channel"), default="global",
                   help="when the σ-VAE file has no latent statistics: one global scale and shift of its "
                        "samples over this dataset (default), or one per channel (std floored at 0.1 x global)")
    p.add_argument("--input", nargs="+", help="raw JSONL files or globs")
    p.add_argument("--image-root", help="folder every image path is relative to (and must stay inside)")
    p.add_argument("--vae", help="σ-VAE file written by save_sigma_vae")
    p.add_argument("--tokenizer", default="cl100k_base", help="cl100k_base, cl100k_base:N, a .tiktoken or a sentencepiece .model file; "
                                                          "classes:N for class-labelled images")
    p.add_argument("--hflip", action="store_true", help="class images: also encode each image's horizontal "
                   "mirror; the loader picks one of the two (DiT's flip). Not for digits or text in images")
    p.add_argument("--audio-vae", help="speech: the audio σ-VAE file (pretrain/train_audio_vae.py's audio_vae.pt)")
    p.add_argument("--audio-root", help="speech: folder every audio path is relative to (and must stay inside)")
    p.add_argument("--max-audio-seconds", type=float, default=PreprocessConfig.max_audio_seconds)
    p.add_argument("--shard-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    p.add_argument("--batch-images", type=int, default=64)
    p.add_argument("--max-image-pixels", type=int, default=PreprocessConfig.max_image_pixels)
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if not args.merge:
        needed = ("input", "audio_root", "audio_vae") if args.audio_vae else ("input", "image_root", "vae")
        missing = [f"--{n.replace('_', '-')}" for n in needed if not getattr(args, n)]
        if missing:
            p.error(f"encoding needs {', '.join(missing)}")
        part = preprocess_part(PreprocessConfig(
            inputs=args.input, output=args.output, image_root=args.image_root, vae_checkpoint=args.vae,
            audio_vae_checkpoint=args.audio_vae, audio_root=args.audio_root, max_audio_seconds=args.max_audio_seconds,
            tokenizer=args.tokenizer, hflip=args.hflip, num_shards=args.num_shards, shard_index=args.shard_index,
            batch_images=args.batch_images, max_image_pixels=args.max_image_pixels, device=args.device,
            progress=not args.no_progress))
        print(f"{part['part']}: written {part['documents_written']}, rejected {part['documents_rejected']}")
    if args.merge or args.num_shards == 1:
        manifest = merge_parts(args.output, args.num_shards, args.latent_normalisation)
        print(json.dumps({k: manifest[k] for k in ("documents_written", "images_written", "audio_seconds_written",
                                                     "documents_rejected")}))


if __name__ == "__main__":
    main()
