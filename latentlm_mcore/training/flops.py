"""Model FLOPs of a training step (forward + backward = 3x forward), for throughput and MFU.

Matmul FLOPs only (2 per multiply-add), counting full (non-causal) attention scores as Megatron's
reporting does. The diffusion head adds, per latent target, its condition projection once and its
network `batch_mul` times.
"""
from __future__ import annotations

from latentlm_mcore.config import ModelConfig


def backbone_forward_flops(cfg: ModelConfig, seq_length: int) -> float:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    kv = (cfg.num_query_groups or cfg.num_attention_heads) * cfg.kv_channels
    per_token = cfg.num_layers * (h * (h + 2 * kv) + h * h + 3 * h * f) + h * cfg.vocab_size
    attention = cfg.num_layers * 2 * seq_length * seq_length * h  # QK^T and AV
    return 2.0 * (per_token * seq_length + attention)


def head_forward_flops(cfg: ModelConfig, num_latent_targets: int) -> float:
    hh, hf, d = cfg.head_hidden_size, cfg.head_ffn_hidden_size, cfg.latent_dim
    per_pass = (cfg.timestep_embedding_dim * hh + hh * hh + d * hh
                + cfg.head_layers * (3 * hh * hh + 3 * hh * hf) + 2 * hh * hh + hh * d)
    per_latent = cfg.hidden_size * hh + cfg.batch_mul * per_pass
    return 2.0 * per_latent * num_latent_targets


def training_flops(cfg: ModelConfig, seq_length: int, num_latent_targets: float = 0, num_sequences: float = 1) -> float:
    """FLOPs of forward + backward for `num_sequences` sequences of `seq_length` holding `num_latent_targets`
    diffusion targets between them: the one formula of throughput, MFU and run plans."""
    return 3.0 * (num_sequences * backbone_forward_flops(cfg, seq_length) + head_forward_flops(cfg, num_latent_targets))
