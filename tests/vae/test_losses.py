import json
from pathlib import Path

import pytest
import torch

from latentlm_mcore.vae.losses import (PatchDiscriminator, VGG16PerceptualLoss, _vgg16_features,
                                       adaptive_gan_weight, hinge_d_loss, hinge_g_loss, sigma_vae_loss)
from tests.conftest import run_torchrun


def test_sigma_vae_loss_is_mse_plus_beta_mu_squared():
    x, recon, mu = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5), torch.full((2, 5, 3), 2.0)
    loss, mse, prior = sigma_vae_loss(recon, x, mu, beta=0.01)
    assert mse.item() == pytest.approx(0.25)
    assert prior.item() == pytest.approx(4.0)
    assert loss.item() == pytest.approx(0.25 + 0.04)


def test_perceptual_loss_without_local_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vgg16\.pth.*Nothing is downloaded"):
        VGG16PerceptualLoss(str(tmp_path / "vgg16.pth"))


def test_perceptual_loss_loads_a_torchvision_style_state_dict(tmp_path):
    # A VGG16 state_dict in torchvision's key layout (here randomly initialised: no weights ship offline).
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision file has a classifier; ignored
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    loss_fn = VGG16PerceptualLoss(str(path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert loss_fn(x, x).item() == pytest.approx(0.0, abs=1e-6)
    loss = loss_fn(recon, x)
    assert loss.item() > 0
    loss.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())  # frozen


def test_perceptual_loss_rejects_a_non_vgg_file(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="resnet.pth.*not a VGG16"):
        VGG16PerceptualLoss(str(path))


def test_hinge_losses_and_patch_logits():
    disc = PatchDiscriminator(channels=8, layers=2)
    logits = disc(torch.randn(2, 3, 32, 32))
    assert logits.shape[:2] == (2, 1) and logits.shape[-1] > 1  # a grid of patch logits
    confident = hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))
    fooled = hinge_d_loss(torch.full((4,), -1.0), torch.full((4,), 1.0))
    assert confident.item() == 0.0 and fooled.item() == pytest.approx(2.0)
    assert hinge_g_loss(torch.full((4,), 3.0)).item() == -3.0


def _tiny_decoder_and_batch(seed=0, n=8):
    """A two-layer 'decoder', a linear 'discriminator' and a batch: enough to have a last layer to weigh at."""
    torch.manual_seed(seed)
    decoder = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    disc = torch.nn.Linear(3, 1)
    z, target = torch.randn(n, 4), torch.randn(n, 3)
    return decoder, disc, z, target


def _losses(decoder, disc, z, target):
    out = decoder(z)
    return torch.nn.functional.mse_loss(out, target), hinge_g_loss(disc(out))


def test_adaptive_gan_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    decoder, disc, z, target = _tiny_decoder_and_batch()
    last = decoder[2].weight
    # Independent path: each loss's gradient accumulated into .grad by its own backward pass.
    norms = []
    for which in (0, 1):
        decoder.zero_grad()
        _losses(decoder, disc, z, target)[which].backward()
        norms.append(last.grad.norm().item())
    expected = norms[0] / (norms[1] + 1e-4) * 0.5

    decoder.zero_grad()
    rec, g = _losses(decoder, disc, z, target)
    weight = adaptive_gan_weight(rec, g, last, factor=0.5)
    assert weight.item() == pytest.approx(expected, rel=1e-5)
    assert not weight.requires_grad and last.grad is None  # measured without touching .grad
    # The weight is a constant of the step: the total's gradient is rec's plus weight x g's.
    (rec + weight * g).backward()
    combined = last.grad.clone()
    for which, scale in ((0, 1.0), (1, weight.item())):
        decoder.zero_grad()
        (_losses(decoder, disc, z, target)[which] * scale).backward()
        combined -= last.grad
    assert combined.abs().max().item() < 1e-6


def test_adaptive_gan_weight_is_clamped():
    decoder, disc, z, target = _tiny_decoder_and_batch()
    rec, _ = _losses(decoder, disc, z, target)
    g_flat = decoder(z).sum() * 0.0  # a GAN loss with no gradient: the ratio is ‖∇rec‖ / 1e-4
    assert adaptive_gan_weight(rec, g_flat, decoder[2].weight, factor=1.0, max_weight=7.0).item() == 7.0


@pytest.mark.slow  # launches torchrun
def test_adaptive_gan_weight_over_two_ranks_is_the_whole_batch_weight(tmp_path):
    """Each of 2 gloo ranks sees half the batch; the gradients are averaged before the norms, so both ranks get
    the weight one process computes on the whole batch (per-rank norms would give each rank its own)."""
    run_torchrun(Path(__file__).with_name("adaptive_weight_worker.py"), 2, [tmp_path], tmp_path, timeout=300)
    weights = [json.loads((tmp_path / f"weight_{r}.json").read_text()) for r in range(2)]
    decoder, disc, z, target = _tiny_decoder_and_batch()
    rec, g = _losses(decoder, disc, z, target)
    whole = adaptive_gan_weight(rec, g, decoder[2].weight, factor=0.5).item()
    assert weights[0] == weights[1] == pytest.approx(whole, rel=1e-5)
    halves = [adaptive_gan_weight(*_losses(decoder, disc, z[i:i + 4], target[i:i + 4]), decoder[2].weight, 0.5).item()
              for i in (0, 4)]
    assert min(abs(h - whole) for h in halves) > 1e-3 * whole  # the test would see per-rank weights
