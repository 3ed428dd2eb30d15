"""The image σ-VAE trainer on `vae/trainer.py`'s loop: ViT encoder (from pretrained ViT weights, then with
layer-wise LR decay, or from scratch) and decoder, random-resized crops, MSE + σ-VAE prior, optional perceptual
and patch-GAN losses (adaptive weight), PSNR and a reconstruction grid at each eval, and the exported σ-VAE
file (with latent statistics) at each checkpoint and at the end.

Files under `out_dir` besides the loop's (vae/trainer.py):
  sigma_vae.pt    the exported σ-VAE for the data pipeline (`load_sigma_vae`), with latent statistics
  samples/step_XXXXXXX.png   originals (top row) vs reconstructions (bottom row) of held-out images
"""

import logging
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset

from latentlm_mcore.runtime.files import atomic_write
from latentlm_mcore.runtime.lease import check_may_publish
from latentlm_mcore.training.preflight import check_sigma_vae, describe_sigma_vae, probe_machine
from latentlm_mcore.vae.config import SigmaVAEConfig
from latentlm_mcore.vae.data import ImageDataset, InfiniteDistributedSampler, list_images
from latentlm_mcore.vae.losses import (PatchDiscriminator, VGG16PerceptualLoss, adaptive_gan_weight, hinge_d_loss,
                                       hinge_g_loss, sigma_vae_loss)
from latentlm_mcore.vae.model import SigmaVAE, save_sigma_vae
from latentlm_mcore.vae.optim import encoder_param_groups
from latentlm_mcore.vae.pretrained import load_pretrained_encoder
from latentlm_mcore.vae.stats import LatentStats, compute_latent_stats
from latentlm_mcore.vae.trainer import TrainConfig, VAETrainer, chunks

log = logging.getLogger(__name__)


def psnr(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2); reconstructions are clamped."""
    mse = (recon.clamp(-1, 1).float() - images.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def save_image_grid(path: str, rows: list[torch.Tensor]) -> None:
    """Rows of [N, 3, H, W] images in [-1, 1] -> one PNG, rows stacked vertically, 2px gaps."""
    n, _, h, w = rows[0].shape
    gap = 2
    canvas = np.full((len(rows) * (h + gap) - gap, n * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        pixels = ((row.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
        for i in range(n):
            canvas[r * (h + gap):r * (h + gap) + h, i * (w + gap):i * (w + gap) + w] = pixels[i].numpy()
    with atomic_write(path, "wb") as f:
        Image.fromarray(canvas).save(f, format="png")


class SigmaVAETrainer(VAETrainer):
    """The image σ-VAE on `VAETrainer`: ViT encoder and decoder, random-resized crops, MSE + σ-VAE prior
    (+ perceptual, + patch-GAN), PSNR and a sample grid at each eval, `sigma_vae.pt` with latent statistics."""

    def __init__(self, model_cfg: SigmaVAEConfig, cfg: TrainConfig):
        machine = probe_machine()
        check_sigma_vae(model_cfg, cfg, machine)  # PreflightError naming every option this machine cannot run
        super().__init__(cfg)
        self.model_cfg = model_cfg
        if self.is_main:
            log.info(describe_sigma_vae(model_cfg, cfg, machine, self.world_size))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
        self.export_path = os.path.join(cfg.out_dir, "sigma_vae.pt")

        self.vae = SigmaVAE(model_cfg)
        self.encoder_init = None
        if cfg.init_encoder and not os.path.exists(self.ckpt_path):
            self.encoder_init = load_pretrained_encoder(self.vae.encoder, cfg.init_encoder)
        self.vae.to(self.device)
        # Layer-wise LR decay protects pretrained low layers; a random encoder trains at the full LR throughout.
        layer_decay = cfg.layer_decay if cfg.init_encoder else 1.0
        self.opt = torch.optim.AdamW(encoder_param_groups(self.vae, cfg.lr, cfg.weight_decay, layer_decay),
                                     lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.perceptual = VGG16PerceptualLoss(cfg.vgg16_weights).to(self.device) if cfg.perceptual_weight > 0 else None
        self.disc = self.disc_opt = None
        if cfg.gan_enabled:
            self.disc = PatchDiscriminator(model_cfg.in_channels, cfg.disc_channels, cfg.disc_layers).to(self.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr,
                                              betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)

        self.train_set = ImageDataset(list_images(cfg.train_data), model_cfg.image_size, True, cfg.crop_min_scale)
        self.eval_set = ImageDataset(list_images(cfg.eval_data), model_cfg.image_size, False) \
            if cfg.eval_data else None
        if cfg.epochs > 0:
            global_batch = cfg.batch_size * self.world_size
            self.cfg = cfg = replace(cfg, train_steps=math.ceil(cfg.epochs * len(self.train_set) / global_batch))
            if self.is_main:
                log.info("%g epochs of %d images at a global batch of %d: %d steps", cfg.epochs, len(self.train_set),
                         global_batch, cfg.train_steps)
        self.latent_stats: LatentStats | None = None
        self._resume()
        # From here on ranks must differ (σ noise, crops), and a resumed run must not replay the noise of
        # its first steps; the seed is a function of (seed, step, rank) only, so re-running is repeatable.
        torch.manual_seed(cfg.seed + 1000003 * self.step + 7919 * self.rank + 1)

        ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        self.vae_ddp = DDP(self.vae, **ddp_kwargs) if self.world_size > 1 else self.vae
        self.disc_ddp = DDP(self.disc, **ddp_kwargs) if self.disc is not None and self.world_size > 1 else self.disc
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    # --- checkpoints -------------------------------------------------------------------------------------

    def _resume(self) -> None:
        if not os.path.exists(self.ckpt_path):
            return
        try:
            state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise RuntimeError(f"cannot resume: checkpoint {self.ckpt_path} is unreadable ({e}); "
                               f"move it away to start over") from e
        if state["model_config"] != asdict(self.model_cfg):
            raise ValueError(f"cannot resume from {self.ckpt_path}: it holds a different model config "
                             f"{state['model_config']} than requested {asdict(self.model_cfg)}")
        started_from = state["train_config"].get("init_encoder") or ""
        if bool(started_from) != bool(self.cfg.init_encoder):
            raise ValueError(f"cannot resume from {self.ckpt_path}: it started from "
                             f"{started_from or 'a random encoder'} (init_encoder), this run asks for "
                             f"{self.cfg.init_encoder or 'a random one'}; the encoder's layer-wise LR decay "
                             "follows that choice, so keep it")
        self.vae.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.disc is not None and state.get("disc") is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_optimizer"])
        self.step = state["step"]
        if self.is_main:
            log.info("resumed from %s at step %d", self.ckpt_path, self.step)

    def latent_statistics(self) -> LatentStats:
        """μ statistics over `stats_samples` random-resized training crops drawn with a fixed seed, so
        successive checkpoints are measured on the same crops."""
        generator = torch.Generator().manual_seed(self.cfg.seed + 12345)
        n = self.cfg.stats_samples
        indices = torch.randint(len(self.train_set), (n,), generator=generator).tolist()
        crops = (self.train_set.crop(i, generator) for i in indices)
        batches = (torch.stack(chunk) for chunk in chunks(crops, self.cfg.batch_size))
        with self.autocast:
            return compute_latent_stats(self.vae, batches)

    def save_checkpoint(self) -> None:
        """Rank 0 writes the exported σ-VAE (with fresh latent statistics) and then the resumable state;
        each atomically, so a crash at any point leaves the previous good files in place."""
        if self.is_main:
            self.latent_stats = self.latent_statistics()
            check_may_publish(self.lease)
            save_sigma_vae(self.export_path, self.vae, self.latent_stats)
            self.publish({
                "model_config": asdict(self.model_cfg),
                "train_config": asdict(self.cfg),
                "model": self.vae.state_dict(),
                "optimizer": self.opt.state_dict(),
                "disc": self.disc.state_dict() if self.disc is not None else None,
                "disc_optimizer": self.disc_opt.state_dict() if self.disc_opt is not None else None,
                "step": self.step,
                "latent_stats": self.latent_stats.to_dict(),
            }, self.ckpt_path)
            log.info("step %d: saved %s and %s", self.step, self.ckpt_path, self.export_path)
        self.barrier()

    # --- eval --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean PSNR of deterministic reconstructions (encode -> decode, no σ noise) over the held-out set,
        each rank taking every world_size-th image; rank 0 also writes the originals-vs-reconstructions grid.
        Collective: every rank must call it. {} without held-out images."""
        if self.eval_set is None:
            return {}
        vae = self.vae
        vae.eval()
        shard = Subset(self.eval_set, range(self.rank, len(self.eval_set), self.world_size))
        # Its own generator: building the loader must not consume the training RNG (σ noise, crops).
        loader = DataLoader(shard, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers,
                            generator=torch.Generator())
        psnr_sum = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of PSNR, image count)
        grid_orig, grid_recon = [], []
        for images in loader:
            images = images.to(self.device)
            with self.autocast:
                recon = vae.decode(vae.encode(images)).float()
            values = psnr(recon, images)
            psnr_sum[0] += values.double().sum()
            psnr_sum[1] += len(values)
            if self.is_main and sum(len(x) for x in grid_orig) < self.cfg.grid_images:
                grid_orig.append(images.cpu())
                grid_recon.append(recon.cpu())
        vae.train()
        if self.world_size > 1:
            dist.all_reduce(psnr_sum)
        result = {"psnr": (psnr_sum[0] / psnr_sum[1]).item(), "images": int(psnr_sum[1].item())}
        if self.is_main:
            k = self.cfg.grid_images
            result["grid"] = os.path.join(self.cfg.out_dir, "samples", f"step_{self.step:07d}.png")
            os.makedirs(os.path.dirname(result["grid"]), exist_ok=True)
            save_image_grid(result["grid"], [torch.cat(grid_orig)[:k], torch.cat(grid_recon)[:k]])
        return result

    # --- training ----------------------------------------------------------------------------------------

    def optimizers(self) -> list:
        return [opt for opt in (self.opt, self.disc_opt) if opt is not None]

    def train_batches(self):
        cfg = self.cfg
        sampler = InfiniteDistributedSampler(len(self.train_set), self.rank, self.world_size, cfg.seed,
                                             start=self.step * cfg.batch_size)
        loader = DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=cfg.num_workers > 0)
        if self.is_main:
            log.info("σ-VAE: %.1fM params, %d train / %d eval images, world size %d, device %s",
                     sum(p.numel() for p in self.vae.parameters()) / 1e6, len(self.train_set),
                     len(self.eval_set) if self.eval_set else 0, self.world_size, self.device)
        self.vae.train()
        return (images.to(self.device, non_blocking=True) for images in loader)

    def summary(self, split: str, m: dict) -> str:
        if split == "eval":
            return f"PSNR {m['psnr']:.2f} dB ({m['images']} images) | grid {m.get('grid')}"
        return f"loss {m['loss']:.4f} | mse {m['mse']:.4f} | gnorm {m['grad_norm']:.3f} | lr {m['lr']:.2e}"

    def run_config(self) -> dict:
        return {"model": asdict(self.model_cfg), "train": asdict(self.cfg)}

    def train_step(self, images: torch.Tensor) -> dict:
        """One step of the generator (and, once the GAN is on, of the discriminator) at the LR the loop set."""
        cfg = self.cfg
        use_gan = cfg.gan_enabled and self.step >= cfg.gan_start_step

        with self.autocast:
            recon, mu = self.vae_ddp(images)
            loss, mse, prior = sigma_vae_loss(recon, images, mu, self.model_cfg.beta)
            rec_loss = mse  # what the GAN weight balances against: reconstruction (+ perceptual), not the prior
            metrics = {"mse": mse.item(), "prior": prior.item()}
            if self.perceptual is not None:
                perceptual = self.perceptual(recon, images)
                rec_loss = rec_loss + cfg.perceptual_weight * perceptual
                loss = loss + cfg.perceptual_weight * perceptual
                metrics["perceptual"] = perceptual.item()
            if use_gan:
                # The generator's view of the discriminator: no DDP sync, no gradient into its weights.
                self.disc.requires_grad_(False)
                g_loss = hinge_g_loss(self.disc(recon))
                self.disc.requires_grad_(True)
                gan_weight = adaptive_gan_weight(rec_loss, g_loss, self.vae.decoder.to_pixels.weight, cfg.gan_weight)
                loss = loss + gan_weight * g_loss
                metrics["g_loss"] = g_loss.item()
                metrics["gan_weight"] = gan_weight.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.clip_grad)
        self.opt.step()
        metrics.update({"loss": loss.item(), "grad_norm": grad_norm.item()})

        if use_gan:
            with self.autocast:
                # Real and fake in one forward: one DDP forward per backward.
                logits = self.disc_ddp(torch.cat([images, recon.detach()]))
                d_loss = hinge_d_loss(*logits.chunk(2))
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.clip_grad)
            self.disc_opt.step()
            metrics["d_loss"] = d_loss.item()
        return metrics
