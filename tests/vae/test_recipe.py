"""The paper's σ-VAE recipe reaches the trainer: the `paper` preset's training defaults, the entry point's
rule for --train-steps against the recipe's epochs, and what slurm/train_sigma_vae.sh passes by default."""

import os
import subprocess
from pathlib import Path

import pytest

from pretrain.train_sigma_vae import parse_args

REPO = Path(__file__).resolve().parents[2]


def test_paper_preset_trains_the_paper_recipe():
    model, train = parse_args(["--preset", "paper", "--train-data", "imagenet/train"])
    assert (model.image_size, model.patch_size, model.latent_dim, model.c_sigma) == (256, 16, 32, 0.75)
    assert train.epochs == 200 and (train.lr, train.adam_beta1, train.adam_beta2, train.weight_decay) == \
        (3e-4, 0.0, 0.99, 0.01)
    assert train.perceptual_weight == 1.0 and train.gan_enabled and train.gan_start_step == 50_000
    assert train.gan_weight == 0.5 and train.layer_decay == 0.65
    # The command line still wins, and an explicit step count replaces the recipe's epochs.
    _, short = parse_args(["--preset", "paper", "--train-data", "x", "--train-steps", "10", "--gan-start-step", "-1"])
    assert short.train_steps == 10 and short.epochs == 0 and not short.gan_enabled
    with pytest.raises(SystemExit):
        parse_args(["--preset", "paper", "--train-data", "x", "--train-steps", "10", "--epochs", "2"])


def test_small_presets_train_without_perceptual_or_gan_losses():
    for preset in ("tiny", "quickstart"):
        _, train = parse_args(["--preset", preset, "--train-data", "x"])
        assert train.perceptual_weight == 0 and not train.gan_enabled and train.epochs == 0


def test_slurm_launcher_passes_the_paper_recipe(tmp_path):
    """The sbatch script run with stand-ins for srun and scontrol (which record their arguments): its defaults
    are the paper preset, 32 images per GPU, a VGG16 file for the perceptual loss and an optional encoder start."""
    bin_dir, record = tmp_path / "bin", tmp_path / "srun_args"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node-a\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-a", SLURM_JOB_ID="7",
               SLURM_NNODES="1", SLURM_NTASKS="8", SLURM_CPUS_PER_TASK="12", REPO_DIR=str(REPO), OUT_DIR=str(tmp_path / "out"),
               INIT_ENCODER="/weights/beit3_base_patch16_224.pth")
    for name in ("PRESET", "VGG16_WEIGHTS", "BATCH_PER_GPU", "TRAIN_DATA"):
        env.pop(name, None)
    proc = subprocess.run(["bash", "slurm/train_sigma_vae.sh", "--log-interval", "50"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = record.read_text().splitlines()
    script = args.index(str(REPO / "pretrain" / "train_sigma_vae.py"))
    assert args[args.index("--cpus-per-task") + 1] == "12", "srun must be given the batch's cpus-per-task"
    model, train = parse_args(args[script + 1:])
    assert model.image_size == 256 and model.enc_layers == 12
    assert train.batch_size == 32 and train.epochs == 200 and train.log_interval == 50  # 8 GPUs x 32 = 256
    assert train.perceptual_weight == 1.0 and train.vgg16_weights == "/data/weights/vgg16-397923af.pth"
    assert train.gan_start_step == 50_000 and train.init_encoder == "/weights/beit3_base_patch16_224.pth"
    assert train.train_data == "/data/imagenet/train" and train.out_dir == str(tmp_path / "out")
