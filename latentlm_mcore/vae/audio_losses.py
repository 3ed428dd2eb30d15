"""Audio σ-VAE losses (paper §3.3.1): multi-resolution log-mel reconstruction (DAC's configuration), HiFi-GAN's
multi-period discriminator and DAC's multi-resolution complex-STFT discriminator, with hinge or LSGAN
objectives and feature matching. The GAN terms are switched on after a warm-up by the trainer."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# DAC's training configuration (descript-audio-codec conf/base.yml, MelSpectrogramLoss): seven resolutions,
# log10 of the clamped mel magnitude (pow 1), L1; the paper's "Mel Distance" is this loss (§3.3.3).
DAC_MEL_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
DAC_MEL_BANDS = (5, 10, 20, 40, 80, 160, 320)


def slaney_mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, fmin: float = 0.0, fmax: float | None = None):
    """librosa.filters.mel(htk=False, norm='slaney'): [n_mels, n_fft // 2 + 1]; written out so that no
    librosa/torchaudio is needed."""
    fmax = sample_rate / 2 if fmax is None else fmax

    def hz_to_mel(f):
        f = torch.as_tensor(f, dtype=torch.float64)
        lin = f / (200.0 / 3)
        log = 15.0 + torch.log(torch.clamp(f, min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
        return torch.where(f >= 1000.0, log, lin)

    def mel_to_hz(m):
        lin = m * (200.0 / 3)
        log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0))
        return torch.where(m >= 15.0, log, lin)

    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_f = mel_to_hz(torch.linspace(float(hz_to_mel(fmin)), float(hz_to_mel(fmax)), n_mels + 2, dtype=torch.float64))
    fdiff = mel_f.diff()
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.float()


class MultiResolutionMelLoss(nn.Module):
    """Σ over resolutions of L1(log10 mel(x̂), log10 mel(x)); mel of the STFT magnitude (Hann window,
    hop = window / 4, centred). Defaults are DAC's; `mel_distance` is the same module used as a metric."""

    def __init__(self, sample_rate: int, windows=DAC_MEL_WINDOWS, bands=DAC_MEL_BANDS, clamp_eps: float = 1e-5):
        super().__init__()
        if len(windows) != len(bands):
            raise ValueError(f"MultiResolutionMelLoss: {len(windows)} windows but {len(bands)} band counts")
        self.windows, self.clamp_eps = tuple(windows), clamp_eps
        for w, n in zip(windows, bands):
            self.register_buffer(f"mel_{w}", slaney_mel_filterbank(w, n, sample_rate), persistent=False)
            self.register_buffer(f"hann_{w}", torch.hann_window(w), persistent=False)

    def log_mel(self, wav: torch.Tensor, window: int) -> torch.Tensor:
        spec = torch.stft(wav.float(), window, hop_length=window // 4, window=getattr(self, f"hann_{window}"),
                          center=True, return_complex=True).abs()
        return torch.log10(torch.clamp(getattr(self, f"mel_{window}") @ spec, min=self.clamp_eps))

    def forward(self, recon: torch.Tensor, wav: torch.Tensor) -> torch.Tensor:
        return sum(F.l1_loss(self.log_mel(recon, w), self.log_mel(wav, w)) for w in self.windows)


def _conv_stack(convs, post, x):
    """A discriminator's convolutions (leaky ReLU 0.1 after each) and its output conv: (logits, feature maps)."""
    feats = []
    for conv in convs:
        x = F.leaky_relu(conv(x), 0.1)
        feats.append(x)
    x = post(x)
    feats.append(x)
    return x.flatten(1), feats


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's sub-discriminator: the waveform folded into [T / p, p] and 2-D convs along time."""

    def __init__(self, period: int, channels=(32, 128, 512, 1024, 1024)):
        super().__init__()
        self.period = period
        layers, ch = [], 1
        for i, out in enumerate(channels):
            stride = (3, 1) if i < len(channels) - 1 else (1, 1)
            layers.append(nn.utils.parametrizations.weight_norm(nn.Conv2d(ch, out, (5, 1), stride, (2, 0))))
            ch = out
        self.convs = nn.ModuleList(layers)
        self.post = nn.utils.parametrizations.weight_norm(nn.Conv2d(ch, 1, (3, 1), 1, (1, 0)))

    def forward(self, wav):  # [B, T] -> (logits, feature maps)
        b, t = wav.shape
        x = F.pad(wav, (0, -t % self.period), mode="reflect" if t > self.period else "constant")
        x = x.view(b, 1, -1, self.period)
        return _conv_stack(self.convs, self.post, x)


class ComplexSTFTDiscriminator(nn.Module):
    """DAC's multi-resolution STFT sub-discriminator at one window: real and imaginary parts as two channels."""

    def __init__(self, window: int, channels: int = 32):
        super().__init__()
        self.window = window
        self.register_buffer("hann", torch.hann_window(window), persistent=False)
        wn = nn.utils.parametrizations.weight_norm
        self.convs = nn.ModuleList([
            wn(nn.Conv2d(2, channels, (3, 9), (1, 1), (1, 4))),
            wn(nn.Conv2d(channels, channels, (3, 9), (1, 2), (1, 4))),
            wn(nn.Conv2d(channels, channels, (3, 9), (1, 2), (1, 4))),
            wn(nn.Conv2d(channels, channels, (3, 9), (1, 2), (1, 4))),
            wn(nn.Conv2d(channels, channels, (3, 3), (1, 1), (1, 1))),
        ])
        self.post = wn(nn.Conv2d(channels, 1, (3, 3), (1, 1), (1, 1)))

    def forward(self, wav):
        spec = torch.stft(wav.float(), self.window, hop_length=self.window // 4, window=self.hann,
                          center=True, return_complex=True)  # [B, F, T]
        x = torch.view_as_real(spec).permute(0, 3, 2, 1)  # [B, 2, T, F]
        return _conv_stack(self.convs, self.post, x)


class AudioDiscriminator(nn.Module):
    """Multi-period (HiFi-GAN, periods 2, 3, 5, 7, 11) + multi-resolution complex STFT (DAC, 2048/1024/512)."""

    def __init__(self, periods=(2, 3, 5, 7, 11), stft_windows=(2048, 1024, 512), period_channels=(32, 128, 512, 1024, 1024),
                 stft_channels: int = 32):
        super().__init__()
        self.subs = nn.ModuleList([PeriodDiscriminator(p, period_channels) for p in periods]
                                  + [ComplexSTFTDiscriminator(w, stft_channels) for w in stft_windows])

    def forward(self, wav):
        """-> list of (logits, feature maps), one per sub-discriminator."""
        return [d(wav) for d in self.subs]


def discriminator_loss(real_out, fake_out, kind: str = "hinge") -> torch.Tensor:
    """Mean over sub-discriminators; `kind` 'hinge' or 'lsgan' (HiFi-GAN's (1 - D(x))² + D(x̂)²)."""
    losses = []
    for (real, _), (fake, _) in zip(real_out, fake_out):
        if kind == "hinge":
            losses.append(F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        elif kind == "lsgan":
            losses.append((1 - real).pow(2).mean() + fake.pow(2).mean())
        else:
            raise ValueError(f"unknown GAN loss kind {kind!r}; expected 'hinge' or 'lsgan'")
    return torch.stack(losses).mean()


def generator_loss(fake_out, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return torch.stack([-fake.mean() for fake, _ in fake_out]).mean()
    if kind == "lsgan":
        return torch.stack([(1 - fake).pow(2).mean() for fake, _ in fake_out]).mean()
    raise ValueError(f"unknown GAN loss kind {kind!r}; expected 'hinge' or 'lsgan'")


def feature_matching_loss(real_out, fake_out) -> torch.Tensor:
    """Mean L1 between the discriminator's feature maps on real (detached) and reconstructed audio."""
    terms = [F.l1_loss(f, r.detach()) for (_, rf), (_, ff) in zip(real_out, fake_out) for r, f in zip(rf, ff)]
    return torch.stack(terms).mean()


def audio_vae_loss(recon, wav, mu, beta: float, mel_loss: MultiResolutionMelLoss, mel_weight: float = 1.0):
    """Reconstruction (multi-resolution mel + waveform L1) + β‖μ‖². Returns (loss, mel, l1, prior)."""
    mel = mel_loss(recon, wav)
    l1 = F.l1_loss(recon.float(), wav.float())
    prior = mu.float().pow(2).mean()
    return mel_weight * mel + l1 + beta * prior, mel, l1, prior
