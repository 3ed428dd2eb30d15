"""Speech documents in preprocessing (paper §3.3; the format is in `data/schema.py`): each utterance decoded and
checked by `prep/audio.py`, encoded by the audio σ-VAE in batches, and written as
`<BOD> prompt <EOD> text <BOD> target <EOD> <END_OF_DOCUMENT>` with the prompt's latents, then the target's.

Batching: the utterances of a flush are sorted by length, grouped, right-padded with zeros to the group's
longest (a multiple of hop_length) and encoded in one forward; each keeps its first ceil(T / hop) latents.
The encoder is causal (left padding only, per-step norms), so latent t sees samples up to (t + 1)·hop - 1
and right-padding changes none of the kept latents: they equal encoding the utterance alone
(`tests/data/prep/test_speech.py`). Stored latents are μ, unscaled, like images'; the manifest's `vae` block
names the audio σ-VAE file and its sha256, which the checkpoint's provenance records.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from latentlm_mcore.data import schema
from latentlm_mcore.data.prep.audio import load_audio
from latentlm_mcore.data.schema import RejectedDocument
from latentlm_mcore.data.tokenizer import sha256_file

PROMPT_SECONDS = 3.0  # the voice prompt, or the target's own prefix (at most half of it): paper setting 2's 3 s


def speech_tokens(tokenizer, text: str, prompt_latents: int, target_latents: int) -> np.ndarray:
    """The ids of one speech document (schema): prompt run, transcript, target run, <END_OF_DOCUMENT>."""
    run = lambda n: [tokenizer.bod_id] + [tokenizer.latent_id] * n + [tokenizer.eod_id]  # noqa: E731
    return np.asarray(run(prompt_latents) + list(tokenizer.encode(text)) + run(target_latents)
                      + [tokenizer.end_of_document_id], dtype=np.int32)


class SpeechEncoding:
    """What `preprocess._write_part` needs of the audio σ-VAE: prepare a document (decode, check, ids, which
    latent rows it keeps) and encode a list of waveforms in batches."""

    def __init__(self, vae_path: str, audio_root: str, device, max_seconds: float, batch_items: int,
                 prompt_seconds: float = PROMPT_SECONDS):
        from latentlm_mcore.vae import load_audio_vae

        if not audio_root:
            raise ValueError("speech documents need an audio root (--audio-root): every audio path is relative to it")
        self.vae = load_audio_vae(vae_path).to(device).eval()
        self.path, self.root, self.device = vae_path, os.path.realpath(audio_root), device
        self.max_seconds, self.batch_items, self.prompt_seconds = max_seconds, batch_items, prompt_seconds
        c = self.vae.config
        self.sample_rate, self.hop, self.latent_dim = c.sample_rate, c.hop_length, c.latent_dim
        self.latent_stats = self.vae.latent_stats
        self.tokens_per_image = None  # speech runs have no fixed length

    def manifest_vae(self) -> dict:
        c = self.vae.config
        return {"kind": "audio", "path": os.path.abspath(self.path), "sha256": sha256_file(self.path),
                "sample_rate": c.sample_rate, "hop_length": c.hop_length, "frame_rate": c.frame_rate,
                "latent_dim": c.latent_dim, "c_sigma": c.c_sigma, "prompt_seconds": self.prompt_seconds}

    def _load(self, seg: dict, key: str, doc_id: str) -> torch.Tensor:
        path = seg[key]
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(self.root, path))
        if os.path.commonpath([self.root, full]) != self.root:
            raise RejectedDocument(schema.AUDIO_OUTSIDE_ROOT, f"{path!r} resolves outside the audio root {self.root}",
                                   doc_id)
        return load_audio(full, self.sample_rate, seg.get("start"), seg.get("end"), self.max_seconds, doc_id)

    def prepare(self, doc: schema.RawDocument, tokenizer):
        """(ids, waveforms to encode, rows): the document's latents are the concatenation of
        item_latents[i][a:b] for each (i, a, b) in rows."""
        if doc.source != schema.SPEECH_SOURCE:
            raise RejectedDocument(schema.INVALID_SCHEMA, f"source {doc.source!r} in a speech preprocessing run: "
                                   f"preprocess images with --vae into another output (one σ-VAE per dataset)")
        voice = doc.segments[0] if "voice" in doc.segments[0] else None
        text, target = doc.segments[-2]["text"], doc.segments[-1]
        wav = self._load(target, "audio", doc.id)
        n = math.ceil(len(wav) / self.hop)
        if n < 2:
            raise RejectedDocument(schema.AUDIO_TOO_SHORT, f"{target['audio']!r}: {len(wav)} samples make {n} latent "
                                   f"frame(s) of {self.hop} samples, fewer than 2", doc.id)
        if voice is not None:
            prompt = self._load(voice, "voice", doc.id)[: int(self.prompt_seconds * self.sample_rate)]
            k = math.ceil(len(prompt) / self.hop)
            items, rows = [prompt, wav], [(0, 0, k), (1, 0, n)]
        else:  # the target's own prefix (paper setting 2), at most half of it: the rest is left to predict
            k = min(int(self.prompt_seconds * self.vae.config.frame_rate), n // 2)
            items, rows = [wav], [(0, 0, k), (0, 0, n)]
        return speech_tokens(tokenizer, text, k, n), items, rows

    @torch.no_grad()
    def encode(self, waveforms: list) -> list[np.ndarray]:
        """μ [ceil(T_i / hop), d] (float32) of each waveform [T_i], batched by length (see the module docstring)."""
        out: list = [None] * len(waveforms)
        order = sorted(range(len(waveforms)), key=lambda i: len(waveforms[i]))
        for at in range(0, len(order), self.batch_items):
            group = order[at:at + self.batch_items]
            longest = -(-max(len(waveforms[i]) for i in group) // self.hop) * self.hop
            batch = torch.zeros(len(group), longest)
            for row, i in enumerate(group):
                batch[row, :len(waveforms[i])] = waveforms[i]
            mu = self.vae.encode(batch.to(self.device)).float().cpu().numpy()
            for row, i in enumerate(group):
                out[i] = mu[row, :math.ceil(len(waveforms[i]) / self.hop)]
        return out
