"""Hugging Face model of an exported LatentLM: Llama backbone + LM head + latent projection + diffusion head.

The backbone *is* `transformers`' `LlamaModel` (same weight names and layout), so the text part of an
export also loads as a plain `LlamaForCausalLM`. Latent positions take `latent_projection(latent)` as
their input embedding; `diffusion_head` generates the next latent from the last hidden state.

`generate_mixed` runs the shared generation loop (`generation.py`) with a real KV cache
(`transformers.DynamicCache`), `generate_classes` class -> image, `generate_speech` text -> speech (a speech
export). `load_sigma_vae` / `load_audio_vae` read the σ-VAE shipped in the folder.

This file and the files it imports are copied into every exported folder by `hf/convert.py`
(`write_remote_code`), which rewrites the `latentlm_mcore...` imports below into relative ones:
the folder runs with `trust_remote_code=True` and without this package.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import field, make_dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaModel, LlamaPreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

# transformers copies only the files this one imports directly: import every shipped module here
from latentlm_mcore.diffusion.samplers import ddpm_sample, dpm_solver_pp_sample  # noqa: F401
from latentlm_mcore.diffusion.schedule import cosine_alphas_cumprod
from latentlm_mcore.hf.configuration_latentlm import LatentLMHFConfig
from latentlm_mcore.inference.generation import (Decoder, RecomputeDecoder, Sample, SamplingConfig, SpecialTokens,
                                                 class_prompts, generate, speech_prompts)
from latentlm_mcore.model.diffusion_head import DiffusionHead
from latentlm_mcore.runtime.files import atomic_torch_save  # noqa: F401
from latentlm_mcore.vae.audio_config import AudioVAEConfig
from latentlm_mcore.vae.audio_model import AudioSigmaVAE
from latentlm_mcore.vae.config import SigmaVAEConfig
from latentlm_mcore.vae.model import SigmaVAE
from latentlm_mcore.vae.stats import LatentStats

SIGMA_VAE_WEIGHTS = "sigma_vae.safetensors"
SIGMA_VAE_CONFIG = "sigma_vae.json"  # {"config": SigmaVAEConfig fields, "latent_stats": {"mean", "std"}}
AUDIO_VAE_WEIGHTS = "audio_vae.safetensors"  # a speech export's σ-VAE instead
AUDIO_VAE_CONFIG = "audio_vae.json"  # {"config": AudioVAEConfig fields, "latent_stats": {"mean", "std"}}


_LLAMA_FORWARD_ARGS = set(inspect.signature(LlamaModel.forward).parameters)
# transformers 5 renamed the KV cache `past_key_values` -> `cache` (forward argument, output field, generate's
# model kwargs); this file runs on 4.45 .. 5.x, so it names the cache as the installed transformers does
CACHE_NAME = "cache" if "cache" in _LLAMA_FORWARD_ARGS else "past_key_values"

# loss; logits [b, s, vocab]; the cache; last_hidden_state [b, s, hidden]: what the diffusion head is conditioned on
LatentLMOutput = make_dataclass("LatentLMOutput", [
    ("loss", Optional[torch.Tensor], field(default=None)),
    ("logits", Optional[torch.Tensor], field(default=None)),
    (CACHE_NAME, Optional[Cache], field(default=None)),
    ("last_hidden_state", Optional[torch.Tensor], field(default=None))], bases=(ModelOutput,))
LatentLMOutput.__module__ = __name__


class LatentLMForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    config_class = LatentLMHFConfig
    # a mapping (transformers 5 reads .keys(); 4.x iterates the keys); tying applies only with tie_word_embeddings
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LatentLMHFConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.latent_projection = nn.Linear(config.latent_dim, config.hidden_size, bias=False)
        self.diffusion_head = DiffusionHead(config.hidden_size, config.latent_dim, config.head_hidden_size,
                                            config.head_ffn_hidden_size, config.head_layers,
                                            config.timestep_embedding_dim, config.rms_norm_eps)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def embed(self, input_ids: torch.Tensor, latents: Optional[torch.Tensor] = None,
              latent_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings, with latent positions replaced by the projected latents -> [b, s, h]."""
        embeddings = self.model.embed_tokens(input_ids)
        if latents is not None and latent_mask is not None:
            projected = self.latent_projection(latents.to(self.latent_projection.weight.dtype))
            embeddings = torch.where(latent_mask.unsqueeze(-1), projected.to(embeddings.dtype), embeddings)
        return embeddings

    def forward(self, input_ids: Optional[torch.LongTensor] = None, latents: Optional[torch.Tensor] = None,
                latent_mask: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                **kwargs) -> LatentLMOutput:
        """input_ids [b, s] with latents [b, s, latent_dim] at the positions of latent_mask [b, s].
        `labels` (shifted inside, -100 ignored) give the text cross-entropy only. The KV cache comes as
        `past_key_values` (transformers 4) or `cache` (5); `cache_position` only where LlamaModel takes it."""
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs = {k: v for k, v in kwargs.items() if k != "cache_position" or k in _LLAMA_FORWARD_ARGS}
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, latents, latent_mask)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, **{CACHE_NAME: cache}, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return LatentLMOutput(loss=loss, logits=logits, last_hidden_state=hidden, **{CACHE_NAME: getattr(out, CACHE_NAME)})

    # ------------------------------------------------------------ mixed text / image generation
    def special_tokens(self) -> SpecialTokens:
        c = self.config
        speech = getattr(c, "audio_frame_rate", None) is not None  # runs of any length: no latents_per_image
        missing = [k for k in ("bod_token_id", "eod_token_id", "latent_token_id", "end_of_document_token_id",
                               *(() if speech else ("latents_per_image",))) if getattr(c, k) is None]
        if missing:
            raise ValueError(f"config.json lacks {missing}: this export cannot generate mixed sequences")
        return SpecialTokens(c.bod_token_id, c.eod_token_id, c.latent_token_id, c.end_of_document_token_id,
                             c.latents_per_image or 0)

    def decoder(self, use_cache: bool = True) -> Decoder:
        """The generation backend: KV-cached, or recomputing the whole prefix at every step."""
        alphas_cumprod = cosine_alphas_cumprod(self.config.num_timesteps)
        if use_cache:
            return KVCacheDecoder(self, alphas_cumprod)

        def forward(ids, latents, latent_mask, attention_mask):
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = self(input_ids=ids, latents=latents, latent_mask=latent_mask, attention_mask=attention_mask,
                       position_ids=positions, use_cache=False)
            return out.logits, out.last_hidden_state

        return RecomputeDecoder(forward, self.diffusion_head, alphas_cumprod, self.config.prediction,
                                self.config.latent_dim)

    @torch.no_grad()
    def generate_mixed(self, prompts, uncond_prompts=None, use_cache: bool = True, progress: bool = True,
                       **sampling) -> list[Sample]:
        """Continue each prompt (a list of token ids and latent runs [n, latent_dim]) with text and
        images; `sampling` are `SamplingConfig` fields (temperature, top_p, cfg_scale, diffusion_steps,
        seed, max_new_tokens, stop_after_images). Images come back as scaled latents: decode them with
        `vae = load_sigma_vae()` as `vae.decode(vae.latent_stats.unscale(z))`."""
        return generate(self.decoder(use_cache), prompts, self.special_tokens(), SamplingConfig(**sampling),
                        uncond_prompts=uncond_prompts, progress=progress)

    @torch.no_grad()
    def generate_classes(self, labels, use_cache: bool = True, progress: bool = True, **sampling) -> list[Sample]:
        """One image per class label (class-conditional models: config.num_classes), guided against the null
        class in the same batch at `cfg_scale` (default: config.cfg_scale, the preset's). Scaled latents, as
        `generate_mixed`."""
        c, special = self.config, self.special_tokens()
        if not getattr(c, "num_classes", None):
            raise ValueError("config.json has no num_classes: this export is not class-conditional")
        prompts, uncond = class_prompts(labels, special, c.num_classes, c.null_class_token_id)
        sampling = {"cfg_scale": c.cfg_scale or 1.0, "max_new_tokens": c.latents_per_image + 1,
                    "stop_after_images": 1, **sampling}
        return generate(self.decoder(use_cache), prompts, special, SamplingConfig(**sampling),
                        uncond_prompts=uncond, progress=progress)

    @torch.no_grad()
    def generate_speech(self, texts, voices, max_seconds: float = 20.0, use_cache: bool = True,
                        progress: bool = True, **sampling) -> list[Sample]:
        """Text -> speech (speech exports: config.audio_frame_rate). `texts`: token ids per utterance;
        `voices`: the voice prompts as scaled latents [n, latent_dim], one per text, e.g.
        `vae.encode_scaled(wav[None])[0]` of a mono waveform at `vae.config.sample_rate` (first 3 s, as in
        training). Each run ends when the LM head prefers <EOD> over <LATENT> at its last latent, or after
        `max_seconds`; guidance's unconditional stream is the voice prompt without the text, in the same batch.
        Defaults: the paper's 5 head steps and CFG 4 (§3.3). `sample.images[0]` is the run, `run_ends[0]` why
        it ended; decode with `vae.decode_scaled(z[None])`."""
        c, special = self.config, self.special_tokens()
        if getattr(c, "audio_frame_rate", None) is None:
            raise ValueError("config.json has no audio_frame_rate: this export is not a speech model")
        prompts, uncond = speech_prompts(texts, voices, special)
        limit = sampling.pop("max_run_latents", None) or max(1, int(max_seconds * c.audio_frame_rate))
        sampling = {"cfg_scale": c.cfg_scale or 4.0, "diffusion_steps": 5, **sampling, "max_run_latents": limit,
                    "stop_after_images": 1, "max_new_tokens": limit + 1}
        return generate(self.decoder(use_cache), prompts, special, SamplingConfig(**sampling),
                        uncond_prompts=uncond, progress=progress)

    def load_audio_vae(self, folder: Optional[str] = None) -> AudioSigmaVAE:
        """The audio σ-VAE exported next to a speech model (eval mode, `.latent_stats` set)."""
        return load_audio_vae(folder or self.config._name_or_path)

    def load_sigma_vae(self, folder: Optional[str] = None) -> SigmaVAE:
        """The σ-VAE exported next to this model (eval mode, `.latent_stats` set)."""
        return load_sigma_vae(folder or self.config._name_or_path)


class KVCacheDecoder(Decoder):
    """Feeds only the new positions; keys and values of the prefix come from a `DynamicCache`."""

    def __init__(self, model: LatentLMForCausalLM, alphas_cumprod: torch.Tensor):
        super().__init__(model.diffusion_head, alphas_cumprod, model.config.prediction, model.config.latent_dim)
        self.model = model

    def start(self, max_length: int) -> None:
        self.cache = None  # a DynamicCache grows as needed

    @torch.no_grad()
    def step(self, input_ids, latents, latent_mask, attention_mask):
        n = input_ids.shape[1]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -n:]  # left padding: real tokens from 0
        input_ids, latents, latent_mask, attention_mask, positions = (
            x.to(self.device) for x in (input_ids, latents, latent_mask, attention_mask, positions))
        out = self.model(input_ids=input_ids, latents=latents, latent_mask=latent_mask, attention_mask=attention_mask,
                         position_ids=positions, use_cache=True, **{CACHE_NAME: self.cache})
        self.cache = getattr(out, CACHE_NAME)
        return out.logits[:, -1].float().cpu(), out.last_hidden_state[:, -1].float().cpu()


def load_sigma_vae(folder: str) -> SigmaVAE:
    return _load_vae(folder, SIGMA_VAE_CONFIG, SIGMA_VAE_WEIGHTS, SigmaVAE, SigmaVAEConfig, "pixels")


def load_audio_vae(folder: str) -> AudioSigmaVAE:
    return _load_vae(folder, AUDIO_VAE_CONFIG, AUDIO_VAE_WEIGHTS, AudioSigmaVAE, AudioVAEConfig, "audio")


def _load_vae(folder, config_name, weights_name, model_class, config_class, output):
    config_path, weights_path = os.path.join(folder, config_name), os.path.join(folder, weights_name)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; this folder ships no such σ-VAE, so latents cannot become "
                                    f"{output}")
    from safetensors.torch import load_file

    with open(config_path) as f:
        meta = json.load(f)
    vae = model_class(config_class.from_dict(meta["config"]))
    vae.load_state_dict(load_file(weights_path))
    vae.latent_stats = LatentStats.from_dict(meta["latent_stats"]) if meta.get("latent_stats") else None
    return vae.eval()
