#!/bin/bash
# Multi-GPU σ-VAE training: one task per GPU, torch DDP over NCCL.
#
#   sbatch slurm/train_sigma_vae.sh                                  # paper preset, paths below
#   sbatch --nodes 4 slurm/train_sigma_vae.sh --train-steps 100000   # extra args go to the trainer
#   TRAIN_DATA=/data/train.jsonl EVAL_DATA=/data/val OUT_DIR=/ckpt/vae sbatch slurm/train_sigma_vae.sh
#
# The paper preset trains the paper's recipe (§3.1.3 / appendix B): 200 epochs at batch 256 (8 GPUs x 32),
# AdamW β=(0, 0.99), LR 3e-4, weight decay 0.01, perceptual loss (VGG16_WEIGHTS: a local torchvision
# VGG16 state_dict; nothing is downloaded) and the patch-GAN loss with LDM's adaptive weight from step 50k.
# INIT_ENCODER starts the encoder from a pretrained ViT-B/16 (timm, HF ViT, BEiT v2 or BEiT-3 state dict; the
# paper uses BEiT-3 base) and turns on layer-wise LR decay 0.65; empty: a random encoder at the full LR.
#
# Re-submitting with the same OUT_DIR resumes from its checkpoint. Near the time limit Slurm sends USR1
# (--signal below) to every task; the trainer then saves a checkpoint and exits cleanly.
#SBATCH --job-name=sigma-vae
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@180
#SBATCH --output=%x-%j.out

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
TRAIN_DATA=${TRAIN_DATA:-/data/imagenet/train}
EVAL_DATA=${EVAL_DATA:-/data/imagenet/val}
OUT_DIR=${OUT_DIR:-$REPO_DIR/outputs/sigma_vae_paper}
PRESET=${PRESET:-paper}
BATCH_PER_GPU=${BATCH_PER_GPU:-32}        # 8 GPUs x 32 = 256, the paper's batch size
NUM_WORKERS=${NUM_WORKERS:-8}
WANDB_PROJECT=${WANDB_PROJECT:-}           # empty: TensorBoard only; wandb runs offline unless WANDB_MODE=online
VGG16_WEIGHTS=${VGG16_WEIGHTS:-/data/weights/vgg16-397923af.pth}  # read only where the preset uses it
INIT_ENCODER=${INIT_ENCODER:-}             # e.g. /data/weights/beit3_base_patch16_224.pth

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$OUT_DIR"

echo "σ-VAE: $SLURM_NNODES node(s), $SLURM_NTASKS GPUs, master $MASTER_ADDR:$MASTER_PORT, out $OUT_DIR"

# srun starts one task per GPU; the trainer reads its rank from Slurm's variables (runtime/ranks.py).
# --cpus-per-task again on srun: Slurm 22.05-23.02 does not pass the batch value on to srun's tasks
srun --kill-on-bad-exit=1 --cpus-per-task "${SLURM_CPUS_PER_TASK:-1}" "$PYTHON" "$REPO_DIR/pretrain/train_sigma_vae.py" \
  --preset "$PRESET" \
  --train-data "$TRAIN_DATA" \
  --eval-data "$EVAL_DATA" \
  --out-dir "$OUT_DIR" \
  --batch-size "$BATCH_PER_GPU" \
  --num-workers "$NUM_WORKERS" \
  --wandb-project "$WANDB_PROJECT" \
  --vgg16-weights "$VGG16_WEIGHTS" \
  --init-encoder "$INIT_ENCODER" \
  "$@"
