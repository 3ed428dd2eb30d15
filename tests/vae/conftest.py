"""Shared fixtures: real photos (scikit-learn's china.jpg and flower.jpg) split into disjoint training
and held-out regions, and one tiny σ-VAE trained on them that several tests inspect."""

import logging

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from latentlm_mcore.vae import SIGMA_VAE_PRESETS
from latentlm_mcore.vae.image_trainer import SigmaVAETrainer
from latentlm_mcore.vae.trainer import TrainConfig

TRAIN_STEPS = 300


@pytest.fixture(autouse=True)
def _few_threads():
    # Two shared cores in CI and tiny matrices: one thread per process avoids contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def photo_dirs(tmp_path_factory):
    """train/: the left 70% of each photo (halved to 320x213); heldout/: six 80x80 crops per photo from
    the right 30%, pixels the model never trains on and the latent statistics never see."""
    root = tmp_path_factory.mktemp("photos")
    (root / "train").mkdir()
    (root / "heldout").mkdir()
    photos = load_sample_images()
    for name, array in zip(("china", "flower"), photos.images):
        img = Image.fromarray(array).resize((320, 213), Image.BICUBIC)
        img.crop((0, 0, 224, 213)).save(root / "train" / f"{name}.png")
        for i, top in enumerate((0, 66, 133)):
            for j, left in enumerate((224, 240)):
                img.crop((left, top, left + 80, top + 80)).save(root / "heldout" / f"{name}_{i}{j}.png")
    return root / "train", root / "heldout"


def tiny_train_config(train_dir, eval_dir, out_dir, **changes) -> TrainConfig:
    cfg = dict(train_data=str(train_dir), eval_data=str(eval_dir), out_dir=str(out_dir), train_steps=TRAIN_STEPS,
               batch_size=16, lr=1e-3, warmup_steps=20, crop_min_scale=0.1, eval_interval=TRAIN_STEPS,
               save_interval=TRAIN_STEPS, log_interval=50, stats_samples=256, num_workers=0, tensorboard=False)
    cfg.update(changes)
    return TrainConfig(**cfg)


@pytest.fixture(scope="session")
def trained_run(photo_dirs, tmp_path_factory):
    """A tiny σ-VAE trained TRAIN_STEPS steps on the training regions; returns (out_dir, final eval)."""
    out_dir = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    logging.getLogger("latentlm_mcore").setLevel(logging.INFO)
    trainer = SigmaVAETrainer(SIGMA_VAE_PRESETS["tiny"], tiny_train_config(*photo_dirs, out_dir))
    result = trainer.train()
    trainer.close()
    return out_dir, result
