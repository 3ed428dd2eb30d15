"""Loss of one micro-batch: L = L_LM + alpha * L_Diff, and the gradient finalisation that makes the
data-parallel-only diffusion head correct under tensor parallelism."""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.utils import get_attr_wrapped_model


def latentlm_loss(loss_mask: torch.Tensor, diffusion_loss_weight: float, outputs):
    """Megatron `loss_func`: `outputs` = LatentLMModel's (lm per token [b,s], diffusion per local
    latent [n], latents in micro-batch []). Returns (loss to backpropagate, report dict).

    L_LM is the mean cross-entropy over `loss_mask`; L_Diff the mean over all latents of the
    micro-batch. Each TP rank backpropagates only its share of L_Diff (its positions), so the
    reported diffusion loss is summed over the TP group. Reported values are clones because the
    pipeline schedule divides the returned loss in place.
    """
    lm_per_token, diff_per_latent, num_latents = outputs
    loss_mask = loss_mask.to(lm_per_token.dtype)
    lm = (lm_per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    diff_share = diff_per_latent.float().sum() / num_latents.clamp(min=1)
    total = lm.float() + diffusion_loss_weight * diff_share

    diff = diff_share.detach().clone()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(diff, group=parallel_state.get_tensor_model_parallel_group())
    lm = lm.detach().clone().float()
    return total, {"loss": lm + diffusion_loss_weight * diff, "lm loss": lm, "diffusion loss": diff}


def finalize_latentlm_grads(model, num_tokens=None, **kwargs):
    """megatron's `finalize_model_grads`, then the TP sum of the replicated params' gradients.

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
