#!/bin/bash
# Preprocess raw JSONL into MDS shards with a Slurm job array, then merge the parts in a dependent job.
#
# Run it as a plain script on the login node; it submits both jobs:
#   INPUT='/data/raw/*.jsonl' IMAGE_ROOT=/data/images VAE=/ckpt/sigma_vae.pt OUTPUT=/data/mllm \
#   NUM_SHARDS=256 bash slurm/preprocess_interleaved.sh
#
# Task k of the array writes part k of NUM_SHARDS (one GPU for the σ-VAE; CPU threads decode images).
# The merge job runs only after every task succeeded (if one fails, Slurm cancels the merge instead of
# leaving it pending forever with DependencyNeverSatisfied). If some failed, run the same command again:
# finished parts are skipped and only the missing ones are redone, then the merge runs.
# Skipped documents: $OUTPUT/parts/*.rejects.jsonl; counts by reason: $OUTPUT/manifest.json.
#
# Optional: TOKENIZER (default cl100k_base), MAX_PARALLEL (tasks at once, default 64), GPUS_PER_TASK
# (default 1; 0 encodes on CPU), CPUS_PER_TASK (default 16), TIME (default 24:00:00), PARTITION,
# SBATCH_EXTRA (more sbatch options), PYTHON (default .venv/bin/python of the repository).

set -euo pipefail

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
TOOL="$REPO_DIR/tools/preprocess_interleaved.py"

case "${PREPROCESS_STEP:-submit}" in
encode)  # one array task (inside Slurm)
  set -f; inputs=($INPUT); set +f  # several patterns may be given; the tool expands the globs itself
  exec "$PYTHON" "$TOOL" --input "${inputs[@]}" --image-root "$IMAGE_ROOT" --vae "$VAE" --output "$OUTPUT" \
    --tokenizer "${TOKENIZER:-cl100k_base}" --num-shards "$NUM_SHARDS" --shard-index "$SLURM_ARRAY_TASK_ID" \
    --no-progress
  ;;
merge)  # the dependent job (inside Slurm)
  exec "$PYTHON" "$TOOL" --merge --output "$OUTPUT" --num-shards "$NUM_SHARDS"
  ;;
submit)
  : "${INPUT:?set INPUT to the raw JSONL files (a quoted glob)}" "${IMAGE_ROOT:?set IMAGE_ROOT}" \
    "${VAE:?set VAE to the σ-VAE checkpoint}" "${OUTPUT:?set OUTPUT}" "${NUM_SHARDS:?set NUM_SHARDS}"
  mkdir -p "$OUTPUT/slurm"
  common=(--parsable --time "${TIME:-24:00:00}" ${PARTITION:+--partition "$PARTITION"} ${SBATCH_EXTRA:-})
  export REPO_DIR PYTHON INPUT IMAGE_ROOT VAE OUTPUT NUM_SHARDS TOKENIZER="${TOKENIZER:-cl100k_base}"
  gpus=${GPUS_PER_TASK:-1}
  array_id=$(PREPROCESS_STEP=encode sbatch "${common[@]}" --job-name preprocess \
    --array "0-$((NUM_SHARDS - 1))%${MAX_PARALLEL:-64}" --ntasks 1 --cpus-per-task "${CPUS_PER_TASK:-16}" \
    $([ "$gpus" -gt 0 ] && echo "--gpus-per-task $gpus") \
    --output "$OUTPUT/slurm/%x-%A_%a.out" --export ALL "$0")
  merge_id=$(PREPROCESS_STEP=merge sbatch "${common[@]}" --job-name preprocess-merge \
    --dependency "afterok:${array_id%%;*}" --kill-on-invalid-dep=yes --ntasks 1 --cpus-per-task 2 \
    --output "$OUTPUT/slurm/%x-%j.out" --export ALL "$0")
  echo "submitted array job $array_id ($NUM_SHARDS parts) and merge job $merge_id -> $OUTPUT"
  ;;
*)
  echo "unknown PREPROCESS_STEP=$PREPROCESS_STEP" >&2
  exit 2
  ;;
esac
