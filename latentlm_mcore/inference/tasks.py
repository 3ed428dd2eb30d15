"""Text -> image, class -> image, image -> text, text -> speech and text continuation over either backend.

A `Generator` bundles what a task needs: a `Decoder`, the special tokens, a tokenizer (`encode` /
`decode`) and the σ-VAE (its `latent_stats` scale latents for the model and unscale them for
`decode`). `from_hf_folder` builds it from an exported folder (KV-cached), `from_megatron` from a
Megatron checkpoint (any TP/PP, loaded at TP=1 in this process; megatron's static KV cache).

Prompts follow the training data's document layout (latentlm_mcore/data/prep/preprocess.py): a document
starts after `<END_OF_DOCUMENT>`, an image is `<BOD>` + latents + `<EOD>`; a speech document is `<BOD>` voice
latents `<EOD>` text `<BOD>` speech latents `<EOD>` (its σ-VAE is an audio one, `vae/audio_model.py`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from latentlm_mcore.inference.generation import (Decoder, Sample, SamplingConfig, SpecialTokens, class_prompts,
                                                 generate, speech_prompts)

VOICE_SECONDS = 3.0  # a voice prompt is cut to its first 3 s, as the speech converters cut theirs (paper §3.3)
MAX_SPEECH_SECONDS = 20.0  # a speech run that never chooses <EOD> ends here


@dataclass
class Generation:
    text: str  # the generated text (special tokens and latent positions left out)
    tokens: list[int]  # every generated id
    images: list[torch.Tensor]  # decoded images [3, H, W] in [-1, 1]


@dataclass
class Speech:
    text: str  # what was asked to be said
    voice: str  # the voice prompt's file
    latents: torch.Tensor  # the generated run [n, latent_dim], scaled as the model reads them
    audio: torch.Tensor  # decoded waveform [n · hop_length] at `sample_rate`
    sample_rate: int
    stopped_by: str  # "eod": the LM head preferred <EOD> at the last latent; "max": the length limit
    tokens: list[int]  # every generated id


def is_audio_vae(vae) -> bool:
    return vae is not None and hasattr(vae.config, "hop_length")


def image_to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A decoded image [3, H, W] in [-1, 1] -> uint8 [H, W, 3], as PNG files and ADM's sample .npz hold it."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)


class _HFTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class Generator:
    def __init__(self, decoder: Decoder, special: SpecialTokens, tokenizer, vae, classes: tuple[int, int] | None = None,
                 cfg_scale: float | None = None):
        self.decoder, self.special, self.tokenizer, self.vae = decoder, special, tokenizer, vae
        self.classes = classes  # (number of classes, <NULL_CLASS> id) of a class-conditional model
        self.cfg_scale = cfg_scale  # the guidance its preset is sampled with, if it has one

    @classmethod
    def from_hf_folder(cls, folder: str, use_cache: bool = True) -> "Generator":
        # transformers imports torchvision when installed: mend a broken one first (what importing
        # latentlm_mcore.hf does; called directly so that inference never imports hf, which imports inference)
        from latentlm_mcore.compat.torchvision_ops import make_torchvision_importable
        make_torchvision_importable()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"{folder}: no config.json; not a Hugging Face model folder")
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        has_tokenizer = os.path.isfile(os.path.join(folder, "tokenizer.json"))
        # trust_remote_code=False: tokenizer.json needs none, and transformers 5 would otherwise ask about config.json's
        tokenizer = _HFTokenizer(AutoTokenizer.from_pretrained(folder, trust_remote_code=False)) if has_tokenizer else None
        if os.path.isfile(os.path.join(folder, "audio_vae.json")):
            vae = model.load_audio_vae(folder)
        elif os.path.isfile(os.path.join(folder, "sigma_vae.json")):
            vae = model.load_sigma_vae(folder)
        else:
            vae = None
        c = model.config
        classes = (c.num_classes, c.null_class_token_id) if getattr(c, "num_classes", None) else None
        return cls(model.decoder(use_cache), model.special_tokens(), tokenizer, vae, classes,
                   getattr(c, "cfg_scale", None))

    @classmethod
    def from_megatron(cls, checkpoint: str, iteration: int | None = None, tokenizer: str | None = None,
                      sigma_vae: str | None = None, use_cache: bool = True, use_ema: bool = False) -> "Generator":
        from latentlm_mcore.data.tokenizer import load_tokenizer
        from latentlm_mcore.inference.megatron import load_megatron_model, megatron_decoder
        from latentlm_mcore.training.provenance import resolve_sigma_vae
        from latentlm_mcore.vae import load_vae

        model, cfg, provenance, directory = load_megatron_model(checkpoint, iteration, use_ema=use_ema)
        tokenizer = tokenizer or provenance.tokenizer
        sigma_vae = resolve_sigma_vae(provenance, directory, explicit=sigma_vae)  # by hash, wherever it moved
        if not tokenizer:
            raise ValueError(f"{directory}: run_config.json names no tokenizer; pass one")
        vae = load_vae(sigma_vae) if sigma_vae else None  # image or audio, by the file's kind
        if vae is not None and vae.latent_stats is None:
            raise ValueError(f"σ-VAE {sigma_vae} has no latent statistics; the model's latents are scaled by them")
        return cls.with_vocabulary(megatron_decoder(model, use_cache), load_tokenizer(tokenizer), vae, cfg.cfg_scale)

    @classmethod
    def with_vocabulary(cls, decoder: Decoder, tok, vae, cfg_scale: float | None) -> "Generator":
        """A Megatron-side generator: the special tokens and classes from our tokenizer (data/tokenizer.py)."""
        special = SpecialTokens(tok.bod_id, tok.eod_id, tok.latent_id, tok.end_of_document_id,
                                vae.config.num_latents if vae is not None and not is_audio_vae(vae) else 0)
        classes = (tok.num_classes, tok.null_class_id) if hasattr(tok, "num_classes") else None
        return cls(decoder, special, tok, vae, classes, cfg_scale)

    # ------------------------------------------------------------ tasks
    def text_to_image(self, captions: list[str], sampling: SamplingConfig) -> list[Generation]:
        """One image per caption: `<END_OF_DOCUMENT> caption <BOD>`, stopped at the image's <EOD>."""
        self._need("tokenizer", "vae")
        s = self.special
        prompts = [[s.end_of_document, *self.tokenizer.encode(c), s.bod] for c in captions]
        sampling = _replace(sampling, stop_after_images=1,
                            max_new_tokens=max(sampling.max_new_tokens, s.latents_per_image + 1))
        return self.run(prompts, sampling)

    def class_to_image(self, labels: list[int], sampling: SamplingConfig, progress: bool = True) -> list[Generation]:
        """One image per class label; guidance's unconditional stream is the null class, in the same batch."""
        if self.classes is None:
            raise ValueError("this model has no class vocabulary (tokenizer classes:N); class-to-image needs one")
        self._need("vae")
        prompts, uncond = class_prompts(labels, self.special, *self.classes)
        sampling = _replace(sampling, stop_after_images=1,
                            max_new_tokens=max(sampling.max_new_tokens, self.special.latents_per_image + 1))
        samples = generate(self.decoder, prompts, self.special, sampling, uncond_prompts=uncond, progress=progress)
        return [self._finish(sample) for sample in samples]

    def image_to_text(self, images: torch.Tensor, sampling: SamplingConfig, prompt: str = "") -> list[Generation]:
        """Text after each image ([B, 3, H, W] in [-1, 1]) and an optional text prompt."""
        self._need("tokenizer", "vae")
        s = self.special
        with torch.no_grad():
            latents = self.vae.latent_stats.scale(self.vae.encode(images).float())
        prompts = [[s.end_of_document, s.bod, z, s.eod, *self.tokenizer.encode(prompt)] for z in latents]
        return self.run(prompts, _replace(sampling, cfg_scale=1.0))

    def text_to_speech(self, texts: list[str], voices: list[str], sampling: SamplingConfig,
                       max_seconds: float = MAX_SPEECH_SECONDS) -> list[Speech]:
        """One utterance per text, in the voice of the WAV file beside it (one voice for all texts, or one per
        text). A run ends when the LM head prefers <EOD> over <LATENT> at its last latent, or after
        `max_seconds` of latents (`sampling.max_run_latents`, if set, instead); guidance's unconditional stream
        is the same voice prompt without the text, in the same batch."""
        self._need("tokenizer", "vae")
        if not is_audio_vae(self.vae):
            raise ValueError("text-to-speech needs an audio σ-VAE (vae/audio_model.py); this model's is an image one")
        if len(voices) == 1:
            voices = list(voices) * len(texts)
        if len(voices) != len(texts):
            raise ValueError(f"{len(texts)} texts and {len(voices)} voices: give one voice, or one per text")
        vae = self.vae
        voice_latents = [vae.encode_scaled(read_voice(v, vae.config.sample_rate)[None])[0] for v in voices]
        prompts, uncond = speech_prompts([self.tokenizer.encode(t) for t in texts], voice_latents, self.special)
        limit = sampling.max_run_latents or max(1, int(max_seconds * vae.config.frame_rate))
        sampling = _replace(sampling, max_run_latents=limit, stop_after_images=1, max_new_tokens=limit + 1)
        samples = generate(self.decoder, prompts, self.special, sampling, uncond_prompts=uncond)
        out = []
        for text, voice, sample in zip(texts, voices, samples):
            z = sample.images[0]
            out.append(Speech(text=text, voice=str(voice), latents=z, audio=vae.decode_scaled(z[None])[0].float(),
                              sample_rate=vae.config.sample_rate, stopped_by=sample.run_ends[0],
                              tokens=sample.tokens))
        return out

    def continue_text(self, texts: list[str], sampling: SamplingConfig) -> list[Generation]:
        """Free continuation: text, and images wherever the model opens one."""
        self._need("tokenizer")
        prompts = [[self.special.end_of_document, *self.tokenizer.encode(t)] for t in texts]
        return self.run(prompts, sampling)

    def run(self, prompts, sampling: SamplingConfig) -> list[Generation]:
        samples = generate(self.decoder, prompts, self.special, sampling)
        return [self._finish(sample) for sample in samples]

    def _finish(self, sample: Sample) -> Generation:
        specials = {self.special.bod, self.special.eod, self.special.latent, self.special.end_of_document}
        text = self.tokenizer.decode([t for t in sample.tokens if t not in specials]) if self.tokenizer else ""
        images = []
        if sample.images and self.vae is not None:
            with torch.no_grad():
                z = self.vae.latent_stats.unscale(torch.stack(sample.images))
                images = list(self.vae.decode(z).float().clamp(-1, 1))
        return Generation(text=text, tokens=sample.tokens, images=images)

    def _need(self, *parts):
        missing = [p for p in parts if getattr(self, p) is None]
        if missing:
            raise ValueError(f"this task needs a {' and a '.join(missing)}, and none was found "
                             f"(Megatron: the checkpoint's provenance or --tokenizer/--sigma-vae; HF: files in the folder)")


def read_voice(path: str, sample_rate: int, seconds: float = VOICE_SECONDS) -> torch.Tensor:
    """A voice prompt file -> its first `seconds` as mono float32 [T] at `sample_rate`, through preprocessing's
    reader (soundfile, mono mix-down, the same resampling, the same rejects) so the model hears what it was
    trained on. A rejected file raises ValueError naming it and the reason."""
    from latentlm_mcore.data.prep.audio import load_audio
    from latentlm_mcore.data.schema import RejectedDocument

    try:
        wav = load_audio(os.fspath(path), sample_rate)
    except RejectedDocument as e:
        raise ValueError(f"voice prompt {path}: {e}") from e
    return wav[: int(round(seconds * sample_rate))]


def _replace(sampling: SamplingConfig, **changes) -> SamplingConfig:
    from dataclasses import replace

    return replace(sampling, **changes)
