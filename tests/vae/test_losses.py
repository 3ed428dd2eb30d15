import pytest
import torch

from latentlm_mcore.vae.losses import (PatchDiscriminator, VGG16PerceptualLoss, _vgg16_features,
                                       hinge_d_loss, hinge_g_loss, sigma_vae_loss)


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
