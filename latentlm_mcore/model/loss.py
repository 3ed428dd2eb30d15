"""The LatentLM objective, token-level over the global batch (paper §2.2), on megatron's per-token
loss mechanism; and the gradient finalisation that makes the data-parallel-only diffusion head right
under tensor parallelism.

    L = L_LM + alpha * L_Diff
    L_LM   = sum of the cross-entropies of all LM targets of the global batch / N_LM
    L_Diff = sum of the per-latent diffusion losses of all latent targets of the global batch / N_Diff

A latent target's `batch_mul` timesteps are averaged within it, so each latent counts once. Neither
term depends on how the global batch is cut into micro-batches and data-parallel ranks: a caption token
weighs what any text token weighs, and a micro-batch without latents changes nothing.

How the sums reach megatron. With `TransformerConfig.calculate_per_token_loss` (set by
`training.step.wrap_with_ddp`) the schedule does not divide a micro-batch's loss by the number of
micro-batches and DDP sums gradients over DP instead of averaging them; `finalize_model_grads` then
divides all gradients by the sum of the `num_tokens` the loss functions returned, all-reduced over DP
(megatron 0.16 skips a zero count, 0.19 clamps it to 1: the same). Megatron normalises one count, we
have two: every micro-batch returns

    loss       = sum_mb CE + alpha * max(N_LM, 1) / max(N_Diff, 1) * sum_mb diffusion
    num_tokens = LM targets of the micro-batch

so the finalised gradient is exactly that of L. The factor needs N_LM / N_Diff of the *global* batch
before the first micro-batch runs: `global_target_counts` reads both counts off the step's micro-batches
(host tensors, no device sync) and all-reduces them over DP, once per step.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.utils import get_attr_wrapped_model


def count_targets(micro_batch: dict) -> torch.Tensor:
    """[LM targets, latent targets] of one micro-batch, int64 on the host (from its host masks)."""
    return torch.stack([(micro_batch["loss_mask"] > 0).sum(), (micro_batch["diffusion_mask"] > 0).sum()]).cpu()


def global_target_counts(micro_batches: list[dict], device) -> torch.Tensor:
    """[N_LM, N_Diff] of the global batch: this rank's micro-batches, summed over data-parallel ranks.
    float64 on `device`; one all-reduce, no host sync."""
    local = sum((count_targets(b) for b in micro_batches), torch.zeros(2, dtype=torch.int64))
    counts = local.to(device=device, dtype=torch.float64, non_blocking=True)
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return counts


def diffusion_weight(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * max(N_LM, 1) / max(N_Diff, 1): the weight of a micro-batch's diffusion sum in the loss it
    returns, so that after megatron's division by N_LM the diffusion term is alpha * L_Diff."""
    n = counts.clamp(min=1)
    return (alpha * n[0] / n[1]).to(torch.float32)


def latentlm_loss(loss_mask: torch.Tensor, micro_batch_counts: torch.Tensor, weight: torch.Tensor, outputs):
    """Megatron `loss_func` (per-token form): `outputs` = LatentLMModel's (CE per token [b, s], diffusion
    loss per latent target of this TP rank's share [n_local]); `micro_batch_counts` = `count_targets` of
    this micro-batch; `weight` = `diffusion_weight` of the global batch.

    Returns (loss to backpropagate, num_tokens, report). The report holds sums and counts
    ("lm_loss_sum", "diffusion_loss_sum" of this TP rank's share, "lm_targets", "diffusion_targets");
    `training.step.reduce_reports` turns them into the token-level L_LM and L_Diff of the global batch.
    """
    lm_per_token, diff_per_latent = outputs
    lm_sum = (lm_per_token.float() * loss_mask.to(torch.float32)).sum()
    diff_sum = diff_per_latent.float().sum()
    loss = lm_sum + weight * diff_sum
    num_tokens = micro_batch_counts[0].to(torch.int)
    report = {"lm_loss_sum": lm_sum.detach().clone(), "diffusion_loss_sum": diff_sum.detach().clone(),
              "lm_targets": micro_batch_counts[0], "diffusion_targets": micro_batch_counts[1]}
    return loss, num_tokens, report


def finalize_latentlm_grads(model, num_tokens=None, **kwargs):
    """megatron's `finalize_model_grads` (DP reduction, division by the global LM-target count), then
    the TP sum of the replicated params' gradients.

    The diffusion head runs on a different share of positions on each TP rank, so its gradient is
    partial per rank; megatron only sums replicated-param gradients over TP for sequence-parallel
    norms. The latent projection needs no sum: its input gradient is complete on every rank.
    Set as `config.finalize_model_grads_func`.
    """
    finalize_model_grads(model, num_tokens=num_tokens, **kwargs)
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    grads = []
    for chunk in model:
        if not get_attr_wrapped_model(chunk, "post_process"):
            continue
        head = get_attr_wrapped_model(chunk, "diffusion_head")
        for p in head.parameters():
            g = getattr(p, "main_grad", None)
            grads.append(p.grad if g is None else g)
    if grads:
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
