"""σ-VAE model configuration and named presets.

The loss weights live here too because they define what the exported model *is*: a σ-VAE trained with
C_σ = 0.5 has a different latent scale than one trained with C_σ = 2, and whoever loads the file should be
able to see which.
"""

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class SigmaVAEConfig:
    image_size: int = 32
    patch_size: int = 8
    in_channels: int = 3
    latent_dim: int = 16
    hidden: int = 64
    enc_layers: int = 2
    dec_layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    # σ ~ N(0, C_σ) per example (paper eq. 5), read as the official tokenizer code draws it: one scalar
    # σ = n·C_σ/0.8 with n ~ N(0, 1) per image, so C_σ is the mean noise scale (E|σ| = 0.9974·C_σ) and
    # C_σ/0.8 the standard deviation of σ (`sigma_std`). `model.sample_sigma_latents` is the one sampler.
    c_sigma: float = 0.75
    # Weight of the ‖μ‖² prior term (paper eq. 6). Both terms of the loss are per-element means, so β
    # trades mean squared pixel error against mean squared latent magnitude.
    beta: float = 1e-2

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_channels", "latent_dim", "hidden", "heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SigmaVAEConfig.{name} must be positive, got {getattr(self, name)}")
        if self.enc_layers < 0 or self.dec_layers < 0:
            raise ValueError("SigmaVAEConfig.enc_layers/dec_layers must be >= 0")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SigmaVAEConfig.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden % self.heads:
            raise ValueError(f"SigmaVAEConfig.hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.c_sigma < 0 or self.beta < 0:
            raise ValueError("SigmaVAEConfig.c_sigma and beta must be >= 0")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_latents(self) -> int:
        return self.grid_size ** 2

    @property
    def sigma_std(self) -> float:
        """Standard deviation of the per-image noise scale σ (see `c_sigma`)."""
        return self.c_sigma / 0.8

    @classmethod
    def from_dict(cls, d: dict) -> "SigmaVAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SigmaVAEConfig fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "SigmaVAEConfig":
        return replace(self, **changes)


SIGMA_VAE_PRESETS = {
    # Seconds on a CPU: 32px images, 16 latents of 16 channels. C_σ 0.4: σ's standard deviation is 0.5, the
    # noise these presets were tuned with.
    "tiny": SigmaVAEConfig(image_size=32, patch_size=8, latent_dim=16, hidden=64, enc_layers=2, dec_layers=2,
                           heads=4, mlp_ratio=4.0, c_sigma=0.4, beta=1e-2),
    # scripts/quickstart.sh: sklearn's 8x8 digits upscaled to 16px; 4 latents of 16 channels each (a 4x4 block of
    # the original digit): few latents per image is what a ten-minute LM run can learn to draw coherently.
    "quickstart": SigmaVAEConfig(image_size=16, patch_size=8, latent_dim=16, hidden=64, enc_layers=2, dec_layers=2,
                                 heads=4, mlp_ratio=4.0, c_sigma=0.4, beta=1e-2),
    # Paper §3.1.3 / appendix B: ViT-B encoder and decoder, 12 + 12 layers, patch 16, latent dim 32. The paper
    # gives no C_σ; 0.75 is the official image σ-VAE's default, β = 1e-2 its kl_weight. Training recipe:
    # `vae.trainer.TRAIN_PRESETS["paper"]`.
    "paper": SigmaVAEConfig(image_size=256, patch_size=16, latent_dim=32, hidden=768, enc_layers=12,
                            dec_layers=12, heads=12, mlp_ratio=4.0, c_sigma=0.75, beta=1e-2),
}
