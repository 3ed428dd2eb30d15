import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from latentlm_mcore.vae.audio_losses import MultiResolutionMelLoss, slaney_mel_filterbank
from latentlm_mcore.vae.audio_metrics import mel_distance, pesq_wb, stoi, tokenizer_metrics


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """espeak-ng saying digits, 22.05 kHz."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (scripts/setup_system.sh installs it)")
    path = tmp_path_factory.mktemp("speech") / "s.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "seven three nine one five two"], check=True)
    wav, rate = sf.read(path, dtype="float32")
    return torch.from_numpy(wav), rate


def test_slaney_filterbank_matches_librosa_values():
    fb = slaney_mel_filterbank(512, 40, 16000)
    assert fb.shape == (40, 257)
    # By hand: Slaney's scale puts 8 kHz at 15 + ln(8)·27/ln(6.4) = 45.245 mel; 42 points 1.10353 mel apart,
    # linear (200/3 Hz per mel) below 1 kHz, so filter 0 is the triangle 0 -> 73.569 -> 147.137 Hz with
    # height 2 / 147.137. FFT bins are 31.25 Hz apart.
    step = 45.2450 / 41 * 200 / 3
    height = 2 / (2 * step)
    expect = [height * 31.25 / step, height * 62.5 / step, height * (2 * step - 93.75) / step]
    assert torch.allclose(fb[0, 1:4], torch.tensor(expect), rtol=1e-3)
    assert fb[0, 0] == 0 and fb[0, 5:].abs().max() == 0
    hz_per_bin = 16000 / 512
    area = fb.sum(1) * hz_per_bin
    assert torch.allclose(area[5:-5], torch.ones(30), atol=0.1)


def test_identical_pair_reference_values(speech):
    wav, rate = speech
    m = tokenizer_metrics(wav, wav, rate)
    assert m["mel_distance"] == 0.0
    assert abs(m["pesq_wb"] - 4.644) < 1e-3  # PESQ-WB's ceiling for identical signals (P.862.2 mapping)
    assert abs(m["stoi"] - 1.0) < 1e-6


def test_noisy_pair_agrees_with_the_packages_called_directly(speech):
    from pesq import pesq
    from pystoi import stoi as ref_stoi
    from latentlm_mcore.data.prep.audio import resample
    wav, rate = speech
    g = torch.Generator().manual_seed(0)
    noisy = wav + 0.05 * torch.randn(wav.shape, generator=g)
    ours = pesq_wb(noisy, wav, rate)
    r16, d16 = resample(wav, rate, 16000).double().numpy(), resample(noisy, rate, 16000).double().numpy()
    assert ours == pytest.approx(pesq(16000, r16, d16, "wb"), abs=1e-6)
    assert 1.0 < ours < 3.0
    s = stoi(noisy, wav, rate)
    assert s == pytest.approx(ref_stoi(wav.double().numpy(), noisy.double().numpy(), rate), abs=1e-9)
    assert 0.5 < s < 0.99
    # more noise: every metric gets worse
    noisier = wav + 0.2 * torch.randn(wav.shape, generator=g)
    assert pesq_wb(noisier, wav, rate) < ours and stoi(noisier, wav, rate) < s
    assert mel_distance(noisier, wav, rate) > mel_distance(noisy, wav, rate) > 0


def test_mel_loss_has_dac_resolutions_and_gradients():
    loss = MultiResolutionMelLoss(16000)
    x = torch.randn(2, 4000, requires_grad=True)
    out = loss(x, torch.randn(2, 4000))
    out.backward()
    assert out > 0 and x.grad is not None and len(loss.windows) == 7
