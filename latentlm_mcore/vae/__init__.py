"""σ-VAE tokenizers (paper §2.3): continuous data -> latent vectors that the language model predicts."""

from latentlm_mcore.vae.config import SIGMA_VAE_PRESETS, SigmaVAEConfig
from latentlm_mcore.vae.model import SigmaVAE, load_sigma_vae, sample_sigma_latents, save_sigma_vae
from latentlm_mcore.vae.stats import LatentStats, compute_latent_stats

__all__ = ["SigmaVAEConfig", "SIGMA_VAE_PRESETS", "SigmaVAE", "LatentStats", "compute_latent_stats",
           "save_sigma_vae", "load_sigma_vae", "sample_sigma_latents"]
