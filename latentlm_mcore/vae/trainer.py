"""σ-VAE training on the runtime (`latentlm_mcore/runtime/`): one loop, `VAETrainer`, for every σ-VAE model kind:
ranks and process group (torch DDP, NCCL on GPU, gloo on CPU), rank 0's lease on out_dir, save-and-exit on
preemption, the warmup+cosine LR, metrics, periodic evaluation and checkpoints. Its users: the image σ-VAE
(`vae/image_trainer.py`, `SigmaVAETrainer`) and the audio σ-VAE (`vae/audio_trainer.py`, `AudioSigmaVAETrainer`).
`TrainConfig` holds the image trainer's options (the audio trainer has its own, with the same names where they
mean the same); `TRAIN_PRESETS["paper"]` is the paper's image recipe. Option names follow pretraining's:
train_steps, log_interval, eval_interval, save_interval, clip_grad.

Files under `out_dir` (both kinds):
  checkpoint.pt   resumable state (model, discriminator, optimizers, step; the RNG is re-seeded from
                  seed, step and rank); written atomically (runtime/files.py)
  metrics.jsonl   runtime/metrics.py's records: {"iteration", "split": "train" | "eval", ...}; tensorboard/
                  TensorBoard events; wandb/ when a project is given
  LEASE           rank 0's lease on out_dir while train() runs (runtime/lease.py): a second run refuses
and each kind's exported file and eval images (see its module).
"""

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from latentlm_mcore.runtime.files import atomic_torch_save
from latentlm_mcore.runtime.lease import check_may_publish, lease_on_rank0
from latentlm_mcore.runtime.metrics import MetricsLogger, plain_summary
from latentlm_mcore.runtime.preemption import PreemptionFlag, any_rank
from latentlm_mcore.runtime.ranks import rank_and_world_from_env
from latentlm_mcore.runtime.schedule import set_lr, warmup_cosine

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


class VAETrainer:
    """The one training loop of every σ-VAE model kind, on the runtime: ranks and process group, rank 0's lease
    on `out_dir`, save-and-exit on preemption, the warmup+cosine LR, metrics, the all-ranks non-finite check,
    periodic evaluation and checkpoints. A model kind (vae/image_trainer.py, vae/audio_trainer.py) subclasses
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


def chunks(iterable, size):
    """Lists of `size` items (the last one shorter) from an iterable."""
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
