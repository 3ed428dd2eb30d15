"""Latent statistics stored with the σ-VAE, so the language model sees latents at unit scale.

Default (the official LatentLM code): one global shift and scale over every channel and position, of the
σ-VAE *samples* z = μ + σ·ε the language model trains on (their variance is Var μ + E σ² = Var μ + (C_σ/0.8)²,
computed exactly from the moments of μ). `per_channel` standardises each channel on its own; a channel's
std is floored at PER_CHANNEL_FLOOR × the global std, so near-dead channels are not blown up into noise
the diffusion head then has to model. Both store one value per channel (global: all equal), so every
reader (loader, inference, HF export) scales the same way.
"""

from dataclasses import dataclass

import numpy as np
import torch

NORMALISATIONS = ("global", "per_channel")
PER_CHANNEL_FLOOR = 0.1  # per-channel std >= this share of the global std


@dataclass
class LatentStats:
    mean: torch.Tensor  # [latent_dim]
    std: torch.Tensor  # [latent_dim]
    normalisation: str = "per_channel"  # files written before the global default have per-channel values

    def scale(self, mu: torch.Tensor) -> torch.Tensor:
        return (mu - self.mean.to(mu)) / self.std.to(mu)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z) + self.mean.to(z)

    def to_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std],
                "normalisation": self.normalisation}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentStats":
        mean = torch.tensor(d["mean"], dtype=torch.float32)
        std = torch.tensor(d["std"], dtype=torch.float32)
        if mean.shape != std.shape or mean.dim() != 1:
            raise ValueError(f"LatentStats mean/std must be equal-length lists, got {mean.shape} and {std.shape}")
        normalisation = d.get("normalisation", "per_channel")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"LatentStats normalisation {normalisation!r} is not one of {NORMALISATIONS}")
        return cls(mean, std, normalisation)


def stats_from_moments(count: int, total, total_sq, c_sigma: float, normalisation: str = "global") -> LatentStats:
    """Statistics from `count` latent vectors with per-channel sums `total` and sums of squares `total_sq`
    of μ. `c_sigma` > 0: of the σ-VAE samples (adds E σ² = (C_σ/0.8)² to every variance); 0: of μ."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"latent normalisation {normalisation!r} is not one of {NORMALISATIONS}")
    if count < 2:
        raise ValueError("latent statistics need at least two latent vectors")
    total, total_sq = np.asarray(total, np.float64), np.asarray(total_sq, np.float64)
    noise_var = (c_sigma / 0.8) ** 2
    dim = total.shape[0]
    global_mean = total.sum() / (count * dim)
    global_std = np.sqrt(max(total_sq.sum() / (count * dim) - global_mean ** 2, 0.0) + noise_var)
    if global_std <= 0:
        raise ValueError("every latent is the same value: nothing to scale by")
    if normalisation == "global":
        mean, std = np.full(dim, global_mean), np.full(dim, global_std)
    else:
        mean = total / count
        std = np.maximum(np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0) + noise_var),
                         PER_CHANNEL_FLOOR * global_std)
    return LatentStats(torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32), normalisation)


@torch.no_grad()
def compute_latent_stats(vae, images_or_iterable, batch_size: int = 64, normalisation: str = "global",
                         on_samples: bool = True) -> LatentStats:
    """Statistics of the latents of every image given (all positions): of the σ-VAE samples by default,
    of μ with `on_samples=False`.

    `images_or_iterable` is a tensor [N, C, H, W] (encoded `batch_size` at a time) or an iterable of such
    batches (a DataLoader, or a list). Sums are kept in float64 so millions of latents do not lose precision.
    """
    vae = getattr(vae, "module", vae)
    if isinstance(images_or_iterable, torch.Tensor):
        batches = images_or_iterable.split(batch_size)
    else:
        batches = images_or_iterable
    was_training = vae.training
    vae.eval()
    count, total, total_sq = 0, None, None
    for batch in batches:
        if isinstance(batch, (list, tuple)):  # (images, ...) from a DataLoader
            batch = batch[0]
        mu = vae.encode(batch).double().reshape(-1, vae.config.latent_dim)
        total = mu.sum(0) if total is None else total + mu.sum(0)
        total_sq = (mu * mu).sum(0) if total_sq is None else total_sq + (mu * mu).sum(0)
        count += mu.shape[0]
    vae.train(was_training)
    if count < 2:
        raise ValueError("compute_latent_stats needs at least one image (two latent vectors)")
    return stats_from_moments(count, total.cpu().numpy(), total_sq.cpu().numpy(),
                              vae.config.c_sigma if on_samples else 0.0, normalisation)
