"""Audio σ-VAE (paper §3.3.1): causal 1-D ConvNeXt encoder to latents μ at sample_rate / hop_length Hz and
a mirrored causal decoder back to the waveform.

Every layer is causal (left padding only, per-time-step LayerNorm), so audio up to latent t depends only on
latents 0..t and the decoder can stream: `decode(z, cache)` with a `StreamCache` carries each convolution's
last (kernel - 1) input frames from one call to the next, and decoding latents one by one gives the same
audio as decoding them all at once (tests/vae/test_audio_model.py). Upsampling is a causal convolution to
stride x channels followed by a sub-pixel reshuffle rather than a transposed convolution, whose overlap-add
would need the next latent before a frame is final.
"""

import os
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentlm_mcore.runtime.files import atomic_torch_save
from latentlm_mcore.vae.audio_config import AudioVAEConfig
from latentlm_mcore.vae.model import sample_sigma_latents
from latentlm_mcore.vae.stats import LatentStats, stats_from_moments

AUDIO_VAE_KIND = "audio"  # the export file's "kind"; image σ-VAE files (vae/model.py) carry none


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
        self.latent_stats: LatentStats | None = None  # set by load_audio_vae / the trainer's export

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

    @torch.no_grad()
    def encode_scaled(self, wav: torch.Tensor) -> torch.Tensor:
        """What preprocessing stores: wav [B, T] (any T; right-padded to a multiple of hop_length) ->
        latents [B, ceil(T / hop), latent_dim] scaled by `latent_stats` (unit scale for the language model)."""
        if self.latent_stats is None:
            raise ValueError("AudioSigmaVAE.encode_scaled needs latent_stats: load the model with load_audio_vae "
                             "from a file the trainer exported")
        return self.latent_stats.scale(self.encode(pad_to_hop(wav, self.config.hop_length)).float())

    @torch.no_grad()
    def decode_scaled(self, z: torch.Tensor, cache: "StreamCache | None" = None) -> torch.Tensor:
        """Inverse of `encode_scaled` for generation: scaled latents [B, n, latent_dim] -> wav [B, n · hop]."""
        if self.latent_stats is None:
            raise ValueError("AudioSigmaVAE.decode_scaled needs latent_stats (see encode_scaled)")
        return self.decode(self.latent_stats.unscale(z.float()), cache)

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


def save_audio_vae(path, vae: AudioSigmaVAE, latent_stats: LatentStats | None = None) -> None:
    """Write the exported audio σ-VAE as one torch file, atomically: kind, config (sample rate, strides, ...),
    sample_rate, hop_length and frame_rate at the top level for readers that only need those, weights, and
    the latent statistics."""
    vae = getattr(vae, "module", vae)  # accept a DDP-wrapped model
    stats = latent_stats if latent_stats is not None else vae.latent_stats
    cfg = vae.config
    payload = {
        "kind": AUDIO_VAE_KIND,
        "config": asdict(cfg),
        "sample_rate": cfg.sample_rate,
        "hop_length": cfg.hop_length,
        "frame_rate": cfg.frame_rate,
        "state_dict": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
        "latent_stats": stats.to_dict() if stats is not None else None,
    }
    atomic_torch_save(payload, path)  # readers see the old file or the new one, never half of one


def load_audio_vae(path, map_location="cpu") -> AudioSigmaVAE:
    """Load a file written by `save_audio_vae`; the model is in eval mode with `.latent_stats` set."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio σ-VAE file not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"audio σ-VAE file {path} is not a readable torch file: {e}") from e
    if not isinstance(payload, dict) or payload.get("kind") != AUDIO_VAE_KIND:
        found = payload.get("kind", "none (an image σ-VAE or a trainer checkpoint?)") \
            if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not an exported audio σ-VAE: its kind is {found}, expected "
                         f"{AUDIO_VAE_KIND!r} (the trainer's audio_vae.pt)")
    vae = AudioSigmaVAE(AudioVAEConfig.from_dict(payload["config"]))
    try:
        vae.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"audio σ-VAE file {path} does not match its own config: {e}") from e
    stats = payload.get("latent_stats")
    vae.latent_stats = LatentStats.from_dict(stats) if stats is not None else None
    return vae.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


@torch.no_grad()
def compute_audio_latent_stats(vae: AudioSigmaVAE, waveforms, normalisation: str = "global") -> LatentStats:
    """Statistics of the σ-VAE samples' latents (every frame) over an iterable of waveform batches [B, T]
    (T a multiple of hop_length), as vae/stats.py's compute_latent_stats does for images."""
    vae = getattr(vae, "module", vae)
    was_training = vae.training
    vae.eval()
    count, total, total_sq = 0, 0.0, 0.0
    for wav in waveforms:
        mu = vae.encode(wav).double().reshape(-1, vae.config.latent_dim)
        total, total_sq, count = total + mu.sum(0), total_sq + (mu * mu).sum(0), count + mu.shape[0]
    vae.train(was_training)
    if count < 2:
        raise ValueError("compute_audio_latent_stats needs at least two latent frames")
    return stats_from_moments(count, total.cpu().numpy(), total_sq.cpu().numpy(), vae.config.c_sigma, normalisation)
