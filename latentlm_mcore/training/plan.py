"""Back-of-the-envelope plan of a pretraining run: steps, batch, FLOPs, wall time, GPU-hours."""
from __future__ import annotations

from dataclasses import dataclass

from latentlm_mcore.config import LatentLMConfig
from latentlm_mcore.training.flops import training_flops


@dataclass
class RunPlan:
    preset: str
    tokens: float
    steps: int
    global_batch_sequences: int
    tokens_per_step: int
    gpus: int
    sequences_per_gpu_per_step: float
    flops_per_token: float
    total_flops: float
    sustained_tflops_per_gpu: float
    wall_hours: float
    gpu_hours: float

    def table(self) -> str:
        rows = [
            ("preset", self.preset),
            ("token budget", f"{self.tokens:.3g}"),
            ("global batch", f"{self.global_batch_sequences} sequences = {self.tokens_per_step:,} tokens"),
            ("optimizer steps", f"{self.steps:,}"),
            ("GPUs", f"{self.gpus} ({self.sequences_per_gpu_per_step:g} sequences per GPU per step)"),
            ("model FLOPs per token", f"{self.flops_per_token:.3g}"),
            ("total model FLOPs", f"{self.total_flops:.3g}"),
            ("sustained per GPU", f"{self.sustained_tflops_per_gpu:.0f} TFLOP/s"),
            ("wall time", f"{self.wall_hours:,.1f} h = {self.wall_hours / 24:,.1f} days"),
            ("GPU-hours", f"{self.gpu_hours:,.0f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plan_run(cfg: LatentLMConfig, tokens: float, nodes: int, gpus_per_node: int, mfu: float,
             peak_tflops: float, latent_fraction: float) -> RunPlan:
    """`latent_fraction`: share of positions whose next token is a latent (diffusion-head work)."""
    m, seq = cfg.model, cfg.model.seq_length
    tokens_per_step = cfg.train.global_batch_size * seq
    steps = int(round(tokens / tokens_per_step))
    per_sequence = training_flops(m, seq, num_latent_targets=latent_fraction * seq)
    flops_per_token = per_sequence / seq
    total = flops_per_token * steps * tokens_per_step
    gpus = nodes * gpus_per_node
    sustained = peak_tflops * mfu
    wall_s = total / (gpus * sustained * 1e12)
    return RunPlan(cfg.name, tokens, steps, cfg.train.global_batch_size, tokens_per_step, gpus,
                   cfg.train.global_batch_size / gpus, flops_per_token, total, sustained, wall_s / 3600,
                   wall_s * gpus / 3600)


def mixture_latent_fraction(dataset_roots: str | list[str], proportions: dict, unit: str = "tokens") -> float:
    """The share of tokens that are latents in the mixture the loader draws from these preprocessed
    datasets (their manifests' per-source token and latent counts, the loader's `document_weights`)."""
    from latentlm_mcore.data import schema
    from latentlm_mcore.data.loader.mixture import document_weights, expected_latent_fraction, source_statistics

    roots = [dataset_roots] if isinstance(dataset_roots, str) else list(dataset_roots)
    statistics = source_statistics([schema.read_manifest(r) for r in roots])
    return expected_latent_fraction(document_weights(proportions, statistics, unit), statistics)
