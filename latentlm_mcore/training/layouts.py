"""Layout search: every TP x PP (x VPP) x DP layout, micro-batch and recompute that fits a GPU's memory,
with its per-GPU memory breakdown (`training/memory.py`) and estimated step time (`training/flops.py`)."""
from __future__ import annotations

from dataclasses import dataclass

from latentlm_mcore.config import LatentLMConfig
from latentlm_mcore.training.flops import backbone_forward_flops, head_forward_flops
from latentlm_mcore.training.memory import (GIB, Layout, activation_bytes, in_flight_micro_batches, rank_states,
                                            recomputed_layer_bytes)

# memory the planner leaves free on each GPU: CUDA context, NCCL buffers, allocator fragmentation
RESERVE_FRACTION = 0.10


@dataclass
class LayoutPlan:
    layout: Layout
    micro_batch_size: int
    recompute: str | None
    num_micro_batches: int
    stage: str  # the pipeline stage with the most memory
    state_gib: float  # params + grads + optimizer on that stage
    activation_gib: float
    total_gib: float
    step_seconds: float

    def args(self) -> str:
        out = f"{self.layout.args()} --train.micro-batch-size {self.micro_batch_size}"
        return out + (f" --recompute {self.recompute}" if self.recompute else "")


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def candidate_layouts(cfg: LatentLMConfig, gpus: int, gpus_per_node: int, max_pp: int = 16):
    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or gpus % tp or m.num_attention_heads % tp or groups % tp or m.ffn_hidden_size % tp \
                or m.vocab_size % tp:
            continue
        for pp in _divisors(m.num_layers, max_pp):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            vpps = [None] + [v for v in (2, 3, 4) if pp > 2 and m.num_layers % (pp * v) == 0]
            for vpp in vpps:
                yield Layout(tp, pp, dp, vpp, sp=tp > 1)


def step_seconds(cfg: LatentLMConfig, layout: Layout, mbs: int, recompute: str | None, latent_fraction: float,
                 peak_tflops: float, mfu: float) -> float:
    """FLOPs of the global batch per GPU at `mfu` of peak, times the recompute overhead and the pipeline bubble
    ((P-1)/(v m) of idle per step); TP / DP communication is assumed hidden (not modelled)."""
    m, s = cfg.model, cfg.model.seq_length
    forward = backbone_forward_flops(m, s) + head_forward_flops(m, latent_fraction * s)
    if recompute == "full":
        factor = 4.0
    elif recompute == "selective":  # the MLP's forward again (under TE, the one planned for, attention is not recomputed)
        factor = 3.0 + m.num_layers * 2 * 3 * m.hidden_size * m.ffn_hidden_size * s / forward
    else:
        factor = 3.0
    flops = factor * forward * cfg.train.global_batch_size / layout.world
    num_micro = cfg.train.global_batch_size // (layout.dp * mbs)
    bubble = (layout.pp - 1) / ((layout.vpp or 1) * num_micro)
    return flops / (peak_tflops * 1e12 * mfu) * (1 + bubble)


def search_layouts(cfg: LatentLMConfig, gpus: int, gpus_per_node: int, gpu_memory_gib: float, peak_tflops: float,
                   mfu: float, latent_fraction: float, micro_batch_sizes=(1, 2, 4),
                   recomputes=(None, "selective", "full")) -> tuple[list[LayoutPlan], list[LayoutPlan]]:
    """(fitting plans best first, all plans): fastest first, then least model parallelism, then least memory.
    Activations are planned for Transformer Engine's fused (flash) attention, as on the GPUs planned for; it
    keeps no seq x seq scores, so selective recompute saves the MLP's SwiGLU tensors (and costs its forward)."""
    m = cfg.model
    budget = gpu_memory_gib * (1 - RESERVE_FRACTION)
    plans, states = [], {}
    for layout in candidate_layouts(cfg, gpus, gpus_per_node):
        key = (layout.tp, layout.pp, layout.dp, layout.vpp)
        if key not in states:
            states[key] = rank_states(m, layout)
        chunks = layout.pp * (layout.vpp or 1)
        for mbs in micro_batch_sizes:
            if cfg.train.global_batch_size % (layout.dp * mbs):
                continue
            num_micro = cfg.train.global_batch_size // (layout.dp * mbs)
            if layout.vpp and num_micro % layout.pp:
                continue  # megatron's interleaved schedule needs a multiple of PP micro-batches
            for recompute in recomputes:
                worst = None
                for state in states[key]:
                    first, last = state.stage in ("only", "first"), state.stage in ("only", "last")
                    per_micro = activation_bytes(m, mbs, layout.tp, layout.sp, recompute, latent_fraction,
                                                 layers=m.num_layers // chunks * (layout.vpp or 1), first=first,
                                                 last=last)
                    held = in_flight_micro_batches(layout.pp, state.pipeline_rank, layout.vpp, num_micro)
                    # backward rebuilds one layer's recomputed tensors at a time
                    per_micro_recomputed = recomputed_layer_bytes(m, mbs, layout.tp, layout.sp, recompute)
                    total = state.total_bytes + per_micro * held + per_micro_recomputed
                    if worst is None or total > worst[0]:
                        worst = (total, state, per_micro * held + per_micro_recomputed)
                total, state, act = worst
                plans.append(LayoutPlan(layout, mbs, recompute, num_micro, state.stage, state.total_bytes / GIB,
                                        act / GIB, total / GIB,
                                        step_seconds(cfg, layout, mbs, recompute, latent_fraction, peak_tflops, mfu)))
    # equal estimates: less model parallelism first (its TP / PP communication is not in the estimate)
    plans.sort(key=lambda p: (round(p.step_seconds, 2), p.layout.tp * p.layout.pp, p.total_gib))
    return [p for p in plans if p.total_gib <= budget], plans


def layouts_table(plans: list[LayoutPlan], limit: int = 10) -> str:
    head = f"{'TP':>3} {'PP':>3} {'VPP':>3} {'DP':>4} {'SP':>3} {'mbs':>3} {'recompute':>9} {'stage':>6} " \
           f"{'state GiB':>9} {'act GiB':>8} {'total GiB':>9} {'step s':>7}"
    rows = [head]
    for p in plans[:limit]:
        lay = p.layout
        rows.append(f"{lay.tp:>3} {lay.pp:>3} {lay.vpp or '-':>3} {lay.dp:>4} {'y' if lay.sp else 'n':>3} "
                    f"{p.micro_batch_size:>3} {p.recompute or 'none':>9} {p.stage:>6} {p.state_gib:>9.1f} "
                    f"{p.activation_gib:>8.1f} {p.total_gib:>9.1f} {p.step_seconds:>7.2f}")
    return "\n".join(rows)
