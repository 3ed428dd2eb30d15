from latentlm_mcore.diffusion.samplers import (classifier_free_guidance, ddpm_sample, dpm_solver_pp_sample,
                                               sampling_timesteps)
from latentlm_mcore.diffusion.schedule import NoiseSchedule, cosine_alphas_cumprod, diffusion_loss

__all__ = ["NoiseSchedule", "classifier_free_guidance", "cosine_alphas_cumprod", "ddpm_sample", "diffusion_loss",
           "dpm_solver_pp_sample", "sampling_timesteps"]
