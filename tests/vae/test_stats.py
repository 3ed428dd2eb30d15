import numpy as np
import pytest
import torch

from latentlm_mcore.vae import SIGMA_VAE_PRESETS, LatentStats, SigmaVAE, compute_latent_stats
from latentlm_mcore.vae.model import sample_sigma_latents
from latentlm_mcore.vae.stats import PER_CHANNEL_FLOOR, stats_from_moments


def test_scale_and_unscale_are_inverse_and_roundtrip_through_dict():
    stats = LatentStats(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.5]))
    mu = torch.randn(4, 7, 3, dtype=torch.float64)
    assert torch.allclose(stats.unscale(stats.scale(mu)), mu)
    assert stats.scale(mu).dtype == torch.float64
    restored = LatentStats.from_dict(stats.to_dict())
    assert torch.equal(restored.mean, stats.mean) and torch.equal(restored.std, stats.std)
    assert all(isinstance(v, float) for v in stats.to_dict()["mean"])


def test_compute_latent_stats_matches_direct_computation_for_tensor_and_iterable():
    """Per-channel option, on μ: the plain per-channel mean / std."""
    torch.manual_seed(0)
    vae = SigmaVAE(SIGMA_VAE_PRESETS["tiny"])
    images = torch.rand(10, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mu = vae.encode(images).reshape(-1, vae.config.latent_dim)
    kw = dict(normalisation="per_channel", on_samples=False)
    from_tensor = compute_latent_stats(vae, images, batch_size=3, **kw)
    from_batches = compute_latent_stats(vae, [images[:4], images[4:]], **kw)
    assert from_tensor.normalisation == "per_channel"
    assert torch.allclose(from_tensor.mean, mu.mean(0), atol=1e-6)
    assert torch.allclose(from_tensor.std, mu.std(0, unbiased=False), atol=1e-5)
    assert torch.allclose(from_tensor.mean, from_batches.mean, atol=1e-6)
    assert torch.allclose(from_tensor.std, from_batches.std, atol=1e-6)
    scaled = from_tensor.scale(mu)
    assert torch.allclose(scaled.mean(0), torch.zeros(16), atol=1e-4)
    assert torch.allclose(scaled.std(0, unbiased=False), torch.ones(16), atol=1e-4)


def test_default_is_one_global_scale_and_shift_of_the_sigma_vae_samples():
    """Issue 11 item 3: one shift and one scale for all channels, computed on z = μ + σ·ε (what the LM sees):
    drawn samples, scaled, have mean 0 and std 1 over all their elements."""
    torch.manual_seed(0)
    vae = SigmaVAE(SIGMA_VAE_PRESETS["tiny"])
    images = torch.rand(64, 3, 32, 32) * 2 - 1
    stats = compute_latent_stats(vae, images)
    assert stats.normalisation == "global" and LatentStats.from_dict(stats.to_dict()).normalisation == "global"
    assert torch.all(stats.mean == stats.mean[0]) and torch.all(stats.std == stats.std[0])
    with torch.no_grad():
        mu = vae.encode(images)
    z = sample_sigma_latents(mu, vae.config.c_sigma, torch.Generator().manual_seed(1))
    scaled = stats.scale(z)
    assert abs(scaled.mean().item()) < 0.02 and abs(scaled.std().item() - 1) < 0.02
    on_mu = compute_latent_stats(vae, images, on_samples=False)
    assert on_mu.std[0] < stats.std[0], "samples spread wider than μ"


def test_per_channel_std_is_floored_at_a_share_of_the_global_std():
    count, dim = 1000, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, dim)) * np.array([1.0, 2.0, 1e-5, 0.5])
    stats = stats_from_moments(count, x.sum(0), (x * x).sum(0), c_sigma=0.0, normalisation="per_channel")
    global_std = stats_from_moments(count, x.sum(0), (x * x).sum(0), c_sigma=0.0).std[0]
    assert stats.std[2] == pytest.approx(PER_CHANNEL_FLOOR * global_std)  # the near-dead channel
    assert stats.std[1] == pytest.approx(x[:, 1].std(), rel=1e-5)
    legacy = LatentStats.from_dict({"mean": [0.0, 1.0], "std": [1.0, 2.0]})  # a file from before the option
    assert legacy.normalisation == "per_channel"
    with pytest.raises(ValueError, match="normalisation 'whiten'"):
        stats_from_moments(count, x.sum(0), (x * x).sum(0), 0.0, "whiten")
