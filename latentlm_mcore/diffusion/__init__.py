from latentlm_mcore.diffusion.schedule import NoiseSchedule, cosine_alphas_cumprod, diffusion_loss

__all__ = ["NoiseSchedule", "cosine_alphas_cumprod", "diffusion_loss"]
