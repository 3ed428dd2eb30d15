"""Measured activation memory of one micro-batch, on this process's device (CPU or GPU), with torch's
memory tracker: the yardstick `memory.activation_bytes` is checked against (bench/memory_activations.py).

`measure_activations` builds the real model (megatron's local layers, TP = PP = 1, one process), runs the
forward of one micro-batch with the loss and reports the bytes allocated by it that are still alive when
the forward ends (what backward needs, and what each in-flight micro-batch of a pipeline schedule holds),
plus the peak over forward and backward, both above the parameters.
"""
from __future__ import annotations

import torch

from latentlm_mcore.config import ModelConfig, ParallelConfig


def measure_activations(model_cfg: ModelConfig, micro_batch_size: int, recompute: str | None,
                        latent_fraction: float = 0.25, params_dtype=torch.bfloat16, seed: int = 0) -> dict:
    """{"forward_end": bytes, "peak": bytes} above the model's parameters; latent_fraction of the positions
    are latents (images of model_cfg.seq_length * latent_fraction // 2 latents, two per sequence)."""
    from megatron.core import parallel_state
    from torch.distributed._tools.mem_tracker import MemTracker

    from latentlm_mcore.model import build_model, latentlm_loss, local_block_spec, transformer_config
    from latentlm_mcore.model.loss import count_targets, diffusion_weight
    from latentlm_mcore.training.step import device_batch
    from latentlm_mcore.data.loader.synthetic import random_packed_batch
    from latentlm_mcore.training.trainer import numerics_overrides
    from latentlm_mcore.config import RunConfig

    overrides = numerics_overrides(RunConfig(recompute=recompute))
    config = transformer_config(model_cfg, ParallelConfig(), params_dtype=params_dtype, **overrides)
    model = build_model(model_cfg, config, block_spec=local_block_spec(config))
    num_latents = max(1, int(model_cfg.seq_length * latent_fraction) // 2)
    batch = device_batch(random_packed_batch(micro_batch_size, model_cfg.seq_length, model_cfg.vocab_size,
                                             model_cfg.latent_dim, num_latents, 2, seed))
    counts = count_targets(batch)
    weight = diffusion_weight(counts.double(), model_cfg.diffusion_loss_weight)
    def step():
        out = model(batch["tokens"], batch["position_ids"], latents=batch["latents"],
                    latent_mask=batch["latent_mask"], labels=batch["labels"],
                    diffusion_targets=batch["diffusion_targets"], diffusion_mask=batch["diffusion_mask"],
                    noise_seed=batch["noise_seed"])
        loss, num_tokens, _ = latentlm_loss(batch["loss_mask"], counts, weight, out)
        return loss / num_tokens

    # megatron's global memory buffer (attention-score workspace) keeps the size of the largest earlier request, and
    # the tracker would count the whole of it: start it afresh for this shape
    parallel_state.destroy_global_memory_buffer()
    parallel_state._set_global_memory_buffer()
    # one untracked step first: megatron's global memory buffer (the attention scores' workspace, kept for the
    # process's lifetime) and the parameters' .grad exist before the measured micro-batch, as they do in training
    step().backward()

    def above_params(snapshot, device):
        return sum(v for k, v in snapshot.get(device, {}).items() if str(k) != "Total" and "PARAM" not in str(k)
                   and "GRAD" not in str(k))

    results = []
    for _ in range(2):  # the smaller of two: a first tracked step can still meet a lazily created workspace
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            before = tracker.get_tracker_snapshot()
            loss = step()
            after = tracker.get_tracker_snapshot()
            loss.backward()
            peak = tracker.get_tracker_snapshot("peak")
        device = next(iter(after))
        base = above_params(before, device)
        results.append({"forward_end": above_params(after, device) - base, "peak": above_params(peak, device) - base})
    return min(results, key=lambda r: r["forward_end"])
