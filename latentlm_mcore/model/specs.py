"""Layer specs: which implementation builds each Transformer layer.

Transformer Engine (FP8-capable fused layers) when TE imports and a GPU is present, otherwise
megatron's local layers with `SPRMSNorm`. The choice is one swapped `ModuleSpec`; the model does
not branch on it anywhere else.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from latentlm_mcore.compat import SPRMSNorm


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match the driver/torch
        return False
    return True


def te_block_spec(config, vp_stage=None) -> TransformerBlockSubmodules:
    """TE layers; the final norm comes from TE too (RMSNorm per config.normalization)."""
    from megatron.core.extensions.transformer_engine import TENorm

    layer = get_gpt_layer_with_transformer_engine_spec()
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=TENorm)


def local_block_spec(config, vp_stage=None) -> TransformerBlockSubmodules:
    """megatron's local (pure torch) layers with a sequence-parallel capable RMSNorm."""
    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.input_layernorm = SPRMSNorm
    layer.submodules.pre_mlp_layernorm = SPRMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=SPRMSNorm)


def default_block_spec(config, vp_stage=None) -> TransformerBlockSubmodules:
    return te_block_spec(config, vp_stage) if transformer_engine_available() else local_block_spec(config, vp_stage)
