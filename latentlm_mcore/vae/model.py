"""Image σ-VAE (paper §2.3): a ViT encoder to per-patch latents μ and a ViT decoder back to pixels.

Training pass: μ = Encoder(x); z = μ + σ·ε with ε ~ N(0, I) and one scalar σ ~ N(0, C_σ) per example;
x̂ = Decoder(z). The fixed (not learned) noise scale is what keeps the latent variance from collapsing.
`encode` and `decode` are deterministic and are what the data pipeline uses offline; `sample_sigma_latents`
draws z from μ the way training does (the language model is meant to read such samples, paper §2.3).
"""

import os
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentlm_mcore.runtime.files import atomic_torch_save
from latentlm_mcore.vae.config import SigmaVAEConfig
from latentlm_mcore.vae.stats import LatentStats


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # bidirectional: a patch sees the whole image
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LayerNorm ViT block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: SigmaVAEConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.hidden, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_latents, cfg.hidden))
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.enc_layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.to_latent = nn.Linear(cfg.hidden, cfg.latent_dim)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, hidden], row-major patch order
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.to_latent(self.norm(x))


class ViTDecoder(nn.Module):
    def __init__(self, cfg: SigmaVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.from_latent = nn.Linear(cfg.latent_dim, cfg.hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_latents, cfg.hidden))
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.to_pixels = nn.Linear(cfg.hidden, cfg.patch_size ** 2 * cfg.in_channels)

    def forward(self, z):
        x = self.from_latent(z) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        patches = self.to_pixels(self.norm(x))  # [B, N, p*p*C]
        c, p, g = self.cfg.in_channels, self.cfg.patch_size, self.cfg.grid_size
        patches = patches.view(-1, g, g, p, p, c)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, g * p, g * p)


class SigmaVAE(nn.Module):
    def __init__(self, config: SigmaVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder(config)
        self.decoder = ViTDecoder(config)
        self.latent_stats: LatentStats | None = None
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.encoder.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.decoder.pos_embed, std=0.02)

    def _param(self):
        return next(self.parameters())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> μ [B, num_latents, latent_dim]. Deterministic."""
        cfg = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"SigmaVAE.encode expects images [B, {cfg.in_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}], got {tuple(images.shape)}")
        p = self._param()
        return self.encoder(images.to(device=p.device, dtype=p.dtype))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, num_latents, latent_dim] -> images [B, C, H, W], about [-1, 1]."""
        cfg = self.config
        if z.dim() != 3 or tuple(z.shape[1:]) != (cfg.num_latents, cfg.latent_dim):
            raise ValueError(f"SigmaVAE.decode expects z [B, {cfg.num_latents}, {cfg.latent_dim}], "
                             f"got {tuple(z.shape)}")
        p = self._param()
        return self.decoder(z.to(device=p.device, dtype=p.dtype))

    def forward(self, images: torch.Tensor):
        """Training pass with the σ noise: returns (reconstruction, μ)."""
        mu = self.encode(images)
        return self.decode(sample_sigma_latents(mu, self.config.c_sigma)), mu


def sample_sigma_latents(mu: torch.Tensor, c_sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = μ + σ·ε for μ [B, ...]: one scalar σ = n·C_σ/0.8, n ~ N(0, 1), per example (dim 0) and ε ~ N(0, I)
    per element — the official σ-VAE's draw, under which C_σ is the mean noise scale (E|σ| = 0.9974·C_σ).
    σ is drawn before ε, both from `generator` (the global RNG when None)."""
    shape = (mu.shape[0],) + (1,) * (mu.dim() - 1)
    n = torch.randn(shape, generator=generator, device=mu.device, dtype=torch.float32)
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=torch.float32)
    return (mu.float() + n * (c_sigma / 0.8) * eps).to(mu.dtype)


def _init_weights(module):
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        # Patch embedding is a linear map of the flattened patch; init it like one.
        nn.init.trunc_normal_(module.weight.view(module.weight.shape[0], -1), std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def save_sigma_vae(path, vae: SigmaVAE, latent_stats: LatentStats | None = None) -> None:
    """Write the exported σ-VAE as one torch file, atomically (a crash leaves any previous file intact)."""
    vae = getattr(vae, "module", vae)  # accept a DDP-wrapped model
    stats = latent_stats if latent_stats is not None else vae.latent_stats
    payload = {
        "config": asdict(vae.config),
        "state_dict": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
        "latent_stats": stats.to_dict() if stats is not None else None,
    }
    atomic_torch_save(payload, path)  # readers see the old file or the new one, never half of one


def load_sigma_vae(path, map_location="cpu") -> SigmaVAE:
    """Load a file written by `save_sigma_vae`; the returned model is in eval mode with `.latent_stats` set."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"σ-VAE checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"σ-VAE checkpoint {path} is not a readable torch file: {e}") from e
    if not isinstance(payload, dict) or not {"config", "state_dict"} <= set(payload):
        raise ValueError(f"σ-VAE checkpoint {path} lacks 'config'/'state_dict'; "
                         f"is it a trainer checkpoint rather than an exported σ-VAE?")
    vae = SigmaVAE(SigmaVAEConfig.from_dict(payload["config"]))
    try:
        vae.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"σ-VAE checkpoint {path} does not match its own config: {e}") from e
    stats = payload.get("latent_stats")
    vae.latent_stats = LatentStats.from_dict(stats) if stats is not None else None
    return vae.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
