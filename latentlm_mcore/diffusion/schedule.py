"""Gaussian diffusion over latent vectors: cosine beta schedule, forward noising, targets, loss.

Discrete time t in [0, T) with T = 1000 (DDPM training, paper appendix B). The schedule is kept
in float64 and indexed per call, so casting the model to bf16 never touches it.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

Prediction = Literal["v", "eps"]


def cosine_alphas_cumprod(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar_t of the cosine schedule (Nichol & Dhariwal 2021), betas clipped at max_beta."""
    def f(t):
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor(
        [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_timesteps)], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class NoiseSchedule:
    def __init__(self, num_timesteps: int = 1000, prediction: Prediction = "v"):
        if prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be 'v' or 'eps', got {prediction!r}")
        self.num_timesteps = num_timesteps
        self.prediction = prediction
        self.alphas_cumprod = cosine_alphas_cumprod(num_timesteps)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor):
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) broadcastable against `like` [..., D]."""
        ac = self.alphas_cumprod.to(t.device)[t]
        shape = t.shape + (1,) * (like.dim() - t.dim())
        return ac.sqrt().reshape(shape).to(like.dtype), (1 - ac).sqrt().reshape(shape).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(t, x0)
        return a * x0 + b * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        a, b = self.coefficients(t, x0)
        return a * noise - b * x0


def diffusion_loss(head, schedule: NoiseSchedule, condition: torch.Tensor, x0: torch.Tensor,
                   timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-latent diffusion loss, averaged over the batch_mul timesteps and latent channels.

    condition [n, H] (Transformer hidden states), x0 [n, D] (clean next latents),
    timesteps [n, k] int, noise [n, k, D] -> [n] float32.
    """
    n, k = timesteps.shape
    cond = head.embed_condition(condition)  # once per latent, shared by its k noised copies
    cond = cond.unsqueeze(1).expand(n, k, cond.shape[-1]).reshape(n * k, -1)
    x0k = x0.unsqueeze(1).expand(n, k, x0.shape[-1])
    x_t = schedule.add_noise(x0k, noise, timesteps)
    pred = head(x_t.reshape(n * k, -1), timesteps.reshape(-1), cond).reshape(n, k, -1)
    target = schedule.target(x0k, noise, timesteps)
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2))
