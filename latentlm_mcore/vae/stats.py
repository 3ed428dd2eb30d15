"""Per-channel statistics of μ, stored with the σ-VAE so the language model sees latents at unit scale."""

from dataclasses import dataclass

import torch


@dataclass
class LatentStats:
    mean: torch.Tensor  # [latent_dim]
    std: torch.Tensor  # [latent_dim]

    def scale(self, mu: torch.Tensor) -> torch.Tensor:
        return (mu - self.mean.to(mu)) / self.std.to(mu)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z) + self.mean.to(z)

    def to_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentStats":
        mean = torch.tensor(d["mean"], dtype=torch.float32)
        std = torch.tensor(d["std"], dtype=torch.float32)
        if mean.shape != std.shape or mean.dim() != 1:
            raise ValueError(f"LatentStats mean/std must be equal-length lists, got {mean.shape} and {std.shape}")
        return cls(mean, std)


@torch.no_grad()
def compute_latent_stats(vae, images_or_iterable, batch_size: int = 64, min_std: float = 1e-6) -> LatentStats:
    """Mean/std of μ per latent channel, over every position of every image given.

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
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0) * count / (count - 1)
    return LatentStats(mean.float().cpu(), var.sqrt().clamp_min(min_std).float().cpu())
