"""One optimizer step on Megatron-Core: DDP + (distributed) optimizer + pipeline schedule."""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model, get_model_config

from latentlm_mcore.config import ParallelConfig, TrainConfig
from latentlm_mcore.model.loss import (count_targets, diffusion_weight, finalize_latentlm_grads, global_target_counts,
                                      latentlm_loss)

# Batch fields the model reads on the host: the diffusion noise seeds and the latent-target mask decide
# which rows the diffusion head sees, and reading them back from the device would stall every micro-batch.
HOST_FIELDS = ("noise_seed", "diffusion_mask")


def compute_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_batch(batch: dict) -> dict:
    """The batch with its tensors on the compute device, except `HOST_FIELDS`."""
    device = compute_device()
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in HOST_FIELDS else v
            for k, v in batch.items()}


def forward_step(weight: torch.Tensor, data_iterator, model):
    """megatron `forward_step_func` (bound to the global batch's `diffusion_weight` with partial):
    every pipeline stage reads the same micro-batch (stages only use the fields they need), so TP and
    PP peers must be fed identical batches."""
    host = next(data_iterator)
    batch = device_batch(host)
    output = model(batch["tokens"], batch["position_ids"], latents=batch["latents"],
                   latent_mask=batch["latent_mask"], labels=batch["labels"],
                   diffusion_targets=batch["diffusion_targets"], diffusion_mask=batch["diffusion_mask"],
                   noise_seed=batch["noise_seed"])
    return output, partial(latentlm_loss, batch["loss_mask"], count_targets(host), weight)


def wrap_with_ddp(chunks, parallel: ParallelConfig, overlap: bool | None = None):
    """megatron DDP around each model chunk; grads reduced in fp32. Wires the schedule's hooks and
    turns on megatron's per-token loss normalisation, which `latentlm_loss` is written for (the
    token-level objective, see model/loss.py): set before DDP is built, which reads it.

    `overlap` (default: on a GPU): each gradient bucket's reduction starts as soon as its gradients are
    ready in the backward pass, and with the distributed optimizer the updated parameters' all-gather
    runs under the next forward pass (megatron's forward pre-hooks); read parameters after a step
    through `params_synced`."""
    config = get_model_config(chunks[0])
    config.calculate_per_token_loss = True
    overlap = torch.cuda.is_available() if overlap is None else overlap
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
        overlap_param_gather=overlap and parallel.distributed_optimizer,
        use_distributed_optimizer=parallel.distributed_optimizer)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_latentlm_grads
    config.no_sync_func = [c.no_sync for c in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


@contextmanager
def params_synced(chunks):
    """Inside: every parameter holds its value after the last optimizer step. With the overlapped
    parameter all-gather (`wrap_with_ddp`) the gather is pending until the next forward pass; what reads
    parameters outside one (checkpoint save, evaluation, export) forces it and drops the pre-hooks for
    the while, as megatron-LM's training loop does."""
    overlapped = [c for c in chunks if getattr(c, "ddp_config", None) is not None and c.ddp_config.overlap_param_gather]
    for chunk in overlapped:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in overlapped:
            chunk.enable_forward_pre_hook()


def build_optimizer(chunks, train: TrainConfig, parallel: ParallelConfig, params_dtype=torch.float32):
    """AdamW (decoupled weight decay, none on norms and biases) with global-norm gradient clipping."""
    overlap_param_gather = any(getattr(c, "ddp_config", None) is not None and c.ddp_config.overlap_param_gather
                               for c in chunks)
    cfg = OptimizerConfig(
        overlap_param_gather=overlap_param_gather,
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        params_dtype=params_dtype, use_distributed_optimizer=parallel.distributed_optimizer)
    return get_megatron_optimizer(cfg, chunks)


def forward_backward(chunks, data_iterator, num_microbatches: int, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False) -> dict:
    """megatron's schedule (1F1B / interleaved when PP > 1) over `num_microbatches`; gradients end
    reduced in the DDP buffers (`finalize_latentlm_grads`), as those of the token-level loss of the
    global batch. `data_iterator`: one iterator of host micro-batches, or one per model chunk (virtual
    pipeline stages), yielding the same micro-batches.

    The step's micro-batches are read first: the global counts of LM and latent targets (one DP
    all-reduce) fix the diffusion term's weight before the first micro-batch runs. Returns
    `reduce_reports`' token-level losses, valid on every rank.
    """
    iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
    micro_batches = [[next(it) for _ in range(num_microbatches)] for it in iterators]
    model_cfg = get_attr_wrapped_model(chunks[0], "model_cfg")
    counts = global_target_counts(micro_batches[0], compute_device())
    feeds = [iter(batches) for batches in micro_batches]
    if not forward_only:
        for chunk in chunks:
            chunk.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, diffusion_weight(counts, model_cfg.diffusion_loss_weight)),
        data_iterator=feeds if len(feeds) > 1 else feeds[0], model=chunks,
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)
    return reduce_reports(reports, model_cfg.diffusion_loss_weight)


def train_step(chunks, optimizer, data_iterator, num_microbatches: int, seq_length: int,
               micro_batch_size: int) -> dict:
    """Forward/backward over `num_microbatches`, then one optimizer step.

    Returns the token-level losses of the global batch (`reduce_reports`), valid on every rank, plus
    grad_norm and whether the update was applied.
    """
    optimizer.zero_grad()
    result = forward_backward(chunks, data_iterator, num_microbatches, seq_length, micro_batch_size)
    update_ok, grad_norm, _ = optimizer.step()
    result.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), update_ok=bool(update_ok))
    return result


def reduce_reports(reports: list[dict], diffusion_loss_weight: float) -> dict:
    """The token-level L_LM, L_Diff and L = L_LM + alpha * L_Diff of the global batch, and its target
    counts, made available on every rank: the micro-batches' loss sums and target counts are added up,
    the diffusion sums over TP (each TP rank holds its share of the positions), everything over DP, and
    the result is broadcast from the last pipeline stage. One read-back from the device per step."""
    device = compute_device()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.float64)
    if reports:  # only the last pipeline stage has them
        sums = torch.stack([torch.stack([r["lm_loss_sum"], r["diffusion_loss_sum"]]) for r in reports]).double().sum(0)
        counts = torch.stack([torch.stack([r["lm_targets"], r["diffusion_targets"]]) for r in reports]).double().sum(0)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            diffusion = sums[1:].contiguous()
            torch.distributed.all_reduce(diffusion, group=parallel_state.get_tensor_model_parallel_group())
            sums = torch.cat([sums[:1], diffusion])
    values = torch.cat([sums, counts.to(device, non_blocking=True)])
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(values, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    lm_sum, diffusion_sum, lm_targets, diffusion_targets = values.tolist()
    lm, diffusion = lm_sum / max(lm_targets, 1.0), diffusion_sum / max(diffusion_targets, 1.0)
    return {"loss": lm + diffusion_loss_weight * diffusion, "lm_loss": lm, "diffusion_loss": diffusion,
            "lm_targets": int(lm_targets), "diffusion_targets": int(diffusion_targets)}


def evaluate(chunks, data_iterator, num_microbatches: int, seq_length: int, micro_batch_size: int) -> dict:
    """Forward-only pass over `num_microbatches`: the token-level losses of those micro-batches of every
    DP rank together, as `train_step` reports them."""
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad(), params_synced(chunks):
        result = forward_backward(chunks, data_iterator, num_microbatches, seq_length, micro_batch_size,
                                  forward_only=True)
    for chunk in chunks:
        chunk.train()
    return result
