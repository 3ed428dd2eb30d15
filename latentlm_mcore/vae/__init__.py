"""σ-VAE tokenizers (paper §2.3): continuous data -> latent vectors that the language model predicts.

These names are the encoder interface `latentlm_mcore.data` may use (tests/test_imports.py keeps it so)."""

from latentlm_mcore.vae.audio_model import load_audio_vae
from latentlm_mcore.vae.config import SIGMA_VAE_PRESETS, SigmaVAEConfig
from latentlm_mcore.vae.model import SigmaVAE, load_sigma_vae, sample_sigma_latents, save_sigma_vae
from latentlm_mcore.vae.stats import LatentStats, compute_latent_stats, stats_from_moments


def load_vae(path, map_location="cpu"):
    """The σ-VAE file at `path`, image (`load_sigma_vae`) or audio (`load_audio_vae`) by the file's kind: a
    checkpoint's provenance names one σ-VAE file, either kind."""
    import os

    import torch

    from latentlm_mcore.vae.audio_model import AUDIO_VAE_KIND, load_audio_vae

    try:  # mmap: only the small header is read to learn the kind
        kind = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True).get("kind")
    except Exception:  # let the image loader name what is wrong with the file
        kind = None
    return (load_audio_vae if kind == AUDIO_VAE_KIND else load_sigma_vae)(path, map_location)

__all__ = ["SigmaVAEConfig", "SIGMA_VAE_PRESETS", "SigmaVAE", "LatentStats", "compute_latent_stats",
           "save_sigma_vae", "load_sigma_vae", "load_vae", "load_audio_vae", "sample_sigma_latents", "stats_from_moments"]
