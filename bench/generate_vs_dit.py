"""Images/s of LatentLM (KV cache, DPM-Solver++ 20 head steps) against a DiT of matched parameter count.

Paper 3.1.4 / Fig. 7: LatentLM runs its backbone once per latent and only the small diffusion head iterates;
DiT runs its whole network at every sampling step. Both generate class-conditional images on the same latent
grid (grid x grid latents of `latent_dim`, one latent per DiT token: patch size 1) with classifier-free
guidance (conditional and null-class rows in one batch, CFG 1.65 as the paper's ImageNet system):

- LatentLM: the HF model and KV cache of `latentlm_mcore.hf` driven by `latentlm_mcore.inference.generate`
  (`<END_OF_DOCUMENT> class <BOD>` prompts, one image per row), as `bench/generate.py`.
- DiT: diffusers' `DiTTransformer2DModel` (AdaLN-Zero, learned sigma as DiT) at the same width and head size,
  its depth chosen to match LatentLM's parameter count; DiT's recipe of 250 DDPM steps (linear betas,
  learned-range variance) and a 50-step DPM-Solver++ (2nd order) variant, both diffusers' schedulers.

Every batch size runs all three in this process, one after the other; the ratios are the result.

  python bench/generate_vs_dit.py                                       # CPU, writes bench/results/generate_vs_dit.json
  python bench/generate_vs_dit.py --device cuda --dtype bf16 --hidden 1024 --layers 24 --batch-sizes 1,16,64,256
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import latentlm_mcore.hf  # noqa: E402,F401
from latentlm_mcore.hf.configuration_latentlm import LatentLMHFConfig  # noqa: E402
from latentlm_mcore.hf.modeling_latentlm import LatentLMForCausalLM  # noqa: E402
from latentlm_mcore.inference.generation import SamplingConfig, generate  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import random_model  # noqa: E402  (bench/generate.py: the same random LatentLM)

NUM_CLASSES = 1000  # ImageNet; id 1000 is DiT's null class and LatentLM's first special token
CFG_SCALE = 1.65
HEAD_DIM = 64


def latentlm_model(args) -> LatentLMForCausalLM:
    heads = max(1, args.hidden // HEAD_DIM)
    config = LatentLMHFConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=args.hidden // heads,
        max_position_embeddings=args.grid ** 2 + 8, latent_dim=args.latent_dim, head_layers=3,
        bod_token_id=1000, eod_token_id=1001, latent_token_id=1002, end_of_document_token_id=1003,
        latents_per_image=args.grid ** 2)
    return random_model(config)


def dit_model(args, num_layers: int):
    from diffusers import DiTTransformer2DModel

    heads = max(1, args.hidden // HEAD_DIM)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=args.hidden // heads,
                                 in_channels=args.latent_dim, out_channels=2 * args.latent_dim, num_layers=num_layers,
                                 sample_size=args.grid, patch_size=1, num_embeds_ada_norm=NUM_CLASSES).eval()


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_dit_layers(args, target: int) -> int:
    """DiT depth whose parameter count is nearest LatentLM's (counted on the meta device: no weights)."""
    with torch.device("meta"):
        per_layer = count(dit_model(args, 2)) - count(dit_model(args, 1))
        base = count(dit_model(args, 1)) - per_layer
    return max(1, round((target - base) / per_layer))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(result, wall seconds, CPU seconds of this process)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def latentlm_generate(model, batch: int, args):
    special = model.special_tokens()
    prompts = [[special.end_of_document, c % NUM_CLASSES, special.bod] for c in range(batch)]
    sampling = SamplingConfig(cfg_scale=CFG_SCALE, diffusion_steps=args.head_steps, seed=0, stop_after_images=1,
                              max_new_tokens=args.grid ** 2 + 1)
    samples = generate(model.decoder(True), prompts, special, sampling, progress=False)
    assert all(len(s.images) == 1 and s.images[0].shape[0] == args.grid ** 2 for s in samples)
    return samples


@torch.no_grad()
def dit_generate(model, scheduler, steps: int, batch: int, args, device, dtype):
    """diffusers' DiTPipeline loop: both CFG halves in one batch, guidance on eps, learned sigma kept."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, args.latent_dim, args.grid, args.grid, generator=g).to(device, dtype)
    labels = torch.cat([torch.arange(batch) % NUM_CLASSES, torch.full((batch,), NUM_CLASSES)]).to(device)
    scheduler.set_timesteps(steps)
    c = args.latent_dim
    for t in scheduler.timesteps:
        out = model(torch.cat([x, x]), timestep=t.expand(2 * batch).to(device), class_labels=labels).sample
        cond, uncond = out.chunk(2)
        eps = uncond[:, :c] + CFG_SCALE * (cond[:, :c] - uncond[:, :c])
        model_output = torch.cat([eps, cond[:, c:]], dim=1) if scheduler.config.variance_type else eps
        x = scheduler.step(model_output, t, x, generator=g if device.type == "cpu" else None).prev_sample
    return x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="LatentLM backbone layers (DiT depth is matched)")
    p.add_argument("--grid", type=int, default=16, help="latent grid side: 16 x 16 latents (256 px, paper 3.1)")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--head-steps", type=int, default=20, help="LatentLM DPM-Solver++ steps per latent")
    p.add_argument("--ddpm-steps", type=int, default=250, help="DiT's DDPM recipe")
    p.add_argument("--dpm-solver-steps", type=int, default=50)
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "generate_vs_dit.json"))
    args = p.parse_args(argv)
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cpu":  # one thread: on a shared CPU, spinning OpenMP threads make timings erratic
        torch.set_num_threads(1)
    latentlm = latentlm_model(args).to(device, dtype)
    torch.manual_seed(0)
    dit = dit_model(args, matched_dit_layers(args, count(latentlm))).to(device, dtype)
    schedulers = {
        f"dit_ddpm_{args.ddpm_steps}": (DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                      variance_type="learned_range"), args.ddpm_steps),
        f"dit_dpm_solver_{args.dpm_solver_steps}": (DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2),
            args.dpm_solver_steps),
    }
    special = latentlm.special_tokens()  # warm-up: a few positions
    generate(latentlm.decoder(True), [[special.end_of_document, 0, special.bod]], special,
             SamplingConfig(max_new_tokens=4), progress=False)
    rows = []
    result = {
        "what": "class-conditional images/s, LatentLM (KV cache, DPM-Solver++ per latent) vs a DiT of matched "
                "parameter count on the same latent grid, CFG in one batch",
        "speedup_clock": "cpu seconds of this process (one thread)" if device.type == "cpu" else "wall seconds",
        "grid": args.grid, "latent_dim": args.latent_dim, "cfg_scale": CFG_SCALE,
        "latentlm": {"layers": args.layers, "hidden": args.hidden, "ffn": 4 * args.hidden, "head_layers": 3,
                     "head_steps": args.head_steps, "parameters": count(latentlm)},
        "dit": {"layers": dit.config.num_layers, "hidden": args.hidden, "patch_size": 1, "parameters": count(dit),
                "steps": {name: n for name, (_, n) in schedulers.items()}},
        "results": rows,
        "machine": {"torch": torch.__version__, "device": str(device), "dtype": args.dtype,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        row = {"batch": batch, "images_per_s": {}, "images_per_cpu_s": {}}
        runs = {"latentlm_kv_cache": lambda: latentlm_generate(latentlm, batch, args)}
        runs.update({name: (lambda s=s, n=n: dit_generate(dit, s, n, batch, args, device, dtype))
                     for name, (s, n) in schedulers.items()})
        for name, fn in runs.items():
            _, wall, cpu = timed(fn, device)
            row["images_per_s"][name], row["images_per_cpu_s"][name] = batch / wall, batch / cpu
        clock = "images_per_cpu_s" if device.type == "cpu" else "images_per_s"
        row["latentlm_speedup"] = {name: row[clock]["latentlm_kv_cache"] / row[clock][name] for name in schedulers}
        print(json.dumps(row), flush=True)
        rows.append(row)
        with open(args.output, "w") as f:  # after every batch size: a long run keeps what it measured
            json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=2))
    return result


if __name__ == "__main__":
    main()
