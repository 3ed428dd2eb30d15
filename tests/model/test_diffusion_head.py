import torch

from latentlm_mcore.config import get_preset
from latentlm_mcore.model.diffusion_head import DiffusionHead, sinusoidal_timestep_features


def make_head():
    torch.manual_seed(0)
    return DiffusionHead(hidden_size=32, latent_dim=8, width=24, ffn_width=40, num_layers=3)


def test_adaln_zero_init_outputs_zero_and_blocks_are_identity():
    head = make_head()
    x, t, h = torch.randn(6, 8), torch.randint(0, 1000, (6,)), torch.randn(6, 32)
    assert torch.equal(head(x, t, head.embed_condition(h)), torch.zeros(6, 8))
    z = torch.randn(6, 24)
    c = head.embed_condition(h) + head.timestep_embedding(t)
    for block in head.blocks:
        torch.testing.assert_close(block(z, c), z)


def test_output_depends_on_condition_timestep_and_input_once_trained():
    head = make_head()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, h = torch.randn(4, 8), torch.full((4,), 10), torch.randn(4, 32)
    base = head(x, t, head.embed_condition(h))
    assert not torch.allclose(base, head(x, t, head.embed_condition(h + 1)))
    assert not torch.allclose(base, head(x, torch.full((4,), 900), head.embed_condition(h)))
    assert not torch.allclose(base, head(x + 1, t, head.embed_condition(h)))
    # rows are independent: the head is a per-latent network
    torch.testing.assert_close(head(x[:1], t[:1], head.embed_condition(h[:1])), base[:1])


def test_sinusoidal_features_distinguish_timesteps():
    f = sinusoidal_timestep_features(torch.tensor([0, 1, 999]), 256)
    assert f.shape == (3, 256)
    assert not torch.allclose(f[0], f[1]) and not torch.allclose(f[1], f[2])


def test_parameter_count_matches_config_formula():
    from latentlm_mcore.config import count_parameters
    cfg = get_preset("tiny").model
    head = DiffusionHead.from_config(cfg)
    assert sum(p.numel() for p in head.parameters()) == count_parameters(cfg)["diffusion_head"]
