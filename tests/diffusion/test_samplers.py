"""The samplers against cases with a known answer: a Gaussian target, whose exact denoiser and
probability-flow ODE are closed-form, and a Gaussian mixture (non-Gaussian, exact denoiser closed-form,
ODE solved finely by RK4), with diffusers' DPMSolverMultistepScheduler as the reference solver."""
import math

import diffusers  # the test extra's reference solver
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
    # (nearly) every integer timestep: the discretisation error vanishes
    assert errors[1000] < 2e-4, errors
    # second order in the bulk (doubling the steps cuts the error by 3; the first-order final step to
    # noise level 0 keeps it from 4); worst of 4096 values at 20 steps
    assert errors[20] / errors[40] > 2.5, errors
    assert errors[20] < 0.01, errors
    # the samples have the target's distribution (the map is deterministic and exact here)
    out = dpm_solver_pp_sample(exact_denoiser(schedule), noise, schedule.alphas_cumprod, prediction, 20)
    assert abs(out.mean().item() - MU) < 0.05 and abs(out.std().item() - STD) < 0.05


@pytest.mark.slow  # over ~3 s loaded (fast-tier measurement, 2026-12-04)
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


def test_sampling_timesteps_are_diffusers_grid():
    assert sampling_timesteps(1000, 20)[0] == 999 and sampling_timesteps(1000, 20)[-1] == 50
    for steps in (1, 5, 10, 20, 50, 100):
        scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        scheduler.set_timesteps(steps)
        assert sampling_timesteps(1000, steps) == scheduler.timesteps.tolist(), steps
    assert len(set(sampling_timesteps(1000, 1000))) == len(sampling_timesteps(1000, 1000))
    with pytest.raises(ValueError, match="steps"):
        sampling_timesteps(1000, 0)


# ---------------------------------------------------------------- a non-Gaussian target, against diffusers
# x0 per channel ~ sum_k w_k N(m_k, s_k^2): three separated modes, two of them sharp
WEIGHTS, MEANS, STDS = torch.tensor([0.3, 0.5, 0.2]), torch.tensor([-1.5, 0.4, 2.0]), torch.tensor([0.15, 0.3, 0.1])


def mixture_x0(x_t, alpha_bar):
    """E[x0 | x_t]: the posterior mean of each component, weighted by its posterior probability."""
    a = alpha_bar.sqrt().to(torch.float64)
    var = a * a * STDS.double() ** 2 + (1 - alpha_bar)
    x = x_t.unsqueeze(-1)
    log_w = WEIGHTS.double().log() - 0.5 * var.log() - 0.5 * (x - a * MEANS.double()) ** 2 / var
    means = MEANS.double() + a * STDS.double() ** 2 / var * (x - a * MEANS.double())
    return (torch.softmax(log_w, dim=-1) * means).sum(-1)


def mixture_denoiser(alphas_cumprod, prediction):
    def denoise(x_t, t):
        alpha_bar = alphas_cumprod[t[0]].to(torch.float64)  # one timestep per call in every sampler
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0 = mixture_x0(x_t, alpha_bar)
        eps = (x_t - a * x0) / s
        return eps if prediction == "epsilon" else a * eps - s * x0

    return denoise


def probability_flow_solution(noise, alphas_cumprod, steps=1000):
    """The 1000-step solution: RK4 on the probability-flow ODE in y = x / alpha over u = log(sigma / alpha)
    (dy/du = y - x0(y)), from t = T-1 to t = 0, then the exact x0 at t = 0. Independent of any sampler's grid;
    it agrees with 2000 RK4 steps to 3e-6."""
    ac = alphas_cumprod.to(torch.float64)
    rho = lambda t: ((1 - ac[t]) / ac[t]).sqrt()  # noqa: E731

    def slope(u, y):
        alpha_bar = 1 / (1 + math.exp(2 * u))
        return y - mixture_x0(y * math.sqrt(alpha_bar), torch.tensor(alpha_bar, dtype=torch.float64))

    y = noise.double() / ac[-1].sqrt()
    us = torch.linspace(rho(-1).log().item(), rho(0).log().item(), steps + 1, dtype=torch.float64).tolist()
    for u, u_next in zip(us[:-1], us[1:]):
        h = u_next - u
        k1 = slope(u, y)
        k2 = slope(u + h / 2, y + h / 2 * k1)
        k3 = slope(u + h / 2, y + h / 2 * k2)
        k4 = slope(u + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return mixture_x0(y * ac[0].sqrt(), ac[0])


def diffusers_sample(noise, steps, prediction):
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction,
        algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(steps)
    denoise = mixture_denoiser(scheduler.alphas_cumprod, prediction)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(denoise(x, t.reshape(1)), t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def mixture_case():
    noise = torch.randn(2048, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return noise, probability_flow_solution(noise, NoiseSchedule(1000, "v").alphas_cumprod)


def test_schedule_and_targets_are_diffusers_conventions():
    """Like for like: our cosine schedule is diffusers' squaredcos_cap_v2 (betas_for_alpha_bar cosine, betas
    clipped at 0.999), our v target its get_velocity, our noising its add_noise."""
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                   prediction_type="v_prediction")
    ours = NoiseSchedule(1000, "v")
    torch.testing.assert_close(ours.alphas_cumprod, ddpm.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    g = torch.Generator().manual_seed(1)
    x0, noise, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.tensor([0, 1, 50, 500, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.target(x0, noise, t), ddpm.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.slow  # the module mixture_case fixture solves the probability-flow ODE in float64: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_dpm_solver_pp_is_diffusers_step_for_step(mixture_case, prediction, steps):
    noise, _ = mixture_case
    ac = NoiseSchedule(1000, "v").alphas_cumprod
    ours = dpm_solver_pp_sample(mixture_denoiser(ac, prediction), noise, ac,
                                "v" if prediction == "v_prediction" else "eps", steps)
    reference = diffusers_sample(noise, steps, prediction)
    if prediction == "v_prediction":  # diffusers steps in float32: agreement to that precision
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    else:  # x0 = (x - sigma * eps) / alpha divides diffusers' float32 rounding by alpha = 5e-5 at t = T-1
        assert (ours - reference).pow(2).mean().sqrt() < 1e-3


@pytest.mark.slow  # the module mixture_case fixture solves the probability-flow ODE in float64: over ~3 s loaded (fast-tier measurement, 2026-12-04)
def test_dpm_solver_pp_20_steps_no_less_accurate_than_diffusers(mixture_case):
    noise, exact = mixture_case
    ac = NoiseSchedule(1000, "v").alphas_cumprod

    def rms_error(x):
        return (x - exact).pow(2).mean().sqrt().item()

    ours = {n: rms_error(dpm_solver_pp_sample(mixture_denoiser(ac, "v_prediction"), noise, ac, "v", n))
            for n in (10, 20, 1000)}
    reference = rms_error(diffusers_sample(noise, 20, "v_prediction"))
    assert ours[1000] < 1e-3, ours  # the 1000-step solution is what both converge to
    assert ours[20] <= reference * (1 + 1e-3), (ours, reference)
    assert ours[10] < 0.15 and ours[20] < 0.06, ours  # the old uniform T-1 -> 0 grid: 0.24 and 0.066
    # the exact transport maps noise to the mixture: its mean and spread come out
    sample = dpm_solver_pp_sample(mixture_denoiser(ac, "v_prediction"), noise, ac, "v", 20)
    mean = (WEIGHTS * MEANS).sum().item()
    std = ((WEIGHTS * (STDS ** 2 + MEANS ** 2)).sum().item() - mean ** 2) ** 0.5
    assert abs(sample.mean().item() - mean) < 0.05 and abs(sample.std().item() - std) < 0.05
