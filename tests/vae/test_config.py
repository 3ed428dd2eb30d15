import pytest
import torch

from latentlm_mcore.vae import SIGMA_VAE_PRESETS, SigmaVAE, SigmaVAEConfig


def test_num_latents_is_patch_grid():
    assert SigmaVAEConfig(image_size=64, patch_size=8, hidden=32, heads=4).num_latents == 64
    assert SIGMA_VAE_PRESETS["tiny"].num_latents == 16


def test_paper_preset_matches_paper_size():
    cfg = SIGMA_VAE_PRESETS["paper"]
    assert (cfg.image_size, cfg.patch_size, cfg.latent_dim, cfg.enc_layers, cfg.dec_layers) == (256, 16, 32, 12, 12)
    with torch.device("meta"):  # shapes only, no 700 MB of weights
        vae = SigmaVAE(cfg)
    params = sum(p.numel() for p in vae.parameters())
    assert 165e6 < params < 180e6  # paper §3.1.3: "totaling 172 million parameters"


@pytest.mark.parametrize("changes, message", [
    ({"image_size": 30}, "not a multiple of patch_size"),
    ({"hidden": 30}, "not divisible by heads"),
    ({"latent_dim": 0}, "latent_dim must be positive"),
    ({"c_sigma": -1.0}, "c_sigma"),
])
def test_invalid_config_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        SIGMA_VAE_PRESETS["tiny"].replace(**changes)


def test_from_dict_rejects_unknown_fields():
    d = {"image_size": 32, "patch_size": 8, "bogus": 1}
    with pytest.raises(ValueError, match="bogus"):
        SigmaVAEConfig.from_dict(d)
