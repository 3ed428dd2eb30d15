"""Hugging Face configuration of an exported LatentLM.

A `LlamaConfig` (the backbone is exactly Llama's: pre-RMSNorm, SwiGLU, RoPE rotate-half, no biases)
plus what the latent side needs: latent width, diffusion head shape and objective, the special token
ids that switch between text and latents, and the latent count of one image.

Self-contained on purpose: `hf/convert.py` (the export) copies this file into the exported folder.
"""
from __future__ import annotations

from transformers import LlamaConfig


class LatentLMHFConfig(LlamaConfig):
    model_type = "latentlm"

    def __init__(self, latent_dim: int = 16, head_hidden_size: int | None = None,
                 head_ffn_hidden_size: int | None = None, head_layers: int = 2, timestep_embedding_dim: int = 256,
                 num_timesteps: int = 1000, prediction: str = "v", bod_token_id: int | None = None,
                 eod_token_id: int | None = None, latent_token_id: int | None = None,
                 end_of_document_token_id: int | None = None, latents_per_image: int | None = None,
                 num_classes: int | None = None, null_class_token_id: int | None = None,
                 cfg_scale: float | None = None, audio_frame_rate: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = latent_dim
        self.head_hidden_size = head_hidden_size or self.hidden_size
        self.head_ffn_hidden_size = head_ffn_hidden_size or self.head_hidden_size
        self.head_layers = head_layers
        self.timestep_embedding_dim = timestep_embedding_dim
        self.num_timesteps = num_timesteps
        self.prediction = prediction
        self.bod_token_id = bod_token_id
        self.eod_token_id = eod_token_id
        self.latent_token_id = latent_token_id
        self.end_of_document_token_id = end_of_document_token_id
        self.latents_per_image = latents_per_image
        self.num_classes = num_classes  # class-conditional models: class c is id c, for c < num_classes
        self.null_class_token_id = null_class_token_id  # the unconditional stream's class (label dropout's)
        self.cfg_scale = cfg_scale  # guidance the model's preset is sampled with
        self.audio_frame_rate = audio_frame_rate  # speech models: latents per second of their audio σ-VAE
