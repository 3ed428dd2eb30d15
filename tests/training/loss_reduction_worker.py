"""Runs under torchrun: one global batch of 4 sequences (latents in the first two only, LM targets
of very different counts), its loss and gradients through `training.step.forward_backward` cut in
different ways, and the same objective by plain autograd as the reference.

  --phase splits (1 process)  reference: L = sum CE / N_LM + alpha * sum diffusion / N_Diff over the whole
                              batch by hand, one backward, no megatron schedule; then 1x4, 2x2 and 4x1
                              micro-batches (count x size) through the schedule. Writes the initial weights.
  --phase dp     (2 processes) DP=2, 2x1 and 1x2 micro-batches per rank from the same initial weights:
                              rank 1 holds no latent at all.
"""
import argparse
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from latentlm_mcore.config import ModelConfig, ParallelConfig
from latentlm_mcore.model import build_model, local_block_spec, transformer_config
from latentlm_mcore.training.distributed import init_distributed, shutdown_distributed
from latentlm_mcore.training.step import forward_backward, wrap_with_ddp
from latentlm_mcore.data.loader.synthetic import random_packed_batch

MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=256,
                    seq_length=32, latent_dim=8, head_layers=2, batch_mul=2, diffusion_loss_weight=2.5)
IMAGES = (2, 1, 0, 0)  # per sequence: with 2x2 micro-batches the second has no latent, with DP=2 rank 1 has none
LATENTS_PER_IMAGE = 6


def global_batch() -> list[dict]:
    """Four sequences (batch size 1 each). The last one is mostly padding: 6 LM targets against ~30."""
    seqs = [random_packed_batch(1, MODEL.seq_length, MODEL.vocab_size, MODEL.latent_dim, LATENTS_PER_IMAGE,
                                images_per_sequence=n, seed=100 + i) for i, n in enumerate(IMAGES)]
    seqs[-1]["loss_mask"][:, 6:] = 0.0
    return seqs


def stack(seqs: list[dict]) -> dict:
    return {k: torch.cat([s[k] for s in seqs]) for k in seqs[0]}


def micro_batches(seqs: list[dict], size: int) -> list[dict]:
    return [stack(seqs[i:i + size]) for i in range(0, len(seqs), size)]


def build(parallel: ParallelConfig):
    init_distributed(parallel, seed=7)
    config = transformer_config(MODEL, parallel)
    return build_model(MODEL, config, block_spec=local_block_spec(config))


def grads(model, attr: str) -> dict:
    return {name: getattr(p, attr).detach().clone() for name, p in model.named_parameters()}


def by_hand(model, seqs: list[dict]) -> dict:
    """The token-level objective of the whole batch, computed directly from the model's per-token and
    per-latent losses (no loss function, no schedule), and its gradients by one backward."""
    b = stack(seqs)
    lm, diff = model(b["tokens"], b["position_ids"], latents=b["latents"], latent_mask=b["latent_mask"],
                     labels=b["labels"], diffusion_targets=b["diffusion_targets"], diffusion_mask=b["diffusion_mask"],
                     noise_seed=b["noise_seed"])
    n_lm, n_diff = b["loss_mask"].sum(), b["diffusion_mask"].sum()
    lm_loss = (lm * b["loss_mask"]).sum() / n_lm
    diff_loss = diff.sum() / n_diff
    loss = lm_loss + MODEL.diffusion_loss_weight * diff_loss
    model.zero_grad(set_to_none=True)
    loss.backward()
    # per-sequence sums and counts: what a per-micro-batch mean would have averaged
    rows = b["diffusion_mask"].nonzero()[:, 0]  # the sequence of each latent target, in the model's row order
    per_seq = [{"lm_sum": (lm[i] * b["loss_mask"][i]).sum().item(), "lm_targets": b["loss_mask"][i].sum().item(),
                "diffusion_sum": diff[rows == i].sum().item(), "diffusion_targets": b["diffusion_mask"][i].sum().item()}
               for i in range(len(seqs))]
    return {"loss": loss.item(), "lm_loss": lm_loss.item(), "diffusion_loss": diff_loss.item(),
            "lm_targets": int(n_lm), "diffusion_targets": int(n_diff), "grads": grads(model, "grad"),
            "per_sequence": per_seq}


def through_schedule(chunks, model, batches: list[dict]) -> dict:
    losses = forward_backward(chunks, iter(batches), len(batches), MODEL.seq_length, batches[0]["tokens"].shape[0])
    return {**losses, "grads": grads(model, "main_grad")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["splits", "dp"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seqs, init = global_batch(), os.path.join(args.out, "init.pt")
    parallel = ParallelConfig(distributed_optimizer=False)
    model = build(parallel)
    results = {}
    if args.phase == "splits":
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in model.diffusion_head.parameters():  # leave AdaLN-Zero: every head parameter gets gradient
                p.add_(0.02 * torch.randn(p.shape, generator=g))
            # large logits: cross-entropies spread far from log(vocab), so how tokens are weighted shows
            model.output_layer.weight.add_(0.5 * torch.randn(model.output_layer.weight.shape, generator=g))
        torch.save(model.state_dict(), init)
        results["by_hand"] = by_hand(model, seqs)
        model.zero_grad(set_to_none=True)
        chunks = wrap_with_ddp([model], parallel)
        for count, size in ((1, 4), (2, 2), (4, 1)):
            results[f"{count}x{size}"] = through_schedule(chunks, model, micro_batches(seqs, size))
    else:
        model.load_state_dict(torch.load(init, weights_only=True))
        chunks = wrap_with_ddp([model], parallel)
        mine = seqs[2 * ps.get_data_parallel_rank():2 * ps.get_data_parallel_rank() + 2]
        for count, size in ((2, 1), (1, 2)):
            results[f"dp2_{count}x{size}"] = through_schedule(chunks, model, micro_batches(mine, size))
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(args.out, f"{args.phase}.pt"))
    shutdown_distributed()


if __name__ == "__main__":
    main()
