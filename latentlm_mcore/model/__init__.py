"""LatentLM on Megatron-Core: model, layer specs, diffusion head, loss."""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from latentlm_mcore.config import ModelConfig, ParallelConfig
from latentlm_mcore.model.diffusion_head import DiffusionHead
from latentlm_mcore.model.latentlm import LatentLMModel
from latentlm_mcore.model.loss import finalize_latentlm_grads, latentlm_loss
from latentlm_mcore.model.specs import default_block_spec, local_block_spec, te_block_spec, transformer_engine_available


def kernel_imports(module: str) -> bool:
    """Whether the compiled extension `module` (apex / megatron fused kernels) imports here."""
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or an extension built against another torch / CUDA
        return False
    return True


def available_fusions(on_gpu: bool) -> dict:
    """The TransformerConfig fusion switches, each on only where the kernel megatron calls for it imports:
    a switch whose kernel is absent fails at the first forward (softmax), at build (gradient accumulation)
    or at config time (RoPE). bias_activation_fusion and persist_layer_norm stay off: the backbone has no
    biases, and the persistent LayerNorm is apex's LayerNorm, not the RMSNorm used here."""
    te = on_gpu and transformer_engine_available()
    return dict(
        # FusedScaleMaskSoftmax (local attention only; TE's attention is fused by itself)
        masked_softmax_fusion=on_gpu and kernel_imports("scaled_masked_softmax_cuda")
        and kernel_imports("scaled_upper_triang_masked_softmax_cuda"),
        # the wgrad GEMM accumulates into main_grad; our output layer is a local ColumnParallelLinear, so
        # apex's kernel is needed even when TE fuses its own layers
        gradient_accumulation_fusion=on_gpu and kernel_imports("fused_weight_gradient_mlp_cuda"),
        apply_rope_fusion=te,  # TE's fused_apply_rotary_pos_emb
    )


def transformer_config(model: ModelConfig, parallel: ParallelConfig, params_dtype=torch.float32,
                       **overrides) -> TransformerConfig:
    """megatron TransformerConfig for the backbone: pre-RMSNorm, SwiGLU, RoPE, no biases.

    `overrides` pass straight through (FP8 recipe, recompute, dropout, ...). Without CUDA the
    weights are initialised on the CPU, which also makes them identical across TP sizes. Fusions are
    on where their kernels import (`available_fusions`).
    """
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels, normalization="RMSNorm", layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tensor_parallel, sequence_parallel=parallel.sequence_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        pipeline_dtype=params_dtype, params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        batch_p2p_sync=on_gpu,  # the batched p2p path calls torch.cuda.synchronize()
        bias_activation_fusion=False, persist_layer_norm=False, **available_fusions(on_gpu),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(model_cfg: ModelConfig, config: TransformerConfig, block_spec=None, vp_stage=None) -> LatentLMModel:
    """The model chunk of this pipeline stage (megatron's parallel state must be initialised)."""
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    spec = block_spec if block_spec is not None else default_block_spec(config, vp_stage)
    return LatentLMModel(config, model_cfg, spec, pre_process=pre, post_process=post, vp_stage=vp_stage)


__all__ = [
    "DiffusionHead", "LatentLMModel", "available_fusions", "build_model", "default_block_spec", "finalize_latentlm_grads",
    "latentlm_loss", "local_block_spec", "te_block_spec", "transformer_config", "transformer_engine_available",
]
