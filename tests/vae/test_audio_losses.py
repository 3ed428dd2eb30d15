import pytest
import torch

from latentlm_mcore.vae.audio_losses import (AudioDiscriminator, discriminator_loss, feature_matching_loss,
                                             generator_loss)


def _small_disc():
    return AudioDiscriminator(periods=(2, 3), stft_windows=(256, 128), period_channels=(4, 8), stft_channels=4)


def test_discriminator_outputs_and_losses():
    torch.manual_seed(0)
    disc = _small_disc()
    real, fake = torch.randn(2, 1600), torch.randn(2, 1600, requires_grad=True)
    real_out, fake_out = disc(real), disc(fake)
    assert len(real_out) == 4 and all(logits.shape[0] == 2 and feats for logits, feats in real_out)
    # the period sub-discriminator folds time into [T / p, p]
    assert real_out[1][1][0].shape[-1] == 3
    for kind in ("hinge", "lsgan"):
        d = discriminator_loss(real_out, fake_out, kind)
        g = generator_loss(fake_out, kind)
        assert torch.isfinite(d) and torch.isfinite(g)
    with pytest.raises(ValueError, match="unknown GAN loss kind 'wgan'"):
        generator_loss(fake_out, "wgan")
    fm = feature_matching_loss(real_out, fake_out)
    fm.backward()
    assert fm > 0 and fake.grad is not None and fake.grad.abs().sum() > 0


def test_hinge_loss_by_hand():
    real = [(torch.tensor([[2.0, 0.5]]), [])]
    fake = [(torch.tensor([[-0.5, 1.0]]), [])]
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0.5, 2] -> 1.25
    assert discriminator_loss(real, fake, "hinge") == pytest.approx(1.5)
    assert discriminator_loss(real, fake, "lsgan") == pytest.approx((1 + 0.25) / 2 + (0.25 + 1) / 2)
    assert generator_loss(fake, "hinge") == pytest.approx(-0.25)


def test_feature_matching_is_zero_for_identical_audio():
    disc = _small_disc()
    x = torch.randn(1, 800)
    assert feature_matching_loss(disc(x), disc(x)) == 0
