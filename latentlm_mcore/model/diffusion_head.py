"""DiffusionHead: the small network that denoises one latent vector given a Transformer state.

Paper 2.1 and the official design: condition c = Linear(RMSNorm(h)) + TimestepEmbedding(t); N
residual blocks of RMSNorm -> AdaLN modulate -> SwiGLU FFN -> gated residual (AdaLN-Zero init,
so every block starts as the identity); final AdaLN + Linear to latent_dim (zero init).

Plain torch modules on purpose: the head is data-parallel only (replicated on every tensor-parallel
rank, never sharded) and stays out of FP8.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_timestep_features(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    def __init__(self, width: int, num_features: int = 256):
        super().__init__()
        self.num_features = num_features
        self.mlp = nn.Sequential(nn.Linear(num_features, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_timestep_features(t, self.num_features).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class SwiGLU(nn.Module):
    def __init__(self, width: int, ffn_width: int):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * ffn_width, bias=False)
        self.down = nn.Linear(ffn_width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class HeadBlock(nn.Module):
    def __init__(self, width: int, ffn_width: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=eps)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        self.ffn = SwiGLU(width, ffn_width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada_ln(c).chunk(3, dim=-1)
        return x + gate * self.ffn(modulate(self.norm(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, latent_dim: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=eps, elementwise_affine=False)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.proj = nn.Linear(width, latent_dim, bias=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada_ln(c).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    def __init__(self, hidden_size: int, latent_dim: int, width: int, ffn_width: int, num_layers: int,
                 timestep_features: int = 256, eps: float = 1e-5, init_std: float = 0.02):
        super().__init__()
        self.condition_norm = nn.RMSNorm(hidden_size, eps=eps)
        self.condition_proj = nn.Linear(hidden_size, width, bias=False)
        self.timestep_embedding = TimestepEmbedding(width, timestep_features)
        self.latent_proj = nn.Linear(latent_dim, width, bias=False)
        self.blocks = nn.ModuleList(HeadBlock(width, ffn_width, eps) for _ in range(num_layers))
        self.final = FinalLayer(width, latent_dim, eps)
        self.reset_parameters(init_std)

    @classmethod
    def from_config(cls, cfg) -> "DiffusionHead":
        return cls(cfg.hidden_size, cfg.latent_dim, cfg.head_hidden_size, cfg.head_ffn_hidden_size,
                   cfg.head_layers, cfg.timestep_embedding_dim, cfg.norm_eps, cfg.init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # AdaLN-Zero: every block starts as the identity, the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.ada_ln[1].weight)
            nn.init.zeros_(block.ada_ln[1].bias)
        nn.init.zeros_(self.final.ada_ln[1].weight)
        nn.init.zeros_(self.final.ada_ln[1].bias)
        nn.init.zeros_(self.final.proj.weight)

    def embed_condition(self, hidden: torch.Tensor) -> torch.Tensor:
        """Linear(RMSNorm(h)): computed once per latent and shared by its noised copies."""
        return self.condition_proj(self.condition_norm(hidden))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x_t [N, latent_dim] noised latents, t [N] timesteps, condition [N, width] from
        `embed_condition` -> prediction [N, latent_dim] (v or eps, per the schedule)."""
        c = condition + self.timestep_embedding(t)
        x = self.latent_proj(x_t.to(self.latent_proj.weight.dtype))
        for block in self.blocks:
            x = block(x, c)
        return self.final(x, c)
