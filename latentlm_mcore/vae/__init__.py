"""σ-VAE tokenizers (paper §2.3): continuous data -> latent vectors that the language model predicts.

These names are the encoder interface `latentlm_mcore.data` may use (tests/test_imports.py keeps it so)."""

from latentlm_mcore.vae.config import SIGMA_VAE_PRESETS, SigmaVAEConfig
from latentlm_mcore.vae.model import SigmaVAE, load_sigma_vae, sample_sigma_latents, save_sigma_vae
from latentlm_mcore.vae.stats import LatentStats, compute_latent_stats, stats_from_moments

__all__ = ["SigmaVAEConfig", "SIGMA_VAE_PRESETS", "SigmaVAE", "LatentStats", "compute_latent_stats",
           "save_sigma_vae", "load_sigma_vae", "sample_sigma_latents", "stats_from_moments"]
