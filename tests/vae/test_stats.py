import torch

from latentlm_mcore.vae import SIGMA_VAE_PRESETS, LatentStats, SigmaVAE, compute_latent_stats


def test_scale_and_unscale_are_inverse_and_roundtrip_through_dict():
    stats = LatentStats(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.5, 1.5]))
    mu = torch.randn(4, 7, 3, dtype=torch.float64)
    assert torch.allclose(stats.unscale(stats.scale(mu)), mu)
    assert stats.scale(mu).dtype == torch.float64
    restored = LatentStats.from_dict(stats.to_dict())
    assert torch.equal(restored.mean, stats.mean) and torch.equal(restored.std, stats.std)
    assert all(isinstance(v, float) for v in stats.to_dict()["mean"])


def test_compute_latent_stats_matches_direct_computation_for_tensor_and_iterable():
    torch.manual_seed(0)
    vae = SigmaVAE(SIGMA_VAE_PRESETS["tiny"])
    images = torch.rand(10, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mu = vae.encode(images).reshape(-1, vae.config.latent_dim)
    from_tensor = compute_latent_stats(vae, images, batch_size=3)
    from_batches = compute_latent_stats(vae, [images[:4], images[4:]])
    assert torch.allclose(from_tensor.mean, mu.mean(0), atol=1e-6)
    assert torch.allclose(from_tensor.std, mu.std(0), atol=1e-5)
    assert torch.allclose(from_tensor.mean, from_batches.mean, atol=1e-6)
    assert torch.allclose(from_tensor.std, from_batches.std, atol=1e-6)
    scaled = from_tensor.scale(mu)
    assert torch.allclose(scaled.mean(0), torch.zeros(16), atol=1e-4)
    assert torch.allclose(scaled.std(0), torch.ones(16), atol=1e-4)
