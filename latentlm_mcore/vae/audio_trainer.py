"""The audio σ-VAE trainer (paper §3.3.1) on `vae/trainer.py`'s loop: random fixed-length crops of speech,
the σ noise of the image σ-VAE (`sample_sigma_latents`, inside `AudioSigmaVAE.forward`), DAC's multi-resolution
mel loss + waveform L1 + β‖μ‖², and after `gan_start_step` HiFi-GAN's multi-period and DAC's complex-STFT
discriminators with a hinge (or LSGAN) loss and feature matching.

GAN weights are fixed, DAC's (mel 15, adversarial 1, feature matching 2), not the image trainer's adaptive
weight: the adaptive weight balances one patch discriminator's gradient at the decoder's last layer against the
reconstruction's, while the eight audio sub-discriminators plus feature matching are the setup that DAC and
HiFi-GAN tuned with fixed weights, and a fixed weight keeps the loss a function of the step alone.

Data: a raw JSONL of source `speech` (data_prep/convert.py, demo/speech_corpus.py: each document's `audio`
segments, paths relative to the JSONL's folder, `start`/`end` honoured) or a folder tree of .wav/.flac files,
decoded by data/prep/audio.py (mono, resampled to the model's rate). The crops of step s on rank r are drawn
from a generator seeded by (seed, s, r), and the σ noise too, so a resumed run repeats the uninterrupted one.

Files under `out_dir` besides the loop's (vae/trainer.py):
  audio_vae.pt    the exported audio σ-VAE (`vae/audio_model.load_audio_vae`), with latent statistics
  samples/step_XXXXXXX.png   log-mel spectrograms of held-out utterances: real (top) vs reconstructed (bottom)
"""

import json
import logging
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

from latentlm_mcore.data.prep.audio import load_audio
from latentlm_mcore.runtime.files import atomic_write
from latentlm_mcore.runtime.lease import check_may_publish
from latentlm_mcore.vae.audio_config import AudioVAEConfig
from latentlm_mcore.vae.audio_losses import (AudioDiscriminator, MultiResolutionMelLoss, audio_vae_loss,
                                             discriminator_loss, feature_matching_loss, generator_loss)
from latentlm_mcore.vae.audio_metrics import tokenizer_metrics
from latentlm_mcore.vae.audio_model import AudioSigmaVAE, compute_audio_latent_stats, pad_to_hop, save_audio_vae
from latentlm_mcore.vae.trainer import VAETrainer

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")


@dataclass
class AudioTrainConfig:
    train_data: str = ""  # raw JSONL of source `speech`, or a folder tree of .wav / .flac
    eval_data: str = ""  # held-out utterances (whole, not cropped) for the metrics and the PNG; empty: no eval
    out_dir: str = "outputs/audio_vae"
    train_steps: int = 1000
    batch_size: int = 16  # per rank
    crop_seconds: float = 1.0  # training crop (rounded down to a multiple of hop_length); shorter audio is zero-padded
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_beta1: float = 0.8  # HiFi-GAN / DAC: AdamW β = (0.8, 0.99)
    adam_beta2: float = 0.99
    clip_grad: float = 1.0
    mel_weight: float = 15.0  # DAC's loss weights
    mel_clamp: float = 1e-5  # the training loss's mel magnitude floor (DAC's 1e-5; the eval mel distance keeps it):
    # above the floor of digital silence, so the loss is not spent on how quiet a pause is (espeak-ng: 42% zeros)
    gan_start_step: int = -1  # step at which the discriminators switch on; -1: never
    gan_loss: Literal["hinge", "lsgan"] = "hinge"
    adversarial_weight: float = 1.0
    feature_matching_weight: float = 2.0
    disc_channels: int = 32  # period discriminator widths c, 4c, 16c, 32c, 32c (32: HiFi-GAN's); STFT ones c
    log_interval: int = 10
    eval_interval: int = 500
    save_interval: int = 500
    eval_utterances: int = 32  # held-out utterances evaluated (the first ones); 0: all
    png_utterances: int = 4
    stats_batches: int = 8  # fixed-seed training batches whose μ statistics are stored with the VAE
    seed: int = 0
    wandb_project: str = ""
    tensorboard: bool = True
    lease_wait: float = 0.0

    def __post_init__(self):
        if self.gan_loss not in ("hinge", "lsgan"):
            raise ValueError(f"AudioTrainConfig.gan_loss must be 'hinge' or 'lsgan', got {self.gan_loss!r}")
        if self.mel_clamp <= 0:
            raise ValueError("AudioTrainConfig.mel_clamp must be positive (log10 of the clamped mel)")
        if self.crop_seconds <= 0 or self.batch_size <= 0:
            raise ValueError("AudioTrainConfig.crop_seconds and batch_size must be positive")


def list_utterances(source: str) -> list[tuple[str, float | None, float | None]]:
    """(path, start, end) of every audio segment in a speech JSONL, or of every .wav/.flac under a folder."""
    if not source:
        raise ValueError("no audio data given (--train-data: a speech JSONL or a folder of .wav/.flac)")
    if os.path.isdir(source):
        found = sorted(os.path.join(root, f) for root, _, files in os.walk(source) for f in files
                       if f.lower().endswith(AUDIO_SUFFIXES))
        items = [(p, None, None) for p in found]
    elif os.path.isfile(source):
        base, items = os.path.dirname(os.path.abspath(source)), []
        with open(source, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source} line {n}: not JSON ({e})") from e
                for seg in doc.get("segments", []):
                    if "audio" in seg:
                        items.append((os.path.join(base, seg["audio"]), seg.get("start"), seg.get("end")))
    else:
        raise FileNotFoundError(f"audio data not found: {source}")
    missing = [p for p, _, _ in items if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{source}: {len(missing)} audio files missing, e.g. {missing[:3]}")
    if not items:
        raise ValueError(f"{source} holds no audio (.wav/.flac files or `audio` segments)")
    return items


class AudioCorpus:
    """Utterances decoded on first use (mono, at the model's rate) and kept in memory: the speech demo's
    corpora are minutes long; a large corpus wants a streaming reader instead."""

    def __init__(self, source: str, sample_rate: int):
        self.items, self.sample_rate, self.cache = list_utterances(source), sample_rate, {}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i not in self.cache:
            path, start, end = self.items[i]
            self.cache[i] = load_audio(path, self.sample_rate, start, end, doc_id=f"{path} (utterance {i})")
        return self.cache[i]

    def crops(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """n random crops [n, length], utterances and offsets from `generator`; short audio right-padded."""
        out = torch.zeros(n, length)
        for k, i in enumerate(torch.randint(len(self), (n,), generator=generator).tolist()):
            wav = self[i]
            start = int(torch.randint(max(wav.shape[0] - length, 0) + 1, (1,), generator=generator))
            piece = wav[start:start + length]
            out[k, :piece.shape[0]] = piece
        return out


def mel_image(log_mels: list[torch.Tensor], rows: int = 2) -> Image.Image:
    """Log-mel spectrograms [bands, frames] laid out column by column, `rows` per column (real above its
    reconstruction), low frequencies at the bottom, one shared grey scale."""
    lo = min(float(m.min()) for m in log_mels)
    hi = max(float(m.max()) for m in log_mels)
    gap = 4
    cols = [log_mels[i:i + rows] for i in range(0, len(log_mels), rows)]
    bands = log_mels[0].shape[0]
    width = sum(c[0].shape[1] for c in cols) + gap * (len(cols) - 1)
    canvas = np.full((rows * bands + gap * (rows - 1), width), 255, dtype=np.uint8)
    x = 0
    for col in cols:
        for r, m in enumerate(col):
            pix = ((m.flip(0) - lo) / max(hi - lo, 1e-6) * 255).clamp(0, 255).byte().numpy()
            canvas[r * (bands + gap):r * (bands + gap) + bands, x:x + m.shape[1]] = 255 - pix
        x += col[0].shape[1] + gap
    return Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST)


class AudioSigmaVAETrainer(VAETrainer):
    def __init__(self, model_cfg: AudioVAEConfig, cfg: AudioTrainConfig):
        super().__init__(cfg)
        self.model_cfg = model_cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
        self.export_path = os.path.join(cfg.out_dir, "audio_vae.pt")
        hop = model_cfg.hop_length
        self.crop_length = int(cfg.crop_seconds * model_cfg.sample_rate) // hop * hop
        if self.crop_length == 0:
            raise ValueError(f"crop_seconds {cfg.crop_seconds} is shorter than one latent ({hop} samples)")

        self.vae = AudioSigmaVAE(model_cfg).to(self.device)
        self.mel_loss = MultiResolutionMelLoss(model_cfg.sample_rate, clamp_eps=cfg.mel_clamp).to(self.device)
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        self.opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
        self.disc = self.disc_opt = None
        if cfg.gan_start_step >= 0:
            c = cfg.disc_channels
            self.disc = AudioDiscriminator(period_channels=(c, 4 * c, 16 * c, 32 * c, 32 * c),
                                           stft_channels=c).to(self.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=betas,
                                              weight_decay=cfg.weight_decay)
        self.train_set = AudioCorpus(cfg.train_data, model_cfg.sample_rate)
        self.eval_set = AudioCorpus(cfg.eval_data, model_cfg.sample_rate) if cfg.eval_data else None
        self.latent_stats = None
        self._resume()
        ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        self.vae_ddp = DDP(self.vae, **ddp_kwargs) if self.world_size > 1 else self.vae
        self.disc_ddp = DDP(self.disc, **ddp_kwargs) if self.disc is not None and self.world_size > 1 else self.disc
        # bf16 autocast on GPU only around the networks; the STFT losses run in float32 (they cast)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        if self.is_main:
            log.info("audio σ-VAE: %.2fM params, %g Hz latents of dim %d, %d train / %d eval utterances, "
                     "crops of %d samples, world size %d, device %s",
                     sum(p.numel() for p in self.vae.parameters()) / 1e6, model_cfg.frame_rate,
                     model_cfg.latent_dim, len(self.train_set), len(self.eval_set) if self.eval_set else 0,
                     self.crop_length, self.world_size, self.device)

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
        self.vae.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.disc is not None and state.get("disc") is not None:  # else: a GAN switched on later starts fresh
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_optimizer"])
        self.step = state["step"]
        if self.is_main:
            log.info("resumed from %s at step %d", self.ckpt_path, self.step)

    def latent_statistics(self):
        """μ statistics over `stats_batches` training crops drawn with a fixed seed (the same at every save)."""
        generator = torch.Generator().manual_seed(self.cfg.seed + 12345)
        batches = (self.train_set.crops(self.cfg.batch_size, self.crop_length, generator).to(self.device)
                   for _ in range(self.cfg.stats_batches))
        with self.autocast:
            return compute_audio_latent_stats(self.vae, batches)

    def save_checkpoint(self) -> None:
        if self.is_main:
            self.latent_stats = self.latent_statistics()
            check_may_publish(self.lease)
            save_audio_vae(self.export_path, self.vae, self.latent_stats)
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
    def reconstruct(self, wav: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (encode -> decode, no σ noise) of one utterance [T] -> [T]."""
        with self.autocast:
            mu = self.vae.encode(pad_to_hop(wav, self.model_cfg.hop_length)[None].to(self.device))
            return self.vae.decode(mu)[0, :wav.shape[0]].float().cpu()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean mel distance, PESQ-WB and STOI of deterministic reconstructions of the held-out utterances
        (each rank every world_size-th); rank 0 writes the spectrogram PNG. Collective. {} without eval data."""
        if self.eval_set is None:
            return {}
        self.vae.eval()
        n = len(self.eval_set) if self.cfg.eval_utterances <= 0 else min(self.cfg.eval_utterances, len(self.eval_set))
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # mel, pesq, stoi, count
        rate = self.model_cfg.sample_rate
        for i in range(self.rank, n, self.world_size):
            wav = self.eval_set[i]
            m = tokenizer_metrics(self.reconstruct(wav), wav, rate)
            sums += torch.tensor([m["mel_distance"], m["pesq_wb"], m["stoi"], 1.0], dtype=torch.float64,
                                 device=self.device)
        if self.world_size > 1:
            dist.all_reduce(sums)
        self.vae.train()
        count = max(sums[3].item(), 1.0)
        result = {"mel_distance": sums[0].item() / count, "pesq_wb": sums[1].item() / count,
                  "stoi": sums[2].item() / count, "utterances": int(sums[3].item())}
        if self.is_main:
            result["png"] = os.path.join(self.cfg.out_dir, "samples", f"step_{self.step:07d}.png")
            os.makedirs(os.path.dirname(result["png"]), exist_ok=True)
            mels = []
            for i in range(min(self.cfg.png_utterances, len(self.eval_set))):
                wav = self.eval_set[i]
                for x in (wav, self.reconstruct(wav)):
                    mels.append(self.mel_loss.log_mel(x[None].to(self.device), 512)[0].cpu())
            with atomic_write(result["png"], "wb") as f:
                mel_image(mels).save(f, format="png")
        return result

    # --- training ----------------------------------------------------------------------------------------

    def optimizers(self) -> list:
        return [opt for opt in (self.opt, self.disc_opt) if opt is not None]

    def step_generator(self) -> torch.Generator:
        """The crops' and σ noise's seed is a function of (seed, step, rank) only: resuming repeats them."""
        return torch.Generator().manual_seed(self.cfg.seed + 1000003 * self.step + 7919 * self.rank + 1)

    def train_batches(self):
        self.vae.train()
        while True:
            yield self.train_set.crops(self.cfg.batch_size, self.crop_length, self.step_generator()).to(self.device)

    def summary(self, split: str, m: dict) -> str:
        if split == "eval":
            return (f"mel distance {m['mel_distance']:.3f} | PESQ {m['pesq_wb']:.2f} | STOI {m['stoi']:.3f} "
                    f"({m['utterances']} utterances) | png {m.get('png')}")
        gan = f" | adv {m['g_adv']:.3f} | fm {m['feature_matching']:.3f} | d {m['d_loss']:.3f}" if "d_loss" in m else ""
        return f"loss {m['loss']:.4f} | mel {m['mel']:.4f}{gan} | gnorm {m['grad_norm']:.3f} | lr {m['lr']:.2e}"

    def run_config(self) -> dict:
        return {"model": asdict(self.model_cfg), "train": asdict(self.cfg)}

    def train_step(self, wav: torch.Tensor) -> dict:
        cfg = self.cfg
        use_gan = self.disc is not None and self.step >= cfg.gan_start_step
        torch.manual_seed(self.step_generator().initial_seed() + 17)  # the σ noise (sample_sigma_latents)
        with self.autocast:
            recon, mu = self.vae_ddp(wav)
        loss, mel, l1, prior = audio_vae_loss(recon, wav, mu, self.model_cfg.beta, self.mel_loss, cfg.mel_weight)
        metrics = {"mel": mel.item(), "l1": l1.item(), "prior": prior.item()}
        if use_gan:
            # The generator's view of the discriminators: no gradient into their weights, no DDP sync.
            self.disc.requires_grad_(False)
            with self.autocast:
                fake_out = self.disc(recon)
                with torch.no_grad():
                    real_out = self.disc(wav)
            adv = generator_loss(fake_out, cfg.gan_loss)
            fm = feature_matching_loss(real_out, fake_out)
            self.disc.requires_grad_(True)
            loss = loss + cfg.adversarial_weight * adv + cfg.feature_matching_weight * fm
            metrics.update({"g_adv": adv.item(), "feature_matching": fm.item()})
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.clip_grad)
        self.opt.step()
        metrics.update({"loss": loss.item(), "grad_norm": grad_norm.item()})

        if use_gan:
            with self.autocast:
                # Real and fake in one forward: one DDP forward per backward.
                outs = self.disc_ddp(torch.cat([wav, recon.detach()]))
            real_out = [(logits.chunk(2)[0], None) for logits, _ in outs]
            fake_out = [(logits.chunk(2)[1], None) for logits, _ in outs]
            d_loss = discriminator_loss(real_out, fake_out, cfg.gan_loss)
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.clip_grad)
            self.disc_opt.step()
            metrics["d_loss"] = d_loss.item()
        return metrics
