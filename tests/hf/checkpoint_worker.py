"""Runs under torchrun: writes the tiny LatentLM checkpoints the export and generation tests use.

  --phase save     (2 processes) builds the model at TP=2 (GQA, a diffusion head with non-zero AdaLN
                   so its output is not trivially zero), saves `ckpt_tp2` (iter_0000001 + latest +
                   run_config.json with the Provenance naming the tokenizer and the σ-VAE by hash, a copy of
                   the σ-VAE beside it), and records the Megatron outputs
                   (logits gathered over TP, hidden states, head outputs) on a fixed mixed batch.
  --phase reshard  (1 process) loads `ckpt_tp2` at TP=1 through the inference loader, saves it as
                   `ckpt_tp1`, converts that to Hugging Face in-process (`hf_tp1`, and `hf_bf16` in
                   bf16), records the loader's error on a checkpoint with a shard file removed, and
                   compares megatron's static KV cache with recomputing the prefix in generation.
"""
import argparse
import json
import os
import shutil

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from latentlm_mcore.config import LatentLMConfig, ModelConfig, ParallelConfig
from latentlm_mcore.data.tokenizer import TiktokenTokenizer, sha256_file
from latentlm_mcore.model import build_model, local_block_spec, transformer_config
from latentlm_mcore.training.checkpoint import LATEST, iteration_dirname, save_model, save_run_config
from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed
from latentlm_mcore.training.provenance import Provenance, keep_sigma_vae_beside

LATENT_DIM = 16  # the tiny σ-VAE's


def model_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                       vocab_size=vocab_size, seq_length=64, latent_dim=LATENT_DIM, head_layers=2,
                       head_hidden_size=48, head_ffn_hidden_size=80, rotary_base=500)


def fixed_inputs(vocab_size: int):
    """Two sequences of 20: text, then an image run of 6 latents (second row), then text."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab_size, (2, 20), generator=g)
    latents = torch.randn(2, 20, LATENT_DIM, generator=g)
    latent_mask = torch.zeros(2, 20, dtype=torch.bool)
    latent_mask[1, 8:14] = True
    x_t = torch.randn(5, LATENT_DIM, generator=g)
    t = torch.tensor([0, 17, 250, 611, 999])
    return ids, latents, latent_mask, x_t, t


def save_checkpoint(model, cfg, directory, provenance):
    path = os.path.join(directory, iteration_dirname(1))
    save_model([model], path)
    if dist.get_rank() == 0:
        save_run_config(path, cfg, provenance)
        keep_sigma_vae_beside(directory, provenance)
        with open(os.path.join(directory, LATEST), "w") as f:
            f.write(iteration_dirname(1))
    dist.barrier()


def set_speech_stop_rows(model, tok):
    """Make the speech stop (<EOD> vs <LATENT> at a latent) a coin flip on the hidden state: the two output rows
    are a shared random row and that row plus a small random one, so their difference is a random direction
    (an untrained model otherwise prefers one of them everywhere). Each TP rank writes the rows it holds."""
    weight = model.output_layer.weight  # vocab-parallel: this rank's rows
    start = ps.get_tensor_model_parallel_rank() * weight.shape[0]
    g = torch.Generator().manual_seed(9)
    base, delta = torch.randn(2, weight.shape[1], generator=g) * 0.05
    for token, row in ((tok.latent_id, base), (tok.eod_id, base + delta)):
        if start <= token < start + weight.shape[0]:
            weight[token - start] = row


def phase_save(args, tok):
    cfg = LatentLMConfig(name="test-tiny", model=model_config(tok.vocab_size),
                         parallel=ParallelConfig(tensor_parallel=2))
    init_distributed(cfg.parallel, seed=11)
    config = transformer_config(cfg.model, cfg.parallel)
    model = build_model(cfg.model, config, block_spec=local_block_spec(config))
    with torch.no_grad():  # AdaLN-Zero starts the head at exactly zero output: make it do something
        g = torch.Generator().manual_seed(5)  # same draws on every TP rank: the head stays replicated
        for p in model.diffusion_head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if args.speech:
            set_speech_stop_rows(model, tok)
    save_checkpoint(model, cfg, os.path.join(args.out, "ckpt_tp2"),
                    Provenance(tokenizer=args.tokenizer, sigma_vae_sha256=sha256_file(args.sigma_vae),
                               sigma_vae_path=args.sigma_vae))

    model.eval()
    ids, latents, latent_mask, x_t, t = fixed_inputs(tok.vocab_size)
    with torch.no_grad():
        logits, hidden = model(ids, torch.arange(20).expand(2, 20), latents=latents, latent_mask=latent_mask)
        parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        head = model.diffusion_head
        condition = head.embed_condition(hidden[1, 7:12])
        head_out = head(x_t, t, condition)
    if dist.get_rank() == 0:
        torch.save({"logits": torch.cat(parts, dim=-1), "hidden": hidden, "head_out": head_out,
                    "inputs": (ids, latents, latent_mask, x_t, t)}, os.path.join(args.out, "megatron_outputs.pt"))


def phase_reshard(args, tok):
    from latentlm_mcore.hf.convert import convert_checkpoint
    from latentlm_mcore.inference.megatron import load_megatron_model

    model, cfg, provenance, _ = load_megatron_model(os.path.join(args.out, "ckpt_tp2"))
    cfg.parallel = ParallelConfig()
    save_checkpoint(model, cfg, os.path.join(args.out, "ckpt_tp1"), provenance)
    convert_checkpoint(os.path.join(args.out, "ckpt_tp1"), os.path.join(args.out, "hf_tp1"))
    convert_checkpoint(os.path.join(args.out, "ckpt_tp1"), os.path.join(args.out, "hf_bf16"), dtype="bf16")

    broken = os.path.join(args.out, "ckpt_broken")
    shutil.copytree(os.path.join(args.out, "ckpt_tp2"), broken)
    iter_dir = os.path.join(broken, iteration_dirname(1))
    os.remove(os.path.join(iter_dir, sorted(f for f in os.listdir(iter_dir) if f.endswith(".distcp"))[-1]))
    try:
        load_megatron_model(broken)
        error = None
    except (RuntimeError, FileNotFoundError) as e:
        error = f"{type(e).__name__}: {e}"
    with open(os.path.join(args.out, "broken_error.json"), "w") as f:
        json.dump({"error": error}, f)

    from latentlm_mcore.inference.generation import SamplingConfig, SpecialTokens, generate
    from latentlm_mcore.inference.megatron import megatron_decoder

    special = SpecialTokens(tok.bod_id, tok.eod_id, tok.latent_id, tok.end_of_document_id, latents_per_image=16)
    prompts = [[tok.end_of_document_id, *tok.encode("a red cat"), tok.bod_id],  # text -> image
               [tok.end_of_document_id, *tok.encode("the green grass near the lake")]]  # text continuation
    sampling = SamplingConfig(max_new_tokens=24, top_p=0.9, cfg_scale=2.0, diffusion_steps=8, seed=5)
    cached = generate(megatron_decoder(model, use_cache=True), prompts, special, sampling, progress=False)
    recomputed = generate(megatron_decoder(model, use_cache=False), prompts, special, sampling, progress=False)
    with open(os.path.join(args.out, "megatron_kv_cache.json"), "w") as f:
        json.dump({"tokens": [s.tokens for s in cached], "recomputed_tokens": [s.tokens for s in recomputed],
                   "max_latent_diff": max((a - b).abs().max().item() for x, y in zip(cached, recomputed)
                                          for a, b in zip(x.images, y.images))}, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["save", "reshard"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--sigma-vae", required=True)
    parser.add_argument("--speech", action="store_true", help="save: output rows for a speech stop that varies")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = TiktokenTokenizer(args.tokenizer)
    {"save": phase_save, "reshard": phase_reshard}[args.phase](args, tok)
    shutdown_distributed()


if __name__ == "__main__":  # dist_checkpointing starts worker processes: keep the guard
    main()
