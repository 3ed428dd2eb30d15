import math

import pytest
import torch

from latentlm_mcore.diffusion import NoiseSchedule, cosine_alphas_cumprod, diffusion_loss


def test_cosine_schedule_shape_and_endpoints():
    ac = cosine_alphas_cumprod(1000)
    assert ac.shape == (1000,) and ac.dtype == torch.float64
    assert torch.all(ac[1:] < ac[:-1]), "alpha_bar must decrease"
    assert ac[0] > 0.9999 and ac[-1] < 1e-4
    # closed form of the cosine schedule at the midpoint (betas are not clipped there)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert ac[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_the_samplers_x0_inverts_the_training_target(prediction):
    """Training (NoiseSchedule.target) and sampling (samplers.predict_x0) agree on what the head predicts."""
    from latentlm_mcore.diffusion.samplers import predict_x0
    sched = NoiseSchedule(1000, prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g, dtype=torch.float64)
    for step in (0, 10, 500, 999):
        t = torch.tensor([step])
        x_t = sched.add_noise(x0, noise, t)
        torch.testing.assert_close(predict_x0(x_t, sched.target(x0, noise, t), sched.alphas_cumprod[step], prediction), x0)


def test_v_target_definition():
    sched = NoiseSchedule(1000, "v")
    x0, noise, t = torch.ones(1, 2, dtype=torch.float64), torch.full((1, 2), 2.0, dtype=torch.float64), torch.tensor([300])
    a, b = sched.alphas_cumprod[300].sqrt(), (1 - sched.alphas_cumprod[300]).sqrt()
    torch.testing.assert_close(sched.target(x0, noise, t), (a * 2.0 - b * 1.0).expand(1, 2))


class _Oracle(torch.nn.Module):
    """A 'head' that returns the exact target it is given through the condition."""

    def embed_condition(self, h):
        return h

    def forward(self, x_t, t, cond):
        return cond


def test_diffusion_loss_shapes_and_zero_for_exact_prediction():
    sched = NoiseSchedule(1000, "eps")
    n, k, d = 5, 4, 3
    noise = torch.randn(n, k, d)
    # the condition carries the noise of the first timestep; all k copies share it, so use k equal noises
    noise = noise[:, :1].expand(n, k, d).contiguous()
    loss = diffusion_loss(_Oracle(), sched, noise[:, 0], torch.randn(n, d), torch.randint(0, 1000, (n, k)), noise)
    assert loss.shape == (n,) and loss.dtype == torch.float32
    assert torch.allclose(loss, torch.zeros(n), atol=1e-12)
    loss_bad = diffusion_loss(_Oracle(), sched, torch.zeros(n, d), torch.randn(n, d), torch.randint(0, 1000, (n, k)), noise)
    assert torch.all(loss_bad > 0)
