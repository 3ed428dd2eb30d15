#!/bin/bash
# Multi-GPU audio σ-VAE training: one task per GPU, torch DDP over NCCL.
#
#   sbatch slurm/train_audio_vae.sh                                   # 15 Hz preset, paths below
#   PRESET=3.75hz sbatch --nodes 2 slurm/train_audio_vae.sh --train-steps 200000   # extra args go to the trainer
#   TRAIN_DATA=/data/libritts/train.jsonl EVAL_DATA=/data/libritts/dev.jsonl OUT_DIR=/ckpt/avae sbatch slurm/train_audio_vae.sh
#
# The paper publishes no training recipe for its speech tokenizer (§3.3.1 gives the architecture and the
# discriminators only). The defaults here are DAC's (descript-audio-codec conf/base.yml): 400k steps, AdamW
# β=(0.8, 0.99), mel weight 15, adversarial 1, feature matching 2, 72 crops per step (8 GPUs x 9); the
# discriminators switch on after a 10k-step reconstruction-only warm-up (GAN_START, our choice).
# TRAIN_DATA is a raw JSONL of source `speech` (data_prep/convert.py librispeech|libriheavy) or a folder of
# .wav/.flac. Re-submitting with the same OUT_DIR resumes; near the time limit Slurm sends USR1 (--signal
# below) to every task, and the trainer saves a checkpoint and exits cleanly. The exported model is
# $OUT_DIR/audio_vae.pt.
#SBATCH --job-name=audio-vae
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
TRAIN_DATA=${TRAIN_DATA:-/data/libritts/train.jsonl}
EVAL_DATA=${EVAL_DATA:-/data/libritts/dev.jsonl}
OUT_DIR=${OUT_DIR:-$REPO_DIR/outputs/audio_vae_15hz}
PRESET=${PRESET:-15hz}                     # 15hz | 7.5hz | 3.75hz (24 kHz, latent dim 32 / 64 / 128)
BATCH_PER_GPU=${BATCH_PER_GPU:-9}          # 8 GPUs x 9 = 72, DAC's batch size
CROP_SECONDS=${CROP_SECONDS:-1.0}
TRAIN_STEPS=${TRAIN_STEPS:-400000}
GAN_START=${GAN_START:-10000}
WANDB_PROJECT=${WANDB_PROJECT:-}           # empty: TensorBoard only; wandb runs offline unless WANDB_MODE=online

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$OUT_DIR"

echo "audio σ-VAE ($PRESET): $SLURM_NNODES node(s), $SLURM_NTASKS GPUs, master $MASTER_ADDR:$MASTER_PORT, out $OUT_DIR"

# srun starts one task per GPU; the trainer reads its rank from Slurm's variables (runtime/ranks.py).
# --cpus-per-task again on srun: Slurm 22.05-23.02 does not pass the batch value on to srun's tasks
srun --kill-on-bad-exit=1 --cpus-per-task "${SLURM_CPUS_PER_TASK:-1}" "$PYTHON" "$REPO_DIR/pretrain/train_audio_vae.py" \
  --preset "$PRESET" \
  --train-data "$TRAIN_DATA" \
  --eval-data "$EVAL_DATA" \
  --out-dir "$OUT_DIR" \
  --batch-size "$BATCH_PER_GPU" \
  --crop-seconds "$CROP_SECONDS" \
  --train-steps "$TRAIN_STEPS" \
  --gan-start-step "$GAN_START" \
  --wandb-project "$WANDB_PROJECT" \
  "$@"
