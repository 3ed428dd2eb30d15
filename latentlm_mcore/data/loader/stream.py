"""The micro-batches one training rank reads: the packed loader of its data-parallel rank, or seeded random
batches in the same format (throughput measurements), with this rank's position for checkpoints. No Megatron here:
the trainer passes the data-parallel rank and gathers the positions.
"""
from __future__ import annotations

import os

from latentlm_mcore.config import LatentLMConfig, RunConfig
from latentlm_mcore.data.loader.synthetic import random_packed_batch


class DataStream:
    """Micro-batches for data-parallel rank `dp_rank` of `dp_size`: its packed loader, or seeded random
    batches. Tensor / pipeline peers of a DP rank pass the same dp_rank and read the same batches."""

    def __init__(self, cfg: LatentLMConfig, run: RunConfig, root: str | None, micro_batch_size: int, seed: int,
                 dp_rank: int, dp_size: int):
        self.cfg = cfg
        self.dp_rank, self.dp_size, self.mbs, self.seed = dp_rank, dp_size, micro_batch_size, seed
        self.loader = None
        self.random_batches_served = 0
        if root is not None:
            from latentlm_mcore.data.loader.mixture import MixtureConfig, StreamMixture, parse_proportions
            from latentlm_mcore.data.loader.packed import LoaderConfig, PackedLoader

            cache = run.data_cache and os.path.join(run.data_cache, f"{os.path.basename(os.path.normpath(root))}-{seed}")
            mixture = StreamMixture(MixtureConfig(dataset_root=root, cache_dir=cache, unit=run.mixture_unit,
                                                  proportions=parse_proportions(run.proportions), seed=seed))
            if mixture.latent_dim != cfg.model.latent_dim:
                raise ValueError(f"{root}: latents have dim {mixture.latent_dim}, the model expects "
                                 f"{cfg.model.latent_dim} (model.latent_dim)")
            tokenizer = mixture.manifest["tokenizer"]
            if tokenizer["vocab_size"] > cfg.model.vocab_size:
                raise ValueError(f"{root}: tokenizer {tokenizer['spec']} needs a vocabulary of {tokenizer['vocab_size']}, "
                                 f"the model has {cfg.model.vocab_size} (model.vocab_size)")
            self.loader = PackedLoader(mixture, LoaderConfig(
                seq_length=cfg.model.seq_length, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                dp_world_size=dp_size, condition_dropout=run.condition_dropout, num_workers=run.num_workers,
                image_first_share=run.image_first_share, sample_latents=run.sample_latents))

    @property
    def manifest(self) -> dict | None:
        """The dataset's manifest (tokenizer, σ-VAE, latent statistics), None for random batches."""
        return self.loader.mixture.manifest if self.loader is not None else None

    def __iter__(self):
        if self.loader is not None:
            yield from self.loader
            return
        m = self.cfg.model
        while True:  # random batches, distinct per DP rank and step: throughput measurements only
            index = self.random_batches_served * self.dp_size + self.dp_rank
            self.random_batches_served += 1
            yield random_packed_batch(self.mbs, m.seq_length, m.vocab_size, m.latent_dim,
                                      num_latents=min(256, m.seq_length // 4), images_per_sequence=1,
                                      seed=self.seed * 1_000_003 + index)

    def state_dict(self) -> dict:
        """This rank's position; the trainer gathers those of every DP rank into the checkpoint."""
        return self.loader.state_dict() if self.loader is not None else {"random_batches_served": self.random_batches_served}

    def load_state_dicts(self, states: list) -> None:
        """The positions of every DP rank of the saving run (any DP size)."""
        if self.loader is not None:
            self.loader.load_state_dict(states)
        else:
            self.random_batches_served = states[0]["random_batches_served"] * len(states) // self.dp_size


class CountingIterator:
    """Passes micro-batches through and counts their diffusion targets (for model FLOPs)."""

    def __init__(self, it):
        self.it, self.latent_targets = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.latent_targets += int(batch["diffusion_mask"].sum())
        return batch
