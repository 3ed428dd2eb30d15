"""The samplers against a case with a known answer: a Gaussian target, whose exact denoiser and
probability-flow ODE are closed-form."""
import pytest
import torch

from latentlm_mcore.diffusion import NoiseSchedule
from latentlm_mcore.diffusion.samplers import (classifier_free_guidance, ddpm_sample, dpm_solver_pp_sample,
                                               sampling_timesteps)

MU, STD = 0.7, 0.5  # target x0 ~ N(MU, STD^2) per channel


def exact_x0(x_t, alpha_bar):
    """E[x0 | x_t] for the Gaussian target."""
    a, var = alpha_bar.sqrt(), 1 - alpha_bar
    return MU + a * STD ** 2 / (alpha_bar * STD ** 2 + var) * (x_t - a * MU)


def exact_denoiser(schedule: NoiseSchedule, mu=MU):
    """The model output (v or eps, per the schedule) that the perfect network would give."""
    ac = schedule.alphas_cumprod

    def denoise(x_t, t):
        alpha_bar = ac[t].unsqueeze(-1)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = mu + a * STD ** 2 / (alpha_bar * STD ** 2 + s ** 2) * (x_t - a * mu)
        eps = (x_t - a * x0) / s
        return eps if schedule.prediction == "eps" else a * eps - s * x0

    return denoise


def ode_solution(noise, schedule):
    """The probability-flow ODE of a Gaussian keeps z = (x_t - a_t MU) / sqrt(a_t^2 STD^2 + s_t^2)
    fixed; the sampler's answer is the exact x0 prediction at the exact ODE state at t = 0."""
    ac = schedule.alphas_cumprod
    a_T, a_0 = ac[-1], ac[0]
    z = (noise - a_T.sqrt() * MU) / (a_T * STD ** 2 + 1 - a_T).sqrt()
    x_at_0 = a_0.sqrt() * MU + (a_0 * STD ** 2 + 1 - a_0).sqrt() * z
    return exact_x0(x_at_0, a_0)


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_dpm_solver_pp_solves_the_gaussian_ode(prediction):
    schedule = NoiseSchedule(1000, prediction)
    noise = torch.randn(512, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = ode_solution(noise, schedule)
    errors = {}
    for steps in (20, 40, 1000):
        out = dpm_solver_pp_sample(exact_denoiser(schedule), noise, schedule.alphas_cumprod, prediction, steps)
        errors[steps] = (out - exact).abs().max().item()
    # every integer timestep: the discretisation error vanishes
    assert errors[1000] < 2e-4, errors
    # second order: doubling the steps cuts the error by about 4 (at least 3). The 20-step error
    # (worst of 4096 values) is that of a uniform-in-t grid on the cosine schedule, whose first and
    # last steps are long in log-SNR; diffusers' DPMSolverMultistepScheduler uses the same grid.
    assert errors[20] / errors[40] > 3.0, errors
    assert errors[20] < 0.25, errors
    # the samples have the target's distribution (the map is deterministic and exact here)
    out = dpm_solver_pp_sample(exact_denoiser(schedule), noise, schedule.alphas_cumprod, prediction, 20)
    assert abs(out.mean().item() - MU) < 0.05 and abs(out.std().item() - STD) < 0.05


def test_ddpm_ancestral_samples_the_gaussian_target():
    schedule = NoiseSchedule(1000, "v")
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(8000, 4, dtype=torch.float64, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 1000 small steps: threads only contend with whatever else runs
    try:
        out = ddpm_sample(exact_denoiser(schedule), noise, schedule.alphas_cumprod, "v", generator=g)
    finally:
        torch.set_num_threads(threads)
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - STD) < 0.01


def test_classifier_free_guidance_extrapolates_the_denoiser():
    """Conditional stream targets MU, unconditional 0: guidance scale w moves the target mean to
    w * MU (for this linear denoiser exactly, up to the solver's error)."""
    schedule = NoiseSchedule(1000, "v")
    cond, uncond = exact_denoiser(schedule, MU), exact_denoiser(schedule, 0.0)

    def stacked(x, t):
        n = x.shape[0] // 2
        return torch.cat([cond(x[:n], t[:n]), uncond(x[n:], t[n:])])

    noise = torch.zeros(4, 3, dtype=torch.float64)  # z = 0: the ODE ends at the mean
    out = dpm_solver_pp_sample(classifier_free_guidance(stacked, 1.0), noise, schedule.alphas_cumprod, "v", 50)
    assert torch.allclose(out, torch.full_like(out, MU), atol=1e-3)
    out = dpm_solver_pp_sample(classifier_free_guidance(stacked, 2.0), noise, schedule.alphas_cumprod, "v", 50)
    assert torch.allclose(out, torch.full_like(out, 2 * MU), atol=1e-2)


def test_sampling_timesteps():
    assert sampling_timesteps(1000, 20)[0] == 999 and sampling_timesteps(1000, 20)[-1] == 0
    assert len(sampling_timesteps(1000, 20)) == 20
    with pytest.raises(ValueError, match="steps"):
        sampling_timesteps(1000, 0)
