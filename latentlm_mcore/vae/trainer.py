"""σ-VAE training on the runtime (`latentlm_mcore/runtime/`): one loop, `VAETrainer`, for every σ-VAE model kind,
and the image σ-VAE, `SigmaVAETrainer`, as its first user. torch DDP (NCCL on GPU, gloo on CPU), AdamW, an encoder
started from pretrained ViT weights (then with layer-wise LR decay) or from scratch, optional perceptual and
patch-GAN losses (adaptive weight), resumable checkpoints, PSNR and a reconstruction grid at each eval, and the
exported σ-VAE file (with latent statistics) at each checkpoint and at the end. `TRAIN_PRESETS["paper"]` is the
paper's recipe. Option names follow pretraining's: train_steps, log_interval, eval_interval, save_interval,
clip_grad.

Files under `out_dir`:
  checkpoint.pt   resumable state (model, discriminator, optimizers, step; the RNG is re-seeded from
                  seed, step and rank); written atomically (runtime/files.py)
  sigma_vae.pt    the exported σ-VAE for the data pipeline (`load_sigma_vae`), with latent statistics
  samples/step_XXXXXXX.png   originals (top row) vs reconstructions (bottom row) of held-out images
  metrics.jsonl   runtime/metrics.py's records: {"iteration", "split": "train" | "eval", ...}; tensorboard/
                  TensorBoard events; wandb/ when a project is given
  LEASE           rank 0's lease on out_dir while train() runs (runtime/lease.py): a second run refuses
"""

import logging
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset

from latentlm_mcore.runtime.files import atomic_torch_save, atomic_write
from latentlm_mcore.runtime.lease import check_may_publish, lease_on_rank0
from latentlm_mcore.runtime.metrics import MetricsLogger, plain_summary
from latentlm_mcore.runtime.preemption import PreemptionFlag, any_rank
from latentlm_mcore.runtime.ranks import rank_and_world_from_env
from latentlm_mcore.runtime.schedule import set_lr, warmup_cosine
from latentlm_mcore.training.preflight import check_sigma_vae, describe_sigma_vae, probe_machine
from latentlm_mcore.vae.config import SigmaVAEConfig
from latentlm_mcore.vae.data import ImageDataset, InfiniteDistributedSampler, list_images
from latentlm_mcore.vae.losses import (PatchDiscriminator, VGG16PerceptualLoss, adaptive_gan_weight, hinge_d_loss,
                                       hinge_g_loss, sigma_vae_loss)
from latentlm_mcore.vae.model import SigmaVAE, save_sigma_vae
from latentlm_mcore.vae.optim import encoder_param_groups
from latentlm_mcore.vae.pretrained import load_pretrained_encoder
from latentlm_mcore.vae.stats import LatentStats, compute_latent_stats

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    train_data: str = ""  # folder tree of images, or a .jsonl of paths
    eval_data: str = ""  # held-out images (centre crops) for PSNR and the grid; empty: no eval
    out_dir: str = "outputs/sigma_vae"
    train_steps: int = 1000  # optimizer steps; derived from the data instead when epochs > 0
    epochs: float = 0.0  # > 0: this many passes over train_data at the global batch (batch_size x ranks)
    batch_size: int = 32  # per rank
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_beta1: float = 0.0  # paper appendix B: AdamW β = (0.0, 0.99)
    adam_beta2: float = 0.99
    # Pretrained ViT to start the encoder from (vae/pretrained.py: timm, HF ViT, BEiT v2, BEiT-3 layouts);
    # empty: random init. Read on a fresh start only; a resumed run has it in its checkpoint.
    init_encoder: str = ""
    layer_decay: float = 0.65  # with init_encoder: encoder block i of L gets lr * layer_decay ** (L + 1 - i)
    clip_grad: float = 1.0
    crop_min_scale: float = 0.5
    perceptual_weight: float = 0.0  # > 0: LPIPS-style VGG16 loss, which needs vgg16_weights
    vgg16_weights: str = ""  # local torchvision VGG16 state_dict (nothing is downloaded)
    gan_start_step: int = -1  # step at which the patch-GAN hinge loss switches on; -1: never
    gan_weight: float = 0.5  # factor on LDM's adaptive GAN weight (LDM's disc_weight 0.5)
    disc_channels: int = 64
    disc_layers: int = 3
    log_interval: int = 10
    eval_interval: int = 500
    save_interval: int = 500
    grid_images: int = 8
    stats_samples: int = 1024  # training crops (fixed seed) whose μ statistics are stored with the VAE
    num_workers: int = 4
    seed: int = 0
    wandb_project: str = ""  # empty: no wandb; runs offline unless WANDB_MODE says otherwise
    tensorboard: bool = True
    lease_wait: float = 0.0  # seconds to wait for another run's lease on out_dir before refusing (runtime/lease.py)

    @property
    def gan_enabled(self) -> bool:
        return self.gan_start_step >= 0


# Training recipes by σ-VAE preset name (TrainConfig fields; the command line overrides them).
TRAIN_PRESETS = {
    # Paper §3.1.3 / appendix B: 200 epochs (ImageNet-1k at batch 256: 1.0M steps), AdamW β = (0, 0.99), LR 3e-4,
    # weight decay 0.01, layer decay 0.65 on a pretrained encoder, perceptual + GAN losses "following LDM": LDM's
    # KL autoencoders' perceptual weight 1.0, discriminator from step 50k (disc_start 50001), adaptive weight x 0.5.
    "paper": dict(epochs=200.0, lr=3e-4, adam_beta1=0.0, adam_beta2=0.99, weight_decay=0.01, layer_decay=0.65,
                  perceptual_weight=1.0, gan_start_step=50_000, gan_weight=0.5),
}


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) under torchrun or srun; a single process without either."""
    rank, world_size, local_rank = rank_and_world_from_env()
    if torch.cuda.is_available():
        # a site that binds one GPU per task shows each task a single device, whatever its local rank
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


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


class VAETrainer:
    """The one training loop of every σ-VAE model kind, on the runtime: ranks and process group, rank 0's lease
    on `out_dir`, save-and-exit on preemption, the warmup+cosine LR, metrics, the all-ranks non-finite check,
    periodic evaluation and checkpoints. A model kind (the image σ-VAE below; a 1-D audio one next) subclasses
    it and brings its model, data and losses through five methods:

      train_batches()   an endless iterator of training batches on `self.device`, from step `self.step` on
      train_step(batch) one optimizer step of its losses; a dict of floats with at least "loss"
      optimizers()      the optimizers whose param groups the schedule sets (groups may carry an `lr_scale`)
      evaluate()        held-out metrics (collective; {} when there is nothing to evaluate)
      save_checkpoint() its resumable state and exported file (collective), written through `publish`

    and sets `self.step` to the steps already done when it resumes. `cfg` needs the fields of TrainConfig
    that the loop reads: out_dir, train_steps, lr, min_lr_ratio, warmup_steps, log_interval, eval_interval,
    save_interval, lease_wait, tensorboard, wandb_project."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed()
        self.is_main = self.rank == 0
        self.step = 0
        self.lease = None  # held by train(), the only writer of out_dir

    # --- what a model kind provides ----------------------------------------------------------------------

    def train_batches(self):
        raise NotImplementedError

    def train_step(self, batch) -> dict:
        raise NotImplementedError

    def optimizers(self) -> list:
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    def save_checkpoint(self) -> None:
        raise NotImplementedError

    def summary(self, split: str, metrics: dict) -> str:
        """Its text on the console progress line (runtime/metrics.py)."""
        return plain_summary(split, metrics)

    def run_config(self) -> dict:
        return {"train": asdict(self.cfg)}

    # --- the loop ----------------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return cfg.lr * warmup_cosine(step, cfg.warmup_steps, cfg.train_steps, cfg.min_lr_ratio)

    def publish(self, obj, path: str) -> None:
        """Rank 0 writes `obj` to `path` atomically, unless its lease on out_dir was lost (then it raises)."""
        check_may_publish(self.lease)
        atomic_torch_save(obj, path)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def train(self) -> dict:
        """Train up to `train_steps` (continuing a resumed run); returns the last eval metrics with their
        "iteration" (or {})."""
        cfg = self.cfg
        self.lease = lease_on_rank0(cfg.out_dir, wait=cfg.lease_wait)
        logger = None
        last_eval: dict = {}
        try:
            batches = self.train_batches()
            if self.is_main:
                logger = MetricsLogger(cfg.out_dir, total_iterations=cfg.train_steps, start_iteration=self.step,
                                       tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                       config=self.run_config(), summary=self.summary)
            with PreemptionFlag() as preempt:
                while self.step < cfg.train_steps:
                    batch = next(batches)
                    lr = self.lr_at(self.step)
                    set_lr(self.optimizers(), lr)
                    metrics = self.train_step(batch)
                    metrics["lr"] = lr
                    stop, non_finite = any_rank(preempt.received is not None, not math.isfinite(metrics["loss"]),
                                                device=self.device)
                    if non_finite:  # every rank raises together; the last checkpoint stays the good one
                        raise FloatingPointError(f"non-finite loss at step {self.step} on some rank: {metrics}")
                    self.step += 1
                    if logger is not None and (self.step % cfg.log_interval == 0 or self.step == cfg.train_steps):
                        logger.log(self.step, metrics)
                    if stop:
                        self.save_checkpoint()
                        if self.is_main:
                            log.info("stop signal (%s): saved at step %d; re-run to resume",
                                     preempt.received or "on another rank", self.step)
                        break
                    if self.step % cfg.eval_interval == 0 or self.step == cfg.train_steps:
                        result = self.evaluate()
                        if result:
                            last_eval = dict(result, iteration=self.step)
                            if logger is not None:
                                logger.log(self.step, result, split="eval")
                    if self.step % cfg.save_interval == 0 or self.step == cfg.train_steps:
                        self.save_checkpoint()
        finally:
            if logger is not None:
                logger.close()
            if self.lease is not None:
                self.lease.release()
                self.lease = None
        return last_eval

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


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
        batches = (torch.stack(chunk) for chunk in _chunks(crops, self.cfg.batch_size))
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


def _chunks(iterable, size):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
