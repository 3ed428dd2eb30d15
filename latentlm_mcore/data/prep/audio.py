"""Decoding and validating one audio file for preprocessing: soundfile decode, mono mix-down, resampling in
torch (a windowed-sinc polyphase filter, torchaudio's `resample` algorithm, so no torchaudio), and the hostile
inputs rejected with a reason from data/schema.py (missing, not audio, corrupt, wrong rate, too long, silent,
clipped)."""

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from latentlm_mcore.data.schema import (AUDIO_CLIPPED, AUDIO_MISSING, AUDIO_SILENT, AUDIO_TOO_LONG, AUDIO_UNREADABLE,
                                        AUDIO_WRONG_RATE, RejectedDocument)

MIN_SOURCE_RATE = 8000         # below this the audio cannot carry a 16/24 kHz model's band: refused, not upsampled
SILENCE_RMS = 1e-4             # RMS below -80 dBFS is silence
CLIPPED_FRACTION = 0.01        # more than 1% of samples at full scale is a clipped recording


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int, lowpass_width: int = 6, rolloff: float = 0.99):
    """Band-limited resampling of [..., T] (torchaudio.functional.resample's sinc_interp_hann method)."""
    if orig_rate == new_rate:
        return wav
    g = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // g, int(new_rate) // g
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * base).clamp(-lowpass_width, lowpass_width)
    window = torch.cos(t * math.pi / lowpass_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    kernel = kernel.to(wav.dtype if wav.is_floating_point() else torch.float32)
    shape = wav.shape
    x = wav.reshape(-1, 1, shape[-1]).to(kernel.dtype)
    n = shape[-1]
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x, kernel, stride=orig).transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(new * n / orig)
    return y[..., :target].reshape(*shape[:-1], target)


def load_audio(path: str, sample_rate: int, start: float | None = None, end: float | None = None,
               max_seconds: float = 60.0, doc_id: str | None = None) -> torch.Tensor:
    """Read [start, end) seconds of `path` as mono float32 [T] at `sample_rate`, or raise RejectedDocument."""
    import soundfile as sf
    if not os.path.isfile(path):
        raise RejectedDocument(AUDIO_MISSING, f"audio file not found: {path}", doc_id)
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError on non-audio and corrupt files
        raise RejectedDocument(AUDIO_UNREADABLE, f"{path} is not a readable audio file: {e}", doc_id) from e
    rate = info.samplerate
    if rate < MIN_SOURCE_RATE:
        raise RejectedDocument(AUDIO_WRONG_RATE, f"{path} is sampled at {rate} Hz, below {MIN_SOURCE_RATE} Hz", doc_id)
    first = int(round((start or 0.0) * rate))
    last = info.frames if end is None else int(round(end * rate))
    if start is not None and end is not None and end <= start:
        raise RejectedDocument(AUDIO_UNREADABLE, f"{path}: segment end {end} s is not after start {start} s", doc_id)
    if last > info.frames + rate // 100:  # 10 ms of slack for rounded manifests
        raise RejectedDocument(AUDIO_UNREADABLE, f"{path}: segment ends at {last / rate:.2f} s, after the file's "
                               f"{info.frames / rate:.2f} s", doc_id)
    if (last - first) / rate > max_seconds:
        raise RejectedDocument(AUDIO_TOO_LONG, f"{path}: {(last - first) / rate:.1f} s of audio exceeds "
                               f"{max_seconds:.1f} s", doc_id)
    try:
        data, _ = sf.read(path, start=first, stop=min(last, info.frames), dtype="float32", always_2d=True)
    except Exception as e:
        raise RejectedDocument(AUDIO_UNREADABLE, f"{path} could not be decoded: {e}", doc_id) from e
    if data.shape[0] == 0:
        raise RejectedDocument(AUDIO_UNREADABLE, f"{path}: no audio frames in the segment", doc_id)
    mono = data.mean(axis=1)
    if not np.isfinite(mono).all():
        raise RejectedDocument(AUDIO_UNREADABLE, f"{path}: decoded samples are not finite", doc_id)
    rms = float(np.sqrt(np.mean(mono.astype(np.float64) ** 2)))
    if rms < SILENCE_RMS:
        raise RejectedDocument(AUDIO_SILENT, f"{path}: RMS {rms:.2e} is below {SILENCE_RMS:g} (silence)", doc_id)
    clipped = float(np.mean(np.abs(data) >= 0.999))
    if clipped > CLIPPED_FRACTION:
        raise RejectedDocument(AUDIO_CLIPPED, f"{path}: {clipped:.1%} of samples at full scale "
                               f"(more than {CLIPPED_FRACTION:.0%})", doc_id)
    return resample(torch.from_numpy(mono), rate, sample_rate)
