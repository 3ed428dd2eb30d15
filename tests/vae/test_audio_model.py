import pytest
import torch

from latentlm_mcore.vae.audio_config import AUDIO_VAE_PRESETS, AudioVAEConfig
from latentlm_mcore.vae.audio_model import AudioSigmaVAE, StreamCache, pad_to_hop

SMALL = AudioVAEConfig(sample_rate=8000, strides=(2, 4, 5), channels=8, max_channels=32, blocks_per_stage=1,
                       latent_dim=8)


@pytest.mark.parametrize("name, rate, dim", [("15hz", 15.0, 32), ("7.5hz", 7.5, 64), ("3.75hz", 3.75, 128)])
def test_paper_presets_frame_rates(name, rate, dim):
    cfg = AUDIO_VAE_PRESETS[name]
    assert cfg.sample_rate == 24000 and cfg.frame_rate == rate and cfg.latent_dim == dim
    assert cfg.stage_channels() == [32, 64, 128, 256, 512, 1024]


def test_encode_decode_shapes():
    vae = AudioSigmaVAE(SMALL).eval()
    wav = torch.randn(2, 3 * SMALL.hop_length)
    mu = vae.encode(wav)
    assert mu.shape == (2, 3, 8)
    assert vae.decode(mu).shape == wav.shape
    with pytest.raises(ValueError, match="multiple of hop_length 40"):
        vae.encode(torch.randn(2, 41))
    assert pad_to_hop(torch.randn(2, 41), 40).shape == (2, 80)


def test_encoder_is_causal():
    """Changing audio after latent t's frame leaves latents 0..t unchanged."""
    torch.manual_seed(0)
    vae = AudioSigmaVAE(SMALL).eval()
    hop = SMALL.hop_length
    wav = torch.randn(1, 6 * hop)
    changed = wav.clone()
    changed[:, 4 * hop:] = torch.randn(1, 2 * hop)
    with torch.no_grad():
        a, b = vae.encode(wav), vae.encode(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-4


@pytest.mark.parametrize("chunks", [[1] * 9, [2, 3, 4], [5, 1, 3]])
def test_streaming_decoding_equals_full_decoding(chunks):
    """Decoding latents chunk by chunk with a StreamCache gives the audio of decoding them all (to 1e-5)."""
    torch.manual_seed(0)
    vae = AudioSigmaVAE(SMALL).eval()
    z = torch.randn(2, sum(chunks), SMALL.latent_dim)
    with torch.no_grad():
        full = vae.decode(z)
        cache, pieces, start = StreamCache(), [], 0
        for n in chunks:
            pieces.append(vae.decode(z[:, start:start + n], cache))
            start += n
    streamed = torch.cat(pieces, dim=1)
    assert streamed.shape == full.shape
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)
    # and a prefix decoded alone is the full decoding's prefix
    with torch.no_grad():
        prefix = vae.decode(z[:, :4])
    torch.testing.assert_close(prefix, full[:, :4 * SMALL.hop_length], rtol=0, atol=1e-5)


def test_forward_draws_sigma_noise_and_trains():
    torch.manual_seed(0)
    vae = AudioSigmaVAE(SMALL)
    wav = torch.randn(2, 2 * SMALL.hop_length)
    recon, mu = vae(wav)
    assert recon.shape == wav.shape and mu.shape == (2, 2, 8)
    with torch.no_grad():
        clean = vae.decode(mu)
    assert (recon - clean).abs().max() > 1e-6  # the σ noise reached the decoder
    recon.pow(2).mean().backward()
    assert all(p.grad is not None for p in vae.parameters())


def test_tiny_preset_runs():
    cfg = AUDIO_VAE_PRESETS["tiny"]
    vae = AudioSigmaVAE(cfg).eval()
    with torch.no_grad():
        out = vae.decode(vae.encode(torch.randn(1, cfg.sample_rate // 2)))
    assert out.shape == (1, cfg.sample_rate // 2) and cfg.frame_rate == 40.0
