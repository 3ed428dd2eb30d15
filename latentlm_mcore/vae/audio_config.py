"""Audio σ-VAE configuration and presets (paper §3.3.1).

The paper's tokenizer: a causal 1-D ConvNeXt encoder whose downsampling layers reduce 24 kHz audio by
[2, 4, 5, 5, 8] (1600x, 15 Hz latents of dim 32), [4, 4, 5, 5, 8] (3200x, 7.5 Hz, dim 64) or [4, 5, 5, 8, 8]
(6400x, 3.75 Hz, dim 128); channels double at each downsampling from 32 to 1024; the decoder mirrors it.
The σ noise and its C_σ law are the image σ-VAE's (`vae.model.sample_sigma_latents`).
"""

import math
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class AudioVAEConfig:
    sample_rate: int = 24000
    strides: tuple = (2, 4, 5, 5, 8)       # encoder downsampling factors, in order; the decoder reverses them
    channels: int = 32                     # width of the first stage; doubles at every downsampling
    max_channels: int = 1024
    blocks_per_stage: int = 2              # ConvNeXt blocks before each downsampling (and after each upsampling)
    kernel_size: int = 7                   # depthwise causal kernel of a ConvNeXt block
    latent_dim: int = 32
    c_sigma: float = 0.75                  # as SigmaVAEConfig.c_sigma: σ = n·C_σ/0.8, n ~ N(0, 1), per utterance
    beta: float = 1e-2                     # weight of the ‖μ‖² prior term

    def __post_init__(self):
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        for name in ("sample_rate", "channels", "max_channels", "kernel_size", "latent_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AudioVAEConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.strides or any(s <= 0 for s in self.strides):
            raise ValueError(f"AudioVAEConfig.strides must be positive integers, got {self.strides}")
        if self.blocks_per_stage < 0:
            raise ValueError("AudioVAEConfig.blocks_per_stage must be >= 0")
        if self.c_sigma < 0 or self.beta < 0:
            raise ValueError("AudioVAEConfig.c_sigma and beta must be >= 0")

    @property
    def hop_length(self) -> int:
        """Audio samples per latent (the compression ratio per channel of one latent vector)."""
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> float:
        """Latents per second."""
        return self.sample_rate / self.hop_length

    def stage_channels(self) -> list[int]:
        """Width of each encoder stage, the first one's and then one after every downsampling."""
        return [min(self.channels * 2 ** i, self.max_channels) for i in range(len(self.strides) + 1)]

    @classmethod
    def from_dict(cls, d: dict) -> "AudioVAEConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown AudioVAEConfig fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "AudioVAEConfig":
        return replace(self, **changes)


AUDIO_VAE_PRESETS = {
    # Paper Table 5 rows: 15 / 7.5 / 3.75 Hz at 24 kHz, latent dim 32 / 64 / 128. The paper gives no block
    # count per stage or C_σ. Deviation: 3 blocks per stage give an encoder of 18.6M parameters (decoder 23.8M
    # at 15 Hz), not the paper's "around 120 million"; its block counts are unpublished. C_σ and β are the
    # image σ-VAE's defaults.
    "15hz": AudioVAEConfig(sample_rate=24000, strides=(2, 4, 5, 5, 8), latent_dim=32, blocks_per_stage=3),
    "7.5hz": AudioVAEConfig(sample_rate=24000, strides=(4, 4, 5, 5, 8), latent_dim=64, blocks_per_stage=3),
    "3.75hz": AudioVAEConfig(sample_rate=24000, strides=(4, 5, 5, 8, 8), latent_dim=128, blocks_per_stage=3),
    # The CPU demo (spoken digits): 16 kHz, 400x (40 Hz latents of dim 16), narrow stages. A 2-core machine
    # cannot train the 24 kHz models in minutes; espeak-ng speaks at 22 kHz and its digits are intelligible at
    # 16 kHz, where the recognizer (pocketsphinx, a 16 kHz model) reads them.
    "tiny": AudioVAEConfig(sample_rate=16000, strides=(2, 4, 5, 10), channels=16, max_channels=128,
                           blocks_per_stage=1, latent_dim=16, c_sigma=0.4),
}
