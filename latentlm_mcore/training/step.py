"""One optimizer step on Megatron-Core: DDP + (distributed) optimizer + pipeline schedule."""
from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from latentlm_mcore.config import ParallelConfig, TrainConfig
from latentlm_mcore.model import finalize_latentlm_grads, latentlm_loss

# The packed-batch fields the model consumes (see the data packer for their meaning).
MODEL_INPUTS = ("tokens", "position_ids", "latents", "latent_mask", "labels", "diffusion_targets",
                "diffusion_mask", "noise_seed")


def device_batch(batch: dict) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_step(data_iterator, model):
    """megatron `forward_step_func`: every pipeline stage reads the same micro-batch (stages only
    use the fields they need), so TP and PP peers must be fed identical batches."""
    batch = device_batch(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], latents=batch["latents"],
                   latent_mask=batch["latent_mask"], labels=batch["labels"],
                   diffusion_targets=batch["diffusion_targets"], diffusion_mask=batch["diffusion_mask"],
                   noise_seed=batch["noise_seed"])
    alpha = get_attr_wrapped_model(model, "model_cfg").diffusion_loss_weight
    return output, partial(latentlm_loss, batch["loss_mask"], alpha)


def wrap_with_ddp(chunks, parallel: ParallelConfig, overlap_grad_reduce: bool = False):
    """megatron DDP around each model chunk; grads reduced in fp32. Wires the schedule's hooks."""
    config = get_model_config(chunks[0])
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=parallel.distributed_optimizer)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_latentlm_grads
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def build_optimizer(chunks, train: TrainConfig, parallel: ParallelConfig, params_dtype=torch.float32):
    """AdamW (decoupled weight decay, none on norms and biases) with global-norm gradient clipping."""
    cfg = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        params_dtype=params_dtype, use_distributed_optimizer=parallel.distributed_optimizer)
    return get_megatron_optimizer(cfg, chunks)


def forward_backward(chunks, data_iterator, num_microbatches: int, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False) -> list[dict]:
    """megatron's schedule (1F1B / interleaved when PP > 1) over `num_microbatches`; gradients
    end reduced in the DDP buffers (`finalize_latentlm_grads`). Reports exist on the last stage."""
    if not forward_only:
        for chunk in chunks:
            chunk.zero_grad_buffer()
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=chunks,
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)


def train_step(chunks, optimizer, data_iterator, num_microbatches: int, seq_length: int,
               micro_batch_size: int) -> dict:
    """Forward/backward over `num_microbatches`, then one optimizer step.

    Returns the mean of each reported loss over micro-batches and data-parallel ranks, valid on
    every rank, plus grad_norm and whether the update was applied.
    """
    optimizer.zero_grad()
    reports = forward_backward(chunks, data_iterator, num_microbatches, seq_length, micro_batch_size)
    update_ok, grad_norm, _ = optimizer.step()
    result = reduce_reports(reports)
    result.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), update_ok=bool(update_ok))
    return result


def reduce_reports(reports: list[dict]) -> dict:
    """Mean over micro-batches and data-parallel ranks, made available on every rank."""
    keys = ("loss", "lm loss", "diffusion loss")
    values = torch.zeros(len(keys), dtype=torch.float64)
    if reports:  # only the last pipeline stage has them
        values = torch.tensor([[float(r[k]) for k in keys] for r in reports], dtype=torch.float64).mean(0)
    if torch.cuda.is_available():
        values = values.cuda()
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= parallel_state.get_data_parallel_world_size()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(values, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    return dict(zip(keys, values.tolist()))


def evaluate(chunks, data_iterator, num_microbatches: int, seq_length: int, micro_batch_size: int) -> dict:
    """Forward-only pass over `num_microbatches`; same reduction as `train_step`."""
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        reports = forward_backward(chunks, data_iterator, num_microbatches, seq_length, micro_batch_size,
                                   forward_only=True)
    for chunk in chunks:
        chunk.train()
    return reduce_reports(reports)
