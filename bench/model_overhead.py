"""What LatentLM costs over a plain GPT, measured side by side in one run (CPU or GPU, one process).

1. median fwd+bwd step time of LatentLMModel on a text-only batch / megatron-core GPTModel of the
   same config (ideally ~1: on text the extra work is one zero-weighted head row);
2. (step time on an image-heavy batch / on a text-only batch) / (their model-FLOP ratio): ~1 means
   the diffusion head costs what its FLOPs say, >1 means overhead beyond its arithmetic.

  python bench/model_overhead.py [--hidden 256 --layers 4 --seq 512 --repeats 15]
Writes bench/results/model_overhead.json.
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from latentlm_mcore.config import ModelConfig, ParallelConfig
from latentlm_mcore.model import build_model, default_block_spec, latentlm_loss, transformer_config
from latentlm_mcore.model.loss import count_targets, diffusion_weight
from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed
from latentlm_mcore.training.flops import training_flops
from latentlm_mcore.training.step import device_batch
from latentlm_mcore.data.loader.synthetic import random_packed_batch


def latentlm_step(model, batch):
    out = model(batch["tokens"], batch["position_ids"], latents=batch["latents"], latent_mask=batch["latent_mask"],
                labels=batch["labels"], diffusion_targets=batch["diffusion_targets"],
                diffusion_mask=batch["diffusion_mask"], noise_seed=batch["noise_seed"])
    counts = count_targets(batch)
    weight = diffusion_weight(counts.double(), model.model_cfg.diffusion_loss_weight)
    loss, num_tokens, _ = latentlm_loss(batch["loss_mask"], counts, weight, out)
    (loss / num_tokens).backward()


def gpt_step(model, batch, mask):
    per_token = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    ((per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()).backward()


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latents-per-image", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_overhead.json"))
    args = p.parse_args()

    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=3 * args.hidden,
                      num_attention_heads=max(1, args.hidden // 64), vocab_size=args.vocab, seq_length=args.seq,
                      latent_dim=32, head_layers=3)
    os.environ.setdefault("MASTER_PORT", "29533")
    init_distributed(ParallelConfig(), seed=0)
    tcfg = transformer_config(cfg, ParallelConfig())
    spec = default_block_spec(tcfg)
    latentlm = build_model(cfg, tcfg, spec)
    from megatron.core.models.gpt import GPTModel
    gpt = GPTModel(config=tcfg, transformer_layer_spec=spec, vocab_size=cfg.vocab_size,
                   max_sequence_length=cfg.seq_length, position_embedding_type="rope",
                   share_embeddings_and_output_weights=False)
    if torch.cuda.is_available():
        latentlm, gpt = latentlm.cuda(), gpt.cuda()

    images = (args.seq // 2) // (args.latents_per_image + 2)  # half the sequence is image latents
    text = device_batch(random_packed_batch(args.batch, args.seq, cfg.vocab_size, cfg.latent_dim,
                                            args.latents_per_image, 0, seed=1))
    heavy = device_batch(random_packed_batch(args.batch, args.seq, cfg.vocab_size, cfg.latent_dim,
                                             args.latents_per_image, images, seed=2))
    mask = None if not latentlm.needs_explicit_causal_mask else torch.triu(
        torch.ones(1, 1, args.seq, args.seq, dtype=torch.bool, device=text["tokens"].device), diagonal=1)

    runs = {"gpt_text": lambda: gpt_step(gpt, text, mask), "latentlm_text": lambda: latentlm_step(latentlm, text),
            "latentlm_image_heavy": lambda: latentlm_step(latentlm, heavy)}
    times = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all three alike
        for name, fn in runs.items():
            times[name].append(timed(fn))
            latentlm.zero_grad(set_to_none=True)
            gpt.zero_grad(set_to_none=True)
    median = {k: statistics.median(v) for k, v in times.items()}

    latents = int(heavy["diffusion_mask"].sum().item()) / args.batch
    flops_text, flops_heavy = training_flops(cfg, args.seq, 0), training_flops(cfg, args.seq, latents)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "config": {k: v for k, v in vars(args).items() if k != "out"} | {"diffusion_targets_per_sequence": latents},  # no machine path
        "median_step_s": median,
        "latentlm_vs_gpt_text_time_ratio": median["latentlm_text"] / median["gpt_text"],
        "image_heavy_vs_text_time_ratio": median["latentlm_image_heavy"] / median["latentlm_text"],
        "image_heavy_vs_text_flop_ratio": flops_heavy / flops_text,
    }
    result["image_overhead_time_over_flop_ratio"] = (result["image_heavy_vs_text_time_ratio"]
                                                     / result["image_heavy_vs_text_flop_ratio"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"LatentLM / GPTModel step time on text:             {result['latentlm_vs_gpt_text_time_ratio']:.3f}")
    print(f"image-heavy / text step time:                      {result['image_heavy_vs_text_time_ratio']:.3f}")
    print(f"image-heavy / text model FLOPs:                    {result['image_heavy_vs_text_flop_ratio']:.3f}")
    print(f"(time ratio) / (FLOP ratio) for image-heavy batch: {result['image_overhead_time_over_flop_ratio']:.3f}")
    print(f"wrote {args.out}")
    shutdown_distributed()


if __name__ == "__main__":
    main()
