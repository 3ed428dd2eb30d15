"""Random packed batches in the loader's format, for benchmarks and parallel-parity tests.

Each sequence holds text and `images_per_sequence` latent runs (<BOD>, num_latents placeholders,
<EOD>) at seeded random places; the fields follow the packer's batch contract exactly.
"""
from __future__ import annotations

import torch


def random_packed_batch(batch_size: int, seq_length: int, vocab_size: int, latent_dim: int,
                        num_latents: int, images_per_sequence: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    bod, eod, placeholder = vocab_size - 3, vocab_size - 2, vocab_size - 1
    run = num_latents + 2
    if images_per_sequence * run > seq_length:
        raise ValueError(f"{images_per_sequence} images of {num_latents} latents do not fit in {seq_length} tokens")
    tokens = torch.randint(0, vocab_size - 3, (batch_size, seq_length), generator=g)
    for row in tokens:
        free = seq_length - images_per_sequence * run
        starts = sorted(torch.randint(0, free + 1, (images_per_sequence,), generator=g).tolist())
        for i, start in enumerate(starts):
            at = start + i * run
            row[at], row[at + 1:at + 1 + num_latents], row[at + run - 1] = bod, placeholder, eod
    latent_mask = tokens == placeholder
    latents = torch.randn(batch_size, seq_length, latent_dim, generator=g) * latent_mask.unsqueeze(-1)
    next_is_latent = torch.zeros_like(latent_mask)
    next_is_latent[:, :-1] = latent_mask[:, 1:]
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = (~next_is_latent).float()
    loss_mask[:, -1] = 0.0
    diffusion_targets = torch.roll(latents, -1, dims=1) * next_is_latent.unsqueeze(-1)
    return {
        "tokens": tokens, "labels": labels, "loss_mask": loss_mask,
        "latent_mask": latent_mask, "latents": latents,
        "diffusion_mask": next_is_latent.float(), "diffusion_targets": diffusion_targets,
        "position_ids": torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1).contiguous(),
        "noise_seed": torch.randint(0, 2**31 - 1, (batch_size,), generator=g),
    }
