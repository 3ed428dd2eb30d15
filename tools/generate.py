"""Generate images and text with LatentLM, from a Megatron checkpoint or an exported Hugging Face folder.

  python tools/generate.py --checkpoint runs/mllm/ckpt --task text-to-image --prompt "a red cat" --output out/
  python tools/generate.py --hf exports/mllm --task image-to-text --image cat.jpg --output out/
  python tools/generate.py --hf exports/mllm --task text --prompt "Once upon a time" --output out/
  python tools/generate.py --checkpoint runs/imagenet-l --task class-to-image --class 207 --class 360 --output out/
  python tools/generate.py --hf exports/tts --task text-to-speech --prompt "seven two" --voice ref.wav --output out/

A Megatron checkpoint (saved at any TP/PP) is loaded at TP=1 in this process and decodes with
megatron's static KV cache; an HF folder with transformers' DynamicCache. Writes `<output>/grid.png` (all images),
`<output>/images/NNN.png` and `<output>/samples.json` (prompts, texts, token ids); text-to-speech writes
`<output>/<i>.wav`, `<output>/speech.json` (text, voice file, seconds, latents, stopped by "eod" or "max") and
`<output>/latents.safetensors`.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentlm_mcore.runtime.logs import install_warning_filters  # noqa: E402
install_warning_filters()  # first: known-benign library warnings once or not at all (LATENTLM_VERBOSE=1: all)

import torch  # noqa: E402

from latentlm_mcore.inference.generation import SamplingConfig  # noqa: E402
from latentlm_mcore.inference.tasks import Generator, image_to_uint8  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="Megatron save directory (its latest) or one iter_* directory")
    source.add_argument("--hf", help="folder written by tools/convert_ckpt_to_hf.py")
    p.add_argument("--iteration", type=int, help="with --checkpoint: this iteration instead of the latest")
    p.add_argument("--tokenizer", help="with --checkpoint: tokenizer spec (default: the checkpoint's provenance)")
    p.add_argument("--sigma-vae", help="with --checkpoint: σ-VAE file (default: the checkpoint's provenance)")
    p.add_argument("--use-ema", action="store_true",
                   help="with --checkpoint: sample from the EMA of the weights the run kept (an HF folder holds "
                        "what was exported: convert_ckpt_to_hf.py --use-ema)")
    p.add_argument("--task", choices=["text-to-image", "class-to-image", "image-to-text", "text-to-speech", "text"],
                   required=True)
    p.add_argument("--class", dest="classes", type=int, action="append", default=[],
                   help="class-to-image: a class index (repeat for a batch)")
    p.add_argument("--prompt", action="append", default=[], help="a caption / text prompt (repeat for a batch)")
    p.add_argument("--image", action="append", default=[], help="image-to-text: an image file (repeat for a batch)")
    p.add_argument("--voice", action="append", default=[],
                   help="text-to-speech: the voice prompt, a WAV/FLAC file of the speaker (its first 3 s are used); "
                        "one for every --prompt, or one per --prompt")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="text-to-speech: an utterance that never chooses to stop ends here")
    p.add_argument("--output", required=True)
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance of latents (1 = off); default: the model's preset's, else 1.65 "
                        "(text-to-speech: 4, the paper's best, Fig. 10a)")
    p.add_argument("--diffusion-steps", type=int, default=None,
                   help="DPM-Solver++ steps per latent; default 20 (text-to-speech: 5, the paper's)")
    p.add_argument("--temperature", type=float, default=1.0, help="text sampling; 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=64, help="text tasks: positions generated per prompt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.task == "image-to-text" and not args.image:
        p.error("--task image-to-text needs at least one --image")
    if args.task == "class-to-image" and not args.classes:
        p.error("--task class-to-image needs at least one --class")
    if args.task == "text-to-speech" and len(args.voice) not in (1, len(args.prompt)):
        p.error(f"--task text-to-speech needs one --voice, or one per --prompt ({len(args.prompt)}); "
                f"got {len(args.voice)}")
    if args.task not in ("image-to-text", "class-to-image") and not args.prompt:
        p.error(f"--task {args.task} needs at least one --prompt")
    if args.hf and (args.iteration is not None or args.tokenizer or args.sigma_vae or args.use_ema):
        p.error("--iteration/--tokenizer/--sigma-vae/--use-ema apply to --checkpoint; an HF folder carries its own")
    return args


def load_images(paths: list[str], size: int) -> torch.Tensor:
    from latentlm_mcore.data.prep.preprocess import load_image

    arrays = []
    for path in paths:
        path = os.path.abspath(path)
        arrays.append(torch.from_numpy(load_image(path, os.path.dirname(path), size, max_pixels=1 << 28)))
    return torch.stack(arrays)


def to_pil(image: torch.Tensor):
    from PIL import Image

    array = image_to_uint8(image).numpy()
    return Image.fromarray(array)


def write_outputs(generations, prompts, output: str) -> None:
    from PIL import Image

    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    images = [img for g in generations for img in g.images]
    for i, img in enumerate(images):
        to_pil(img).save(os.path.join(output, "images", f"{i:03d}.png"))
    if images:
        cols = min(len(images), 8)
        rows = -(-len(images) // cols)
        h, w = images[0].shape[1:]
        scale, gap = max(1, 64 // max(h, w)), 2  # small images drawn large enough to see, a grey line between
        cell_h, cell_w = h * scale + gap, w * scale + gap
        grid = Image.new("RGB", (cols * cell_w + gap, rows * cell_h + gap), (170, 170, 170))
        for i, img in enumerate(images):
            tile = to_pil(img).resize((w * scale, h * scale), Image.NEAREST)
            grid.paste(tile, (gap + (i % cols) * cell_w, gap + (i // cols) * cell_h))
        grid.save(os.path.join(output, "grid.png"))
    records = [{"prompt": p, "text": g.text, "tokens": g.tokens, "num_images": len(g.images)}
               for p, g in zip(prompts, generations)]
    with open(os.path.join(output, "samples.json"), "w") as f:
        json.dump(records, f, indent=2)


def write_speech(speeches, output: str) -> None:
    """<i>.wav (float32 at the σ-VAE's rate), speech.json, and latents.safetensors (the generated runs, scaled as
    the model reads them, key "<i>": to decode again or compare backends)."""
    import soundfile as sf
    from safetensors.torch import save_file

    os.makedirs(output, exist_ok=True)
    save_file({str(i): s.latents.contiguous() for i, s in enumerate(speeches)}, os.path.join(output, "latents.safetensors"))
    records = []
    for i, s in enumerate(speeches):
        sf.write(os.path.join(output, f"{i}.wav"), s.audio.clamp(-1, 1).numpy(), s.sample_rate, subtype="FLOAT")
        records.append({"file": f"{i}.wav", "text": s.text, "voice": s.voice, "seconds": len(s.audio) / s.sample_rate,
                        "num_latents": int(s.latents.shape[0]), "stopped_by": s.stopped_by, "tokens": s.tokens})
    with open(os.path.join(output, "speech.json"), "w") as f:
        json.dump(records, f, indent=2)


def _cfg_scale(given: float | None, generator, task: str) -> float:
    """--cfg-scale, else the guidance of the model's preset (imagenet-*: the paper's 1.75 / 1.65), else 1.65
    (text-to-speech: 4, paper §3.3 Fig. 10a)."""
    if given is not None:
        return given
    if generator.cfg_scale is not None:
        return generator.cfg_scale
    return 4.0 if task == "text-to-speech" else 1.65


def main(argv=None):
    args = parse_args(argv)
    if args.hf:
        generator = Generator.from_hf_folder(args.hf)
    else:
        generator = Generator.from_megatron(args.checkpoint, args.iteration, args.tokenizer, args.sigma_vae,
                                            use_ema=args.use_ema)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              cfg_scale=_cfg_scale(args.cfg_scale, generator, args.task),
                              diffusion_steps=args.diffusion_steps or (5 if args.task == "text-to-speech" else 20),
                              seed=args.seed)
    if args.task == "text-to-speech":
        try:
            speeches = generator.text_to_speech(args.prompt, args.voice, sampling, max_seconds=args.max_seconds)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"generate: {e}")
        write_speech(speeches, args.output)
        for i, s in enumerate(speeches):
            print(f"[{s.text}] -> {i}.wav: {len(s.audio) / s.sample_rate:.2f} s, {s.latents.shape[0]} latents, "
                  f"stopped by {s.stopped_by}")
        print(f"wrote {args.output}")
        return
    if args.task == "text-to-image":
        prompts, generations = args.prompt, generator.text_to_image(args.prompt, sampling)
    elif args.task == "class-to-image":
        prompts, generations = [f"class {c}" for c in args.classes], generator.class_to_image(args.classes, sampling)
    elif args.task == "image-to-text":
        images = load_images(args.image, generator.vae.config.image_size) if generator.vae else None
        prompts, generations = args.image, generator.image_to_text(images, sampling, prompt=" ".join(args.prompt))
    else:
        prompts, generations = args.prompt, generator.continue_text(args.prompt, sampling)
    write_outputs(generations, prompts, args.output)
    for prompt, g in zip(prompts, generations):
        print(f"[{prompt}] -> {g.text!r} ({len(g.images)} image(s))")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
