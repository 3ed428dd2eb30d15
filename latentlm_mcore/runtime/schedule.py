"""Linear warmup then cosine decay, for optimisers that Megatron's OptimizerParamScheduler does not drive
(the σ-VAE's AdamW). Pretraining uses Megatron's scheduler with the same shape; one difference: here the
first step already trains at lr/warmup_steps (Megatron's starts at 0)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The LR factor at 0-based `step`: (step + 1) / warmup_steps during warmup, then a cosine from 1 down to
    `min_ratio` at `total_steps`, and `min_ratio` after it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizers, lr: float) -> None:
    """Set every param group's LR to `lr` times its `lr_scale` (1 when absent: layer-wise decay groups carry one)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
