"""The trainer's periodic FID: class-to-image samples from the live model, scored as tools/evaluate_images.py
scores them (issue 12; DiT's measure, which the paper's Table 1 reports).

Every `--eval-fid-every N` steps, `--fid-num-samples` images: sample i has class i mod (number of classes),
each data-parallel rank generates a contiguous share of them, and all TP ranks of a DP rank take part in
the same forward passes (the generation is the inference code's: `Generator.class_to_image` over
`MegatronKVDecoder`, on the training model itself; the preset's CFG scale with the null class in the same
batch, 20 DPM-Solver++ steps, batches of `train.micro_batch_size` labels, seeded by the sample index, so every
evaluation draws the same noise). The run's σ-VAE (the dataset's provenance) decodes them; TP rank 0 of each
DP rank extracts their Inception features; one gather brings images and features to rank 0, which computes
FID (Inception Score when the weights have the classifier, precision/recall when the reference has
activations) against `--fid-reference`, writes the images as `<save>/fid/iter_<N>.npz` (ADM's sample
format: `arr_0` uint8 [N, H, W, 3], plus `labels`) and logs the metrics under `eval` at that step.
`--fid-use-ema` samples from the EMA of the weights (training/ema.py) instead, as DiT evaluates.

An evaluation leaves training as it was: the model goes back to train mode, the weights back from the EMA,
every RNG (python, numpy, torch, CUDA, megatron's tracker) back to its state, and the data stream is not
read, so a run with the hook has the losses of a run without it (tests/training/test_fid_hook.py).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from megatron.core import parallel_state

from latentlm_mcore.config import LatentLMConfig, RunConfig
from latentlm_mcore.training.trainer import TrainerCallback


@contextmanager
def eval_mode(chunks):
    """Inside: every chunk in eval mode (no dropout); after, each back in the mode it had."""
    modes = [chunk.training for chunk in chunks]
    try:
        for chunk in chunks:
            chunk.eval()
        yield
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


class FIDEvaluation(TrainerCallback):
    name = "fid"

    def __init__(self, run: RunConfig, cfg: LatentLMConfig):
        if run.eval_fid_every < 0:
            raise ValueError(f"--eval-fid-every must be >= 0 (0 = off), got {run.eval_fid_every}")
        if not run.fid_reference:
            raise ValueError("--eval-fid-every needs --fid-reference: reference statistics (an .npz from "
                             "tools/evaluate_images.py --save-reference, or ADM's reference batch)")
        if not os.path.exists(run.fid_reference):
            raise FileNotFoundError(f"--fid-reference {run.fid_reference}: no such file or folder")
        if run.fid_num_samples < 2:
            raise ValueError(f"--fid-num-samples must be at least 2 (FID fits a Gaussian), got {run.fid_num_samples}")
        p = cfg.parallel
        if p.pipeline_parallel > 1 or p.virtual_pipeline_parallel or p.sequence_parallel:
            raise ValueError("--eval-fid-every: generation needs the whole model in each tensor-parallel group "
                             f"without sequence parallelism; this run has PP={p.pipeline_parallel}, VPP="
                             f"{p.virtual_pipeline_parallel}, SP={p.sequence_parallel} (not supported yet)")
        if run.fid_use_ema and not cfg.train.ema_decay:
            raise ValueError("--fid-use-ema: this run keeps no EMA of the weights (train.ema_decay 0)")
        self.run, self.every, self.num_samples = run, run.eval_fid_every, run.fid_num_samples
        self.cfg_scale = cfg.cfg_scale or 1.0
        self.batch_size, self.seed = cfg.train.micro_batch_size, cfg.train.seed
        self.generator = None

    def on_fit_start(self, trainer) -> None:
        """Refuse a run that cannot be scored before its first step; load the σ-VAE, Inception and reference."""
        from megatron.core.utils import unwrap_model

        from latentlm_mcore.data.tokenizer import load_tokenizer
        from latentlm_mcore.evaluation.images import load_reference
        from latentlm_mcore.evaluation.inception import InceptionV3
        from latentlm_mcore.inference.megatron import MegatronKVDecoder
        from latentlm_mcore.inference.tasks import Generator
        from latentlm_mcore.training.provenance import Provenance, resolve_sigma_vae
        from latentlm_mcore.training.step import compute_device
        from latentlm_mcore.vae import LatentStats, load_sigma_vae

        manifest = trainer.data.manifest if trainer.data is not None else None
        if manifest is None:
            raise ValueError("--eval-fid-every needs a class-conditional dataset (--data): its manifest names the "
                             "class vocabulary and the σ-VAE that decodes the samples")
        provenance = Provenance.from_manifest(manifest, self.run.data)
        tokenizer = load_tokenizer(provenance.tokenizer)
        if not hasattr(tokenizer, "num_classes"):
            raise ValueError(f"--eval-fid-every: class-to-image samples need a class-conditional run (data "
                             f"preprocessed with --tokenizer classes:N); {self.run.data} uses {provenance.tokenizer}")
        vae = load_sigma_vae(resolve_sigma_vae(provenance, self.run.save))
        if provenance.latent_stats is not None:  # the scaling the dataset's latents were stored with
            vae.latent_stats = LatentStats.from_dict(provenance.latent_stats)
        if vae.latent_stats is None:
            raise ValueError(f"--eval-fid-every: {self.run.data} and its σ-VAE record no latent statistics, "
                             "which unscale the model's latents for decoding")
        if self.run.fid_use_ema:
            (self.ema,) = [c for c in trainer.callbacks if c.name == "ema"]
        self.num_classes = tokenizer.num_classes
        # the chunk inside megatron's DDP: Float16Module (bf16 runs) or the model itself
        model = trainer.chunks[0].module if hasattr(trainer.chunks[0], "module") else trainer.chunks[0]
        assert unwrap_model(model) is unwrap_model(trainer.chunks[0])
        self.generator = Generator.with_vocabulary(MegatronKVDecoder(model), tokenizer, vae, self.cfg_scale)
        self.device = compute_device()
        self.net = InceptionV3(self.run.fid_inception_weights).eval().to(self.device)
        self.reference = load_reference(self.run.fid_reference, self.net, device=self.device)  # on every rank alike

    def on_step_end(self, trainer, result: dict) -> None:
        if trainer.iteration % self.every == 0:
            self.evaluate(trainer)

    def _weights(self, trainer):
        if not self.run.fid_use_ema:
            return nullcontext()
        from latentlm_mcore.training.ema import weights_swapped

        return weights_swapped([(p, t.to(p.dtype)) for p, t in self.ema.full_tensors().items()])

    def generate_share(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, uint8 images [n, H, W, 3]) of this DP rank's contiguous share of the samples."""
        from latentlm_mcore.inference.generation import SamplingConfig
        from latentlm_mcore.inference.tasks import image_to_uint8

        rank, world = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        bounds = np.linspace(0, self.num_samples, world + 1).astype(int)
        labels = np.arange(bounds[rank], bounds[rank + 1]) % self.num_classes
        images = []
        for b in range(0, len(labels), self.batch_size):
            sampling = SamplingConfig(cfg_scale=self.cfg_scale, seed=self.seed + int(bounds[rank]) + b)
            generations = self.generator.class_to_image(labels[b:b + self.batch_size].tolist(), sampling, progress=False)
            images += [image_to_uint8(g.images[0]).numpy() for g in generations]
        return labels, np.stack(images)

    @torch.no_grad()
    def evaluate(self, trainer) -> dict | None:
        """Generate, score and log at `trainer.iteration`; the metrics on rank 0 (None elsewhere)."""
        from latentlm_mcore.evaluation.images import inception_features, metrics_of_features
        from latentlm_mcore.evaluation.inception import POOL_DIM
        from latentlm_mcore.runtime.files import atomic_write
        from latentlm_mcore.training.checkpoint import rng_preserved
        from latentlm_mcore.training.step import params_synced

        began = time.time()
        with rng_preserved(), params_synced(trainer.chunks), eval_mode(trainer.chunks), self._weights(trainer):
            labels, images = self.generate_share()
        if parallel_state.get_tensor_model_parallel_rank() != 0:  # its TP rank 0 holds the same images
            return None
        features = inception_features(images, 0, len(images), self.net, device=self.device).numpy()
        shares = [None] * parallel_state.get_data_parallel_world_size() if torch.distributed.get_rank() == 0 else None
        torch.distributed.gather_object((labels, images, features), shares, dst=0,
                                        group=parallel_state.get_data_parallel_group())
        if shares is None:
            return None
        labels, images, features = (np.concatenate(parts) for parts in zip(*shares))
        metrics = metrics_of_features(features[:, :POOL_DIM], features[:, POOL_DIM:], self.reference,
                                      self.net.has_classifier)
        with atomic_write(os.path.join(self.run.save, "fid", f"iter_{trainer.iteration:07d}.npz"), "wb") as f:
            np.savez(f, arr_0=images, labels=labels)
        metrics = {k: v for k, v in metrics.items() if k != "num_reference"}
        metrics["fid_seconds"] = time.time() - began
        if trainer.logger is not None:
            trainer.logger.log(trainer.iteration, metrics, split="eval")
        return metrics
