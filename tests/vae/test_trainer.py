import json
import math
import os
import signal
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from latentlm_mcore.vae import SIGMA_VAE_PRESETS, load_sigma_vae
from latentlm_mcore.vae.data import ImageDataset, list_images
from latentlm_mcore.vae.model import sample_sigma_latents
from latentlm_mcore.vae.losses import _vgg16_features
from latentlm_mcore.vae.image_trainer import SigmaVAETrainer, psnr
from latentlm_mcore.vae.trainer import TrainConfig, VAETrainer
from tests.vae.conftest import TRAIN_STEPS, tiny_train_config


def _heldout_images(heldout_dir):
    dataset = ImageDataset(list_images(str(heldout_dir)), 32, train=False)
    return torch.stack([dataset[i] for i in range(len(dataset))])


@pytest.mark.slow  # the session trained_run fixture trains 300 steps
def test_tiny_sigma_vae_beats_mean_image_psnr(trained_run, photo_dirs):
    out_dir, result = trained_run
    images = _heldout_images(photo_dirs[1])
    # The baseline predicts the held-out set's own mean image for every image (an oracle constant).
    baseline = psnr(images.mean(0, keepdim=True).expand_as(images), images).mean().item()
    vae = load_sigma_vae(out_dir / "sigma_vae.pt")
    with torch.no_grad():
        trained = psnr(vae.decode(vae.encode(images)), images).mean().item()
    print(f"\nheld-out PSNR after {TRAIN_STEPS} steps: {trained:.2f} dB; mean-image baseline {baseline:.2f} dB")
    assert trained > baseline + 6.0
    assert result["iteration"] == TRAIN_STEPS and result["psnr"] == pytest.approx(trained, abs=1e-3)
    grid = Image.open(result["grid"])
    assert grid.size == (8 * 34 - 2, 2 * 34 - 2)  # 8 originals over 8 reconstructions, 2px gaps
    records = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    assert records[-1]["split"] == "eval" and records[-1]["psnr"] == pytest.approx(trained, abs=1e-3)
    # the train records of every log_interval (50) steps, through the one metrics writer (runtime/metrics.py)
    train = [r for r in records if r["split"] == "train"]
    assert [r["iteration"] for r in train] == list(range(50, TRAIN_STEPS + 1, 50))
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in train)


@pytest.mark.slow  # the session trained_run fixture trains 300 steps
def test_encode_then_decode_is_deterministic(trained_run, photo_dirs):
    out_dir, _ = trained_run
    images = _heldout_images(photo_dirs[1])
    first, second = load_sigma_vae(out_dir / "sigma_vae.pt"), load_sigma_vae(out_dir / "sigma_vae.pt")
    with torch.no_grad():
        a = first.decode(first.encode(images))
        b = first.decode(first.encode(images))
        c = second.decode(second.encode(images))
        noisy, _ = first(images)  # the training pass is not: it adds σ noise
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, noisy)


@pytest.mark.slow  # the session trained_run fixture trains 300 steps
def test_stored_latent_stats_give_unit_scale_on_heldout_crops(trained_run, photo_dirs):
    """The statistics (one global shift and scale of the σ-VAE samples, vae/stats.py) come from
    `stats_samples` training crops drawn with the trainer's fixed seed; here they are checked on 256 other
    random crops (another seed) and fresh samples z = μ + σ·ε."""
    out_dir, _ = trained_run
    vae = load_sigma_vae(out_dir / "sigma_vae.pt")
    stats = vae.latent_stats
    assert stats is not None and stats.mean.shape == (16,) and stats.normalisation == "global"
    crops = ImageDataset(list_images(str(photo_dirs[0])), 32, train=True, min_scale=0.1)
    generator = torch.Generator().manual_seed(987654)  # the trainer's stats crops use seed + 12345
    images = torch.stack([crops.crop(i % len(crops), generator) for i in range(256)])
    with torch.no_grad():
        z = sample_sigma_latents(vae.encode(images), vae.config.c_sigma, generator).reshape(-1, 16)
    scaled = stats.scale(z)

    def deviation(t):  # |mean| and |std - 1| over all elements
        return t.mean().abs().item(), (t.std() - 1).abs().item()

    raw_dev, scaled_dev = deviation(z), deviation(scaled)
    print(f"\nheld-out crops, |mean|, |std-1|: raw z {raw_dev[0]:.3f}, {raw_dev[1]:.3f}; "
          f"scaled {scaled_dev[0]:.3f}, {scaled_dev[1]:.3f}")
    assert scaled_dev[0] < 0.08 and scaled_dev[1] < 0.08
    # the scale is that of the samples, wider than μ's by the noise: Var z = Var μ + (C_σ/0.8)²
    with torch.no_grad():
        mu = vae.encode(images).reshape(-1, 16)
    mu_var = mu.var().item()
    assert stats.std[0].item() == pytest.approx((mu_var + (vae.config.c_sigma / 0.8) ** 2) ** 0.5, rel=0.05)
    assert stats.std[0].item() > mu_var ** 0.5 * 1.05
    assert torch.allclose(stats.unscale(stats.scale(mu)), mu, atol=1e-5)
    # On the disjoint held-out region of the photos (other content) the scale is only roughly unit.
    with torch.no_grad():
        region = stats.scale(vae.encode(_heldout_images(photo_dirs[1])))
    print(f"held-out region, scaled latents overall: mean {region.mean():.3f}, std {region.std():.3f}")
    assert abs(region.mean().item()) < 0.5 and 0.6 < region.std().item() < 1.5


def test_failed_run_keeps_last_checkpoint_and_rerun_resumes(photo_dirs, tmp_path, monkeypatch):
    cfg = tiny_train_config(*photo_dirs, tmp_path, train_steps=6, save_interval=2, eval_data="", stats_samples=16,
                            batch_size=4)
    model_cfg = SIGMA_VAE_PRESETS["tiny"]
    crashing = SigmaVAETrainer(model_cfg, cfg)
    real_step = crashing.train_step

    def crash_at_step_3(images):
        if crashing.step == 3:
            raise RuntimeError("simulated node failure")
        return real_step(images)

    monkeypatch.setattr(crashing, "train_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated"):
        crashing.train()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2
    assert load_sigma_vae(tmp_path / "sigma_vae.pt").latent_stats is not None

    resumed = SigmaVAETrainer(model_cfg, cfg)
    assert resumed.step == 2
    assert torch.equal(resumed.vae.encoder.to_latent.weight, saved["model"]["encoder.to_latent.weight"])
    resumed.train()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 6
    with pytest.raises(ValueError, match="different model config"):
        SigmaVAETrainer(model_cfg.replace(latent_dim=8), cfg)


def test_stop_signal_saves_and_exits_at_the_next_step(photo_dirs, tmp_path, monkeypatch):
    cfg = tiny_train_config(*photo_dirs, tmp_path, train_steps=50, save_interval=50, eval_data="", stats_samples=16,
                            batch_size=4)
    trainer = SigmaVAETrainer(SIGMA_VAE_PRESETS["tiny"], cfg)
    real_step = trainer.train_step

    def preempted_at_step_2(images):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # what Slurm sends before the time limit
        return real_step(images)

    monkeypatch.setattr(trainer, "train_step", preempted_at_step_2)
    previous = signal.getsignal(signal.SIGUSR1)
    trainer.train()
    assert trainer.step == 3
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGUSR1) == previous  # handlers restored


def test_gan_and_perceptual_losses_switch_on_after_gan_start_step(photo_dirs, tmp_path):
    vgg = tmp_path / "vgg16.pth"  # torchvision key layout; random weights since none ship offline
    torch.save({f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}, vgg)
    cfg = tiny_train_config(*photo_dirs, tmp_path, gan_start_step=2, perceptual_weight=1.0, vgg16_weights=str(vgg),
                            disc_channels=8, disc_layers=2, batch_size=2)
    trainer = SigmaVAETrainer(SIGMA_VAE_PRESETS["tiny"], cfg)
    images = torch.stack([trainer.train_set[0], trainer.train_set[1]])
    disc_before = [p.detach().clone() for p in trainer.disc.parameters()]
    before = trainer.train_step(images)
    assert "perceptual" in before and "d_loss" not in before and "g_loss" not in before
    assert all(torch.equal(a, b) for a, b in zip(disc_before, trainer.disc.parameters()))
    trainer.step = 2
    after = trainer.train_step(images)
    assert np.isfinite(after["d_loss"]) and np.isfinite(after["g_loss"])
    assert 0 < after["gan_weight"] < 0.5 * 1e4  # adaptive (factor 0.5), not the old fixed 0.1
    assert not all(torch.equal(a, b) for a, b in zip(disc_before, trainer.disc.parameters()))


def _save_hf_vit(path):
    """A randomly initialised transformers ViT shaped like the tiny encoder (patch 8, hidden 64, 2 blocks)."""
    import latentlm_mcore.hf  # noqa: F401  (transformers beside a CPU torch's torchvision)
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(7)
    model = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                               image_size=32, patch_size=8), add_pooling_layer=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model.state_dict()


def test_layer_decay_only_for_a_pretrained_encoder_which_resume_keeps(photo_dirs, tmp_path):
    model_cfg = SIGMA_VAE_PRESETS["tiny"]
    scratch = SigmaVAETrainer(model_cfg, tiny_train_config(*photo_dirs, tmp_path / "scratch", layer_decay=0.5))
    assert {g["lr_scale"] for g in scratch.opt.param_groups} == {1.0}  # a random encoder learns at the full LR

    hf = _save_hf_vit(tmp_path / "vit.safetensors")
    cfg = tiny_train_config(*photo_dirs, tmp_path / "pretrained", layer_decay=0.5, train_steps=1, save_interval=1,
                            eval_data="", stats_samples=8, batch_size=2, init_encoder=str(tmp_path / "vit.safetensors"))
    trainer = SigmaVAETrainer(model_cfg, cfg)
    assert trainer.encoder_init.layout == "hf"
    assert torch.equal(trainer.vae.encoder.blocks[1].mlp[2].weight, hf["encoder.layer.1.output.dense.weight"])
    scale_of = {id(p): g["lr_scale"] for g in trainer.opt.param_groups for p in g["params"]}
    assert scale_of[id(trainer.vae.encoder.patch_embed.weight)] == 0.5 ** 3
    assert scale_of[id(trainer.vae.encoder.blocks[1].attn.qkv.weight)] == 0.5
    trainer.train()
    # A resumed run takes its weights from the checkpoint (the file may be gone) and must keep the decay choice.
    (tmp_path / "vit.safetensors").unlink()
    resumed = SigmaVAETrainer(model_cfg, replace(cfg, train_steps=2))
    assert resumed.step == 1 and resumed.encoder_init is None
    with pytest.raises(ValueError, match="init_encoder.*layer-wise LR decay"):
        SigmaVAETrainer(model_cfg, replace(cfg, init_encoder=""))


def test_epochs_set_the_number_of_steps(photo_dirs, tmp_path):
    cfg = tiny_train_config(*photo_dirs, tmp_path, epochs=5, batch_size=3, eval_data="")
    trainer = SigmaVAETrainer(SIGMA_VAE_PRESETS["tiny"], cfg)
    assert len(trainer.train_set) == 2 and trainer.cfg.train_steps == 4  # ceil(5 x 2 images / 3 per step)


def test_perceptual_loss_without_weights_file_is_a_clear_error(photo_dirs, tmp_path):
    with pytest.raises(ValueError, match="perceptual-weight 1.0 needs --vgg16-weights.*--perceptual-weight 0"):
        SigmaVAETrainer(SIGMA_VAE_PRESETS["tiny"], tiny_train_config(*photo_dirs, tmp_path, perceptual_weight=1.0))


class _RunsCodeWhenUnpickled:
    """What a hostile checkpoint holds: unpickling it calls `open(marker, "w")`, standing in for any code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_checkpoint_that_runs_code_when_loaded(photo_dirs, tmp_path):
    cfg = tiny_train_config(*photo_dirs, tmp_path, train_steps=2, save_interval=2, eval_data="", stats_samples=16,
                            batch_size=4)
    marker = tmp_path / "code_ran"
    torch.save({"step": 1, "payload": _RunsCodeWhenUnpickled(str(marker))}, tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="checkpoint.pt is unreadable.*Weights only load failed"):
        SigmaVAETrainer(SIGMA_VAE_PRESETS["tiny"], cfg)
    assert not marker.exists()
    # the same file through a pickle load would have run the payload: the test's payload is real
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_a_second_run_into_a_held_out_dir_is_refused_and_writes_nothing(photo_dirs, tmp_path):
    from latentlm_mcore.runtime.lease import LeaseHeld
    from tests.runtime.test_lease import start_holder

    holder = start_holder(tmp_path)  # another live run's lease on out_dir
    try:
        trainer = SigmaVAETrainer(SIGMA_VAE_PRESETS["tiny"], tiny_train_config(*photo_dirs, tmp_path, train_steps=2))
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid} on {socket.gethostname()}"):
            trainer.train()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["LEASE"]
    finally:
        holder.communicate("\n", timeout=30)
    trainer.train()  # released: the same trainer now runs
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "LEASE").read_text() == ""


class _SignalKind(VAETrainer):
    """A second σ-VAE model kind as the loop sees one (1-D, like audio): a linear autoencoder of random signals,
    its own data, loss and checkpoint, and nothing of the loop copied."""

    def __init__(self, cfg, nan_at_step=None):
        super().__init__(cfg)
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.Linear(4, 16))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        self.nan_at_step, self.lrs, self.saved = nan_at_step, [], []

    def train_batches(self):
        generator = torch.Generator().manual_seed(self.step)
        while True:
            yield torch.randn(8, 16, generator=generator)

    def optimizers(self):
        return [self.opt]

    def train_step(self, batch):
        self.lrs.append(self.opt.param_groups[0]["lr"])
        loss = (self.model(batch) - batch).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": float("nan") if self.step == self.nan_at_step else loss.item()}

    def evaluate(self):
        with torch.no_grad():
            signal_ = torch.randn(64, 16, generator=torch.Generator().manual_seed(99))
            return {"mse": (self.model(signal_) - signal_).pow(2).mean().item()}

    def save_checkpoint(self):
        self.saved.append(self.step)
        self.publish({"step": self.step, "model": self.model.state_dict()}, os.path.join(self.cfg.out_dir, "ckpt.pt"))


def test_a_second_model_kind_trains_on_the_same_loop(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), train_steps=7, lr=0.1, min_lr_ratio=0.1, warmup_steps=2, log_interval=3,
                      eval_interval=5, save_interval=4, tensorboard=False)
    kind = _SignalKind(cfg)
    result = kind.train()
    kind.close()
    # warmup to 0.1 over 2 steps, then a cosine to 0.01 at step 7 (written out here, not runtime/schedule.py)
    want = [0.05, 0.1] + [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 5)) for s in range(2, 7)]
    assert kind.lrs == pytest.approx(want)
    assert kind.saved == [4, 7] and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 7
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["iteration"], r["split"]) for r in records] == [(3, "train"), (5, "eval"), (6, "train"), (7, "train"),
                                                               (7, "eval")]
    assert records[-1]["mse"] == result["mse"] and result["iteration"] == 7
    assert [r["lr"] for r in records if r["split"] == "train"] == pytest.approx([want[2], want[5], want[6]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LEASE", "ckpt.pt", "metrics.jsonl"]

    # a non-finite loss stops every rank at that step; the checkpoint before it stays the good one
    failing = _SignalKind(replace(cfg, out_dir=str(tmp_path / "nan"), save_interval=2), nan_at_step=3)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        failing.train()
    assert failing.saved == [2] and torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)["step"] == 2
