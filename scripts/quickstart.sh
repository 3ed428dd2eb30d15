#!/usr/bin/env bash
# The whole LatentLM pipeline on the bundled demo corpus, on 2 CPU processes, in under 20 minutes:
#   environment -> demo corpus -> σ-VAE -> pre-encoding -> pretraining (TP=2) -> HF export -> generation -> report
#
#   bash scripts/quickstart.sh
#
# Re-running resumes: a stage whose output is complete (and newer than its input) is skipped, and pretraining
# continues from its latest checkpoint. Settings (environment variables):
#   QUICKSTART_DIR               where everything goes (default runs/quickstart)
#   QUICKSTART_VAE_STEPS         σ-VAE training steps (default 250)
#   QUICKSTART_STEPS             LatentLM training steps (default: the `quickstart` preset's 1000)
#   QUICKSTART_SAMPLES_PER_DIGIT images generated per digit; one row of the grid each (default 8)
#   QUICKSTART_CFG_SCALE         classifier-free guidance scale for the digits (default 3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${QUICKSTART_DIR:-runs/quickstart}"
VAE_STEPS="${QUICKSTART_VAE_STEPS:-250}"
STEPS="${QUICKSTART_STEPS:-1000}"
SAMPLES_PER_DIGIT="${QUICKSTART_SAMPLES_PER_DIGIT:-8}"
CFG_SCALE="${QUICKSTART_CFG_SCALE:-3}"
WARMUP=$(( STEPS / 10 < 20 ? STEPS / 10 : 20 ))
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
start=$SECONDS

TOTAL=8
source scripts/demo_stages.sh

stage 1 "environment (.venv)"
bash scripts/setup_env.sh
mkdir -p "$OUT"

stage 2 "demo corpus: sklearn digits + stdlib docstrings -> $OUT/corpus"
if [ -f "$OUT/corpus/corpus.json" ]; then skip "$OUT/corpus/corpus.json"; else
  $PY data_prep/demo_corpus.py --out "$OUT/corpus" --image-size 16  # the quickstart σ-VAE's input size
fi

stage 3 "σ-VAE ($VAE_STEPS steps) -> $OUT/sigma_vae"
demo_sigma_vae "$OUT/corpus/images/train.jsonl" "$OUT/corpus/images/heldout.jsonl" "$OUT/sigma_vae" "$VAE_STEPS"

stage 4 "pre-encoding: tokens + σ-VAE latents -> MDS shards in $OUT/data"
for split in train heldout; do
  if [ "$OUT/data/$split/manifest.json" -nt "$OUT/sigma_vae/sigma_vae.pt" ]; then skip "$OUT/data/$split"; continue; fi
  rm -rf "$OUT/data/$split"
  $PY tools/preprocess_interleaved.py --input "$OUT/corpus/$split/"{text,pair,interleaved}.jsonl \
    --image-root "$OUT/corpus/images" --vae "$OUT/sigma_vae/sigma_vae.pt" --tokenizer cl100k_base:8192 \
    --output "$OUT/data/$split"
done

stage 5 "pretraining LatentLM (preset quickstart, $STEPS steps, TP=2 on 2 processes) -> $OUT/model"
if [ "$(cat "$OUT/model/latest" 2>/dev/null)" = "$(printf 'iter_%07d' "$STEPS")" ] \
   && [ "$OUT/model/latest" -nt "$OUT/data/train/manifest.json" ]; then
  skip "$OUT/model/$(cat "$OUT/model/latest")"
else
  $PY -m torch.distributed.run --standalone --nproc-per-node 2 pretrain/pretrain_latentlm.py --preset quickstart \
    --data "$OUT/data/train" --eval-data "$OUT/data/heldout" --save "$OUT/model" \
    --proportions text=1,pair=12,interleaved=2 --mixture-unit documents --num-workers 1 --log-interval 10 --save-interval 100 \
    --eval-interval 250 --eval-iters 4 --train.train-steps "$STEPS" --train.warmup-steps "$WARMUP"
fi

stage 6 "export to Hugging Face -> $OUT/hf"
if [ "$OUT/hf/config.json" -nt "$OUT/model/latest" ]; then skip "$OUT/hf"; else
  $PY tools/convert_ckpt_to_hf.py --checkpoint "$OUT/model" --output "$OUT/hf" --overwrite  # tokenizer, σ-VAE: the run's
fi

stage 7 "generation: $SAMPLES_PER_DIGIT images per digit, and a caption for one held-out image per digit"
if [ "$OUT/samples/text_to_image/samples.json" -nt "$OUT/hf/config.json" ]; then skip "$OUT/samples/text_to_image"; else
  prompts=()
  for digit in zero one two three four five six seven eight nine; do
    for _ in $(seq "$SAMPLES_PER_DIGIT"); do prompts+=(--prompt "a handwritten digit $digit"); done
  done
  $PY tools/generate.py --hf "$OUT/hf" --task text-to-image "${prompts[@]}" --cfg-scale "$CFG_SCALE" \
    --diffusion-steps 20 --seed 0 --output "$OUT/samples/text_to_image"
fi
if [ "$OUT/samples/image_to_text/samples.json" -nt "$OUT/hf/config.json" ]; then skip "$OUT/samples/image_to_text"; else
  images=()
  while read -r path; do images+=(--image "$path"); done < <($PY tools/demo_quality.py --corpus "$OUT/corpus" --heldout-examples)
  $PY tools/generate.py --hf "$OUT/hf" --task image-to-text "${images[@]}" --temperature 0 --max-new-tokens 12 \
    --seed 0 --output "$OUT/samples/image_to_text"
fi

stage 8 "quality report -> $OUT/quality.json"
$PY tools/demo_quality.py --corpus "$OUT/corpus" --hf "$OUT/hf" --text-to-image "$OUT/samples/text_to_image" \
  --image-to-text "$OUT/samples/image_to_text" --output "$OUT/quality.json"

echo
echo "=== quickstart finished in $(( SECONDS - start ))s"
echo "    generated digits (one row per digit): $OUT/samples/text_to_image/grid.png"
echo "    captions of held-out digits:          $OUT/samples/image_to_text/samples.json"
echo "    loss curve:                           $OUT/model/loss_curve.png"
echo "    Hugging Face model:                   $OUT/hf"
echo "    quality report:                       $OUT/quality.json"
