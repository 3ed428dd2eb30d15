#!/bin/bash
# Class-conditional ImageNet 256 (paper §3.1, Tables 1 and 7) on N nodes x 8 GPUs: a preset imagenet-m/l/xl/3b
# (Table 7: 75k steps at batch 2048) or imagenet-latentlm-l (Table 1: 250k steps), on class documents only.
#
#   DATA=/lustre/latentlm/imagenet SAVE=/lustre/ckpt/imagenet-l PRESET=imagenet-l sbatch -N 4 slurm/train_imagenet.sh
#
# DATA is tools/preprocess_interleaved.py output with --tokenizer classes:1000 --hflip (README, class-conditional
# images). The launcher is slurm/pretrain_mllm_1.3b.sh (signals, requeue and resume are its), run here with
# this preset, `--proportions class=1` and FP8 off by default (the paper trains these in bf16). Extra arguments
# go to pretrain/pretrain_latentlm.py. Environment as in that script; PRESET [imagenet-l], FP8 [none].
#SBATCH --job-name=latentlm-imagenet
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=latentlm-%x-%j.out

set -euo pipefail
cd "${LATENTLM_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
export PRESET=${PRESET:-imagenet-l} FP8=${FP8:-none}
export DATA=${DATA-$PWD/data/imagenet}
# exec: the same process, so Slurm's USR1 / TERM reach the launcher's trap
exec bash slurm/pretrain_mllm_1.3b.sh --proportions class=1 "$@"
