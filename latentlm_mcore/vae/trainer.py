"""σ-VAE trainer: torch DDP (NCCL on GPU, gloo on CPU), AdamW, an encoder started from pretrained ViT weights
(then with layer-wise LR decay) or from scratch, optional perceptual and patch-GAN losses (adaptive weight),
resumable checkpoints, PSNR and a reconstruction grid at each eval, and the exported σ-VAE file (with latent
statistics) at each checkpoint and at the end. `TRAIN_PRESETS["paper"]` is the paper's recipe.

Files under `out_dir`:
  checkpoint.pt   resumable state (model, discriminator, optimizers, step; the RNG is re-seeded from
                  seed, step and rank); written atomically
  sigma_vae.pt    the exported σ-VAE for the data pipeline (`load_sigma_vae`), with latent statistics
  samples/step_XXXXXXX.png   originals (top row) vs reconstructions (bottom row) of held-out images
  metrics.jsonl   one JSON line per eval; tb/ TensorBoard events; wandb/ when a project is given
  LEASE           rank 0's lease on out_dir while train() runs (runtime/lease.py): a second run refuses
"""

import json
import logging
import math
import os
import signal
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from latentlm_mcore.runtime.lease import check_may_publish, lease_on_rank0
from latentlm_mcore.training.preflight import check_sigma_vae, describe_sigma_vae, probe_machine
from latentlm_mcore.runtime.ranks import rank_and_world_from_env
from latentlm_mcore.vae.config import SigmaVAEConfig
from latentlm_mcore.vae.data import ImageDataset, InfiniteDistributedSampler, list_images
from latentlm_mcore.vae.losses import (PatchDiscriminator, VGG16PerceptualLoss, adaptive_gan_weight, hinge_d_loss,
                                       hinge_g_loss, sigma_vae_loss)
from latentlm_mcore.vae.model import SigmaVAE, atomic_torch_save, save_sigma_vae
from latentlm_mcore.vae.optim import encoder_param_groups, lr_factor
from latentlm_mcore.vae.pretrained import load_pretrained_encoder
from latentlm_mcore.vae.stats import LatentStats, compute_latent_stats

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    train_data: str = ""  # folder tree of images, or a .jsonl of paths
    eval_data: str = ""  # held-out images (centre crops) for PSNR and the grid; empty: no eval
    out_dir: str = "outputs/sigma_vae"
    max_steps: int = 1000  # optimizer steps; derived from the data instead when epochs > 0
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
    grad_clip: float = 1.0
    crop_min_scale: float = 0.5
    perceptual_weight: float = 0.0  # > 0: LPIPS-style VGG16 loss, which needs vgg16_weights
    vgg16_weights: str = ""  # local torchvision VGG16 state_dict (nothing is downloaded)
    gan_start_step: int = -1  # step at which the patch-GAN hinge loss switches on; -1: never
    gan_weight: float = 0.5  # factor on LDM's adaptive GAN weight (LDM's disc_weight 0.5)
    disc_channels: int = 64
    disc_layers: int = 3
    log_every: int = 10
    eval_every: int = 500
    ckpt_every: int = 500
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
    tmp = path + ".tmp.png"
    Image.fromarray(canvas).save(tmp)
    os.replace(tmp, path)


class SigmaVAETrainer:
    def __init__(self, model_cfg: SigmaVAEConfig, cfg: TrainConfig):
        machine = probe_machine()
        check_sigma_vae(model_cfg, cfg, machine)  # PreflightError naming every option this machine cannot run
        self.model_cfg, self.cfg = model_cfg, cfg
        self.rank, self.world_size, self.device = init_distributed()
        self.is_main = self.rank == 0
        if self.is_main:
            log.info(describe_sigma_vae(model_cfg, cfg, machine, self.world_size))
        self.lease = None  # held by train(), the only writer of out_dir
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
            self.cfg = cfg = replace(cfg, max_steps=math.ceil(cfg.epochs * len(self.train_set) / global_batch))
            if self.is_main:
                log.info("%g epochs of %d images at a global batch of %d: %d steps", cfg.epochs, len(self.train_set),
                         global_batch, cfg.max_steps)
        self.step = 0
        self.latent_stats: LatentStats | None = None
        self._resume()
        # From here on ranks must differ (σ noise, crops), and a resumed run must not replay the noise of
        # its first steps; the seed is a function of (seed, step, rank) only, so re-running is repeatable.
        torch.manual_seed(cfg.seed + 1000003 * self.step + 7919 * self.rank + 1)

        ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        self.vae_ddp = DDP(self.vae, **ddp_kwargs) if self.world_size > 1 else self.vae
        self.disc_ddp = DDP(self.disc, **ddp_kwargs) if self.disc is not None and self.world_size > 1 else self.disc
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        self._tensorboard = self._wandb = None

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
            check_may_publish(self.lease)
            atomic_torch_save({
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
        if self.world_size > 1:
            dist.barrier()

    # --- eval --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean PSNR of deterministic reconstructions (encode -> decode, no σ noise) over the held-out set,
        each rank taking every world_size-th image; rank 0 also writes the originals-vs-reconstructions grid.
        Collective: every rank must call it."""
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
        result = {"step": self.step, "eval/psnr": (psnr_sum[0] / psnr_sum[1]).item(),
                  "eval/images": int(psnr_sum[1].item())}
        if self.is_main:
            k = self.cfg.grid_images
            result["grid"] = os.path.join(self.cfg.out_dir, "samples", f"step_{self.step:07d}.png")
            os.makedirs(os.path.dirname(result["grid"]), exist_ok=True)
            save_image_grid(result["grid"], [torch.cat(grid_orig)[:k], torch.cat(grid_recon)[:k]])
        return result

    # --- logging -----------------------------------------------------------------------------------------

    def _open_writers(self) -> None:
        if not self.is_main:
            return
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(os.path.join(self.cfg.out_dir, "tb"))
        if self.cfg.wandb_project:
            import wandb
            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(project=self.cfg.wandb_project, dir=self.cfg.out_dir,
                                     config={"model": asdict(self.model_cfg), "train": asdict(self.cfg)})

    def _log(self, metrics: dict) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tensorboard is not None:
            for k, v in scalars.items():
                self._tensorboard.add_scalar(k, v, self.step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=self.step)

    # --- training ----------------------------------------------------------------------------------------

    def _train_step(self, images: torch.Tensor) -> dict:
        cfg = self.cfg
        factor = lr_factor(self.step, cfg)
        for opt in filter(None, (self.opt, self.disc_opt)):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * factor * group.get("lr_scale", 1.0)
        use_gan = cfg.gan_enabled and self.step >= cfg.gan_start_step

        with self.autocast:
            recon, mu = self.vae_ddp(images)
            loss, mse, prior = sigma_vae_loss(recon, images, mu, self.model_cfg.beta)
            rec_loss = mse  # what the GAN weight balances against: reconstruction (+ perceptual), not the prior
            metrics = {"train/mse": mse.item(), "train/prior": prior.item()}
            if self.perceptual is not None:
                perceptual = self.perceptual(recon, images)
                rec_loss = rec_loss + cfg.perceptual_weight * perceptual
                loss = loss + cfg.perceptual_weight * perceptual
                metrics["train/perceptual"] = perceptual.item()
            if use_gan:
                # The generator's view of the discriminator: no DDP sync, no gradient into its weights.
                self.disc.requires_grad_(False)
                g_loss = hinge_g_loss(self.disc(recon))
                self.disc.requires_grad_(True)
                gan_weight = adaptive_gan_weight(rec_loss, g_loss, self.vae.decoder.to_pixels.weight, cfg.gan_weight)
                loss = loss + gan_weight * g_loss
                metrics["train/g_loss"] = g_loss.item()
                metrics["train/gan_weight"] = gan_weight.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.grad_clip)
        self.opt.step()
        metrics.update({"train/loss": loss.item(), "train/grad_norm": grad_norm.item(), "train/lr": cfg.lr * factor})

        if use_gan:
            with self.autocast:
                # Real and fake in one forward: one DDP forward per backward.
                logits = self.disc_ddp(torch.cat([images, recon.detach()]))
                d_loss = hinge_d_loss(*logits.chunk(2))
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.grad_clip)
            self.disc_opt.step()
            metrics["train/d_loss"] = d_loss.item()
        return metrics

    def train(self) -> dict:
        """Train up to `max_steps` (continuing a resumed run); returns the last eval metrics (or {})."""
        cfg = self.cfg
        self.lease = lease_on_rank0(self.cfg.out_dir, wait=self.cfg.lease_wait)
        sampler = InfiniteDistributedSampler(len(self.train_set), self.rank, self.world_size, cfg.seed,
                                             start=self.step * cfg.batch_size)
        loader = DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=cfg.num_workers > 0)
        self._open_writers()
        if self.is_main:
            log.info("σ-VAE: %.1fM params, %d train / %d eval images, world size %d, device %s",
                     sum(p.numel() for p in self.vae.parameters()) / 1e6, len(self.train_set),
                     len(self.eval_set) if self.eval_set else 0, self.world_size, self.device)
        last_eval: dict = {}
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.is_main, desc="σ-VAE",
                        dynamic_ncols=True)
        batches = iter(loader)
        self.vae.train()
        previous_handlers = self._catch_stop_signals()
        try:
            while self.step < cfg.max_steps:
                images = next(batches).to(self.device, non_blocking=True)
                metrics = self._train_step(images)
                stop, non_finite = self._any_rank(self._stop_signal is not None,
                                                  not math.isfinite(metrics["train/loss"]))
                if non_finite:  # every rank raises together; the last checkpoint stays the good one
                    raise FloatingPointError(f"non-finite loss at step {self.step} on some rank: {metrics}")
                self.step += 1
                progress.update(1)
                if self.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                    progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", mse=f"{metrics['train/mse']:.4f}")
                    self._log(metrics)
                if stop:
                    self.save_checkpoint()
                    if self.is_main:
                        log.info("stop signal (%s): saved at step %d; re-run to resume", self._stop_signal, self.step)
                    break
                if self.eval_set is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    last_eval = self.evaluate()
                    if self.is_main:
                        self._log(last_eval)
                        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                            f.write(json.dumps(last_eval) + "\n")
                        progress.write(f"step {self.step}: eval PSNR {last_eval['eval/psnr']:.2f} dB "
                                       f"({last_eval['eval/images']} images), grid {last_eval['grid']}")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            progress.close()
            if self.lease is not None:
                self.lease.release()
                self.lease = None
        return last_eval

    def _catch_stop_signals(self) -> dict:
        """SIGTERM and SIGUSR1 (Slurm preemption / time limit, e.g. `#SBATCH --signal=USR1@120`) only set a
        flag; the loop saves a checkpoint at the next step boundary and returns."""
        self._stop_signal = None

        def request_stop(signum, frame):
            self._stop_signal = signal.Signals(signum).name

        return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGUSR1)}

    def _any_rank(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over ranks, so all ranks stop or fail at the same step instead of hanging."""
        if self.world_size == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _chunks(iterable, size):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
