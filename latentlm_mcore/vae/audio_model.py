"""Audio σ-VAE (paper §3.3.1): causal 1-D ConvNeXt encoder to latents μ at sample_rate / hop_length Hz and
a mirrored causal decoder back to the waveform.

Every layer is causal (left padding only, per-time-step LayerNorm), so audio up to latent t depends only on
latents 0..t and the decoder can stream: `decode(z, cache)` with a `StreamCache` carries each convolution's
last (kernel - 1) input frames from one call to the next, and decoding latents one by one gives the same
audio as decoding them all at once (tests/vae/test_audio_model.py). Upsampling is a causal convolution to
stride x channels followed by a sub-pixel reshuffle rather than a transposed convolution, whose overlap-add
would need the next latent before a frame is final.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentlm_mcore.vae.audio_config import AudioVAEConfig
from latentlm_mcore.vae.model import sample_sigma_latents


class StreamCache(dict):
    """Per-convolution left context for streaming decoding: module -> its last (kernel - 1)·dilation inputs."""


class CausalConv1d(nn.Conv1d):
    def __init__(self, in_ch, out_ch, kernel_size, stride=1, groups=1):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, groups=groups)
        self.left = kernel_size - stride  # left padding that makes output frame i see inputs up to (i+1)·stride-1

    def forward(self, x, cache: StreamCache | None = None):
        if cache is None:
            x = F.pad(x, (self.left, 0))
        else:
            if self.stride[0] != 1:
                raise ValueError("streaming is only supported for stride-1 convolutions (the decoder's)")
            prev = cache.get(self)
            if prev is None:
                prev = x.new_zeros(x.shape[0], x.shape[1], self.left)  # zero state = zero padding
            x = torch.cat([prev, x], dim=-1)
            cache[self] = x[..., x.shape[-1] - self.left:]
        return super().forward(x)


class ConvNeXtBlock1d(nn.Module):
    """ConvNeXt block with its 7x7 depthwise convolution replaced by a causal 1-D one (paper §3.3.1)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))  # layer scale

    def forward(self, x, cache=None):
        h = self.dwconv(x, cache).transpose(1, 2)  # [B, T, C]
        h = self.pw2(F.gelu(self.pw1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class Upsample1d(nn.Module):
    """Causal sub-pixel upsampling: conv to stride·out channels, then each frame becomes `stride` frames."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride, self.out_ch = stride, out_ch
        self.conv = CausalConv1d(in_ch, out_ch * stride, 3)

    def forward(self, x, cache=None):
        b, _, t = x.shape
        h = self.conv(x, cache).view(b, self.out_ch, self.stride, t)
        return h.permute(0, 1, 3, 2).reshape(b, self.out_ch, t * self.stride)


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        ch = cfg.stage_channels()
        self.stem = CausalConv1d(1, ch[0], cfg.kernel_size)
        self.stages = nn.ModuleList()
        for i, s in enumerate(cfg.strides):
            blocks = [ConvNeXtBlock1d(ch[i], cfg.kernel_size) for _ in range(cfg.blocks_per_stage)]
            self.stages.append(nn.ModuleList(blocks + [CausalConv1d(ch[i], ch[i + 1], 2 * s, stride=s)]))
        self.norm = nn.LayerNorm(ch[-1])
        self.to_latent = nn.Linear(ch[-1], cfg.latent_dim)

    def forward(self, wav):  # [B, 1, T] -> [B, T / hop, latent_dim]
        x = self.stem(wav)
        for stage in self.stages:
            for layer in stage:
                x = layer(x)
        return self.to_latent(self.norm(x.transpose(1, 2)))


class AudioDecoder(nn.Module):
    def __init__(self, cfg: AudioVAEConfig):
        super().__init__()
        ch = cfg.stage_channels()[::-1]
        strides = cfg.strides[::-1]
        self.from_latent = CausalConv1d(cfg.latent_dim, ch[0], cfg.kernel_size)
        self.stages = nn.ModuleList()
        for i, s in enumerate(strides):
            blocks = [ConvNeXtBlock1d(ch[i + 1], cfg.kernel_size) for _ in range(cfg.blocks_per_stage)]
            self.stages.append(nn.ModuleList([Upsample1d(ch[i], ch[i + 1], s)] + blocks))
        self.head = CausalConv1d(ch[-1], 1, cfg.kernel_size)

    def forward(self, z, cache=None):  # [B, n, latent_dim] -> [B, 1, n · hop]
        x = self.from_latent(z.transpose(1, 2), cache)
        for stage in self.stages:
            for layer in stage:
                x = layer(x, cache)
        return self.head(x, cache)


class AudioSigmaVAE(nn.Module):
    """Waveforms [B, T] (mono, T a multiple of hop_length, about [-1, 1]) <-> latents [B, T / hop, latent_dim]."""

    def __init__(self, config: AudioVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config)
        self.decoder = AudioDecoder(config)

    def _param(self):
        return next(self.parameters())

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [B, T] -> μ [B, T / hop_length, latent_dim]. Deterministic."""
        hop = self.config.hop_length
        if wav.dim() != 2 or wav.shape[1] == 0 or wav.shape[1] % hop:
            raise ValueError(f"AudioSigmaVAE.encode expects waveforms [B, T] with T a positive multiple of "
                             f"hop_length {hop}, got {tuple(wav.shape)}; pad with `pad_to_hop`")
        p = self._param()
        return self.encoder(wav.to(device=p.device, dtype=p.dtype).unsqueeze(1))

    def decode(self, z: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        """z [B, n, latent_dim] -> wav [B, n · hop_length]. With a `StreamCache`, successive calls continue
        the same utterance (streaming); without one, each call starts from silence."""
        if z.dim() != 3 or z.shape[2] != self.config.latent_dim:
            raise ValueError(f"AudioSigmaVAE.decode expects z [B, n, {self.config.latent_dim}], got {tuple(z.shape)}")
        p = self._param()
        return self.decoder(z.to(device=p.device, dtype=p.dtype), cache).squeeze(1)

    def forward(self, wav: torch.Tensor):
        """Training pass with the σ noise: returns (reconstruction, μ)."""
        mu = self.encode(wav)
        return self.decode(sample_sigma_latents(mu, self.config.c_sigma)), mu


def pad_to_hop(wav: torch.Tensor, hop_length: int) -> torch.Tensor:
    """Right-pad [..., T] with zeros to the next multiple of hop_length."""
    return F.pad(wav, (0, -wav.shape[-1] % hop_length))
