#!/bin/bash
# Pretrain the 1.3B LatentLM MLLM (appendix D) on N nodes x 8 H100: 250k steps of 4M tokens = 1T tokens.
#
#   DATA=/lustre/latentlm/mds SAVE=/lustre/ckpt/mllm-1.3b sbatch -N 16 slurm/pretrain_mllm_1.3b.sh [extra args]
#
# Extra arguments go to pretrain/pretrain_latentlm.py (e.g. --parallel.tensor-parallel 2 --wandb-project x).
# Preemption: Slurm sends USR1 300 s before the time limit; the batch shell forwards it to every task,
# which saves a checkpoint and exits, then the job requeues itself and resumes from that checkpoint.
# Environment (defaults in brackets): DATA [$PWD/data/mds; empty: random batches], EVAL_DATA [unset], SAVE [$PWD/checkpoints/mllm-1.3b],
# PRESET [mllm-1.3b], FP8 [hybrid; "none" to disable], PYTHON [python], LATENTLM_HOME [submit dir],
# MASTER_PORT [29500].
#SBATCH --job-name=latentlm-1.3b
#SBATCH --nodes=16
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

PRESET=${PRESET:-mllm-1.3b}
DATA=${DATA-$PWD/data/mds}  # set but empty: random batches (throughput runs)
SAVE=${SAVE:-$PWD/checkpoints/$PRESET}
PYTHON=${PYTHON:-python}
FP8=${FP8:-hybrid}

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1          # lets TP communication overlap with compute
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1      # a failed collective ends the job instead of hanging it
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

args=(--preset "$PRESET" --save "$SAVE")
[ -n "$DATA" ] && args+=(--data "$DATA")
[ -n "${EVAL_DATA:-}" ] && args+=(--eval-data "$EVAL_DATA")
[ "$FP8" != none ] && args+=(--fp8 "$FP8")

echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes, $SLURM_NTASKS tasks," \
     "master $MASTER_ADDR:$MASTER_PORT, save $SAVE"

preempted=0
forward_signal() {  # USR1 from Slurm (time limit) or TERM (preemption): tasks save and exit
  preempted=1
  echo "$(date -Is) got signal, asking tasks to checkpoint and exit"
  kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap forward_signal USR1 TERM

# --cpus-per-task again on srun: Slurm 22.05-23.02 does not pass the batch value on to srun's tasks
srun --kill-on-bad-exit=1 --cpu-bind=none --cpus-per-task "${SLURM_CPUS_PER_TASK:-1}" "$PYTHON" pretrain/pretrain_latentlm.py "${args[@]}" "$@" &
srun_pid=$!
set +e
wait "$srun_pid"; rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; rc=$?; done  # wait again after a trapped signal
set -e

if [ "$preempted" = 1 ]; then
  echo "$(date -Is) checkpointed; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
