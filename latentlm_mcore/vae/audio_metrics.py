"""Speech-tokenizer metrics of paper Table 5, computed offline: mel distance (DAC's configuration, our
`MultiResolutionMelLoss`), PESQ-WB (`pesq`, ITU-T P.862.2 at 16 kHz) and STOI (`pystoi`).

Not available offline from the package index: VISQOL (Google's C++/Bazel build, no wheel), UTMOS (a fine-tuned
SSL model whose weights are downloaded from Hugging Face) and WavLM-TDNN speaker similarity (UniSpeech's
checkpoint, downloaded). Speaker similarity here is Resemblyzer's (ships its weights), see demo/speech_quality.
"""

import warnings

import numpy as np
import torch

from latentlm_mcore.vae.audio_losses import MultiResolutionMelLoss
from latentlm_mcore.data.prep.audio import resample

PESQ_RATE = 16000  # PESQ-WB is defined at 16 kHz


def mel_distance(recon: torch.Tensor, ref: torch.Tensor, sample_rate: int) -> float:
    """DAC's multi-resolution log-mel L1 distance between two mono waveforms [T] at `sample_rate`."""
    with torch.no_grad():
        return float(MultiResolutionMelLoss(sample_rate)(recon.float()[None], ref.float()[None]))


def pesq_wb(recon: torch.Tensor, ref: torch.Tensor, sample_rate: int) -> float:
    """PESQ wide-band (MOS-LQO, 1.04 .. 4.64), both signals resampled to 16 kHz."""
    from pesq import pesq
    r = resample(ref.float(), sample_rate, PESQ_RATE).numpy().astype(np.float64)
    d = resample(recon.float(), sample_rate, PESQ_RATE).numpy().astype(np.float64)
    return float(pesq(PESQ_RATE, r, d, "wb"))


def stoi(recon: torch.Tensor, ref: torch.Tensor, sample_rate: int) -> float:
    """Short-time objective intelligibility (0 .. 1); pystoi resamples to its 10 kHz internally."""
    from pystoi import stoi as _stoi
    with warnings.catch_warnings():  # "not enough STFT frames": it then returns 1e-5, which is the figure we report
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_stoi(ref.float().numpy().astype(np.float64), recon.float().numpy().astype(np.float64),
                           sample_rate, extended=False))


def tokenizer_metrics(recon: torch.Tensor, ref: torch.Tensor, sample_rate: int) -> dict:
    n = min(recon.shape[-1], ref.shape[-1])
    recon, ref = recon[..., :n], ref[..., :n]
    return {"mel_distance": mel_distance(recon, ref, sample_rate), "pesq_wb": pesq_wb(recon, ref, sample_rate),
            "stoi": stoi(recon, ref, sample_rate)}


def mean_tokenizer_metrics(pairs, sample_rate: int) -> dict:
    """`tokenizer_metrics` averaged over (reconstruction, reference) pairs: a tokenizer's figures on a set."""
    scores = [tokenizer_metrics(recon, ref, sample_rate) for recon, ref in pairs]
    return {k: float(sum(m[k] for m in scores) / len(scores)) for k in scores[0]}
