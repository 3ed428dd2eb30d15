import os

import pytest
import torch

from latentlm_mcore.vae import (SIGMA_VAE_PRESETS, LatentStats, SigmaVAE, load_sigma_vae, save_sigma_vae)
from latentlm_mcore.runtime.files import atomic_torch_save
from latentlm_mcore.vae.model import sample_sigma_latents

TINY = SIGMA_VAE_PRESETS["tiny"]


def _images(n=3, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_and_deterministic_encode_decode():
    torch.manual_seed(0)
    vae = SigmaVAE(TINY)
    x = _images()
    mu = vae.encode(x)
    assert mu.shape == (3, TINY.num_latents, TINY.latent_dim)
    assert torch.equal(mu, vae.encode(x))
    recon = vae.decode(mu)
    assert recon.shape == x.shape
    assert torch.equal(recon, vae.decode(mu))


def test_latents_are_in_row_major_patch_order():
    # With no Transformer blocks each latent sees only its own patch, so a change in patch (row 1, col 2)
    # must move exactly latent 1 * grid + 2.
    vae = SigmaVAE(TINY.replace(enc_layers=0))
    x = _images(1)
    changed = x.clone()
    p, grid = TINY.patch_size, TINY.grid_size
    changed[:, :, 1 * p:2 * p, 2 * p:3 * p] += 0.5
    moved = (vae.encode(changed) - vae.encode(x)).abs().sum(-1)[0]
    assert moved.nonzero().flatten().tolist() == [1 * grid + 2]


def test_training_pass_adds_per_example_sigma_noise():
    torch.manual_seed(0)
    vae = SigmaVAE(TINY)
    x = _images(4)
    recon, mu = vae(x)
    assert torch.equal(mu, vae.encode(x))
    assert not torch.allclose(recon, vae.decode(mu))  # the noise is applied
    vae_no_noise = SigmaVAE(TINY.replace(c_sigma=0.0))
    vae_no_noise.load_state_dict(vae.state_dict())
    recon0, _ = vae_no_noise(x)
    assert torch.allclose(recon0, vae.decode(mu), atol=1e-6)


def test_sigma_noise_is_one_scalar_per_example_with_mean_scale_c_sigma():
    """The official σ-VAE's law: σ = n·C_σ/0.8 per example, so E|σ| ≈ C_σ (reading C_σ as σ's standard deviation
    would give E|σ| = 0.80·C_σ); within an example every element shares that one σ."""
    c_sigma, n, elements = 0.6, 4000, 256
    z = sample_sigma_latents(torch.zeros(n, 16, 16), c_sigma, torch.Generator().manual_seed(0)).reshape(n, elements)
    per_example = z.pow(2).mean(1).sqrt()  # ≈ |σ| of each example (256 unit normals per example)
    assert per_example.mean().item() == pytest.approx(c_sigma, rel=0.03)
    assert z.std().item() == pytest.approx(c_sigma / 0.8, rel=0.03)  # σ's std, `SigmaVAEConfig.sigma_std`
    assert per_example.std().item() > 0.4 * c_sigma  # a scalar per example varies between examples...
    assert per_example.min().item() < 0.05 * c_sigma  # ...down to about none (per-element σ would not)
    mu = torch.randn(3, 4, 2)
    assert torch.equal(sample_sigma_latents(mu, 0.0), mu)
    again = sample_sigma_latents(mu, c_sigma, torch.Generator().manual_seed(5))
    assert torch.equal(again, sample_sigma_latents(mu, c_sigma, torch.Generator().manual_seed(5)))
    assert SIGMA_VAE_PRESETS["paper"].sigma_std == pytest.approx(0.75 / 0.8)


def test_encode_follows_module_dtype_and_rejects_wrong_shapes():
    vae = SigmaVAE(TINY).to(torch.float64)
    mu = vae.encode(_images(2))  # float32 input
    assert mu.dtype == torch.float64
    assert vae.decode(mu.float()).dtype == torch.float64
    bf16 = SigmaVAE(TINY).to(torch.bfloat16)
    assert bf16.encode(_images(2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\].*\(2, 3, 64, 64\)"):
        vae.encode(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expects z \[B, 16, 16\]"):
        vae.decode(torch.zeros(2, 16, 8))


def test_save_load_roundtrip_with_stats(tmp_path):
    torch.manual_seed(0)
    vae = SigmaVAE(TINY)
    stats = LatentStats(torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16))
    path = tmp_path / "sub" / "vae.pt"
    save_sigma_vae(path, vae, stats)
    assert os.listdir(path.parent) == ["vae.pt"]  # no temp file left behind
    loaded = load_sigma_vae(path)
    assert not loaded.training
    assert torch.equal(loaded.encode(_images()), vae.encode(_images()))
    assert torch.equal(loaded.latent_stats.std, stats.std)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"config", "state_dict", "latent_stats"}
    assert payload["config"]["c_sigma"] == TINY.c_sigma == 0.4  # what the data loader draws z = μ + σ·ε with
    save_sigma_vae(path, vae)  # no stats given and none attached
    assert load_sigma_vae(path).latent_stats is None


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_sigma_vae(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_sigma_vae(corrupt)
    wrong = tmp_path / "trainer_ckpt.pt"
    torch.save({"model": {}, "step": 3}, wrong)
    with pytest.raises(ValueError, match="trainer_ckpt.pt.*lacks"):
        load_sigma_vae(wrong)


def test_interrupted_save_leaves_previous_file_intact(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    atomic_torch_save({"step": 1}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"step": 2, "unpicklable": lambda: None}, path)
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
