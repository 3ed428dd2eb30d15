#!/usr/bin/env bash
# Class-conditional LatentLM (paper §3.1, the ImageNet recipe) on scikit-learn's digits, on 2 CPU processes:
#   digits as image folders -> σ-VAE -> imagefolder JSONL -> pre-encoding (classes:10) -> pretraining (TP=2,
#   label dropout 0.1, EMA) -> 100 digits per class at CFG 3 and CFG 1, and from the model at initialisation
#   -> σ-VAE reconstructions of the held-out digits, real training digits as many as a set -> FID against the held-out digits + classifier accuracy
#
#   bash scripts/classcond_demo.sh
#
# Re-running resumes: a stage whose output is complete is skipped, and pretraining continues from its latest
# checkpoint. Settings (environment variables):
#   CLASSCOND_DIR        where everything goes (default runs/classcond)
#   CLASSCOND_VAE_STEPS  σ-VAE training steps (default 250, the quickstart's recipe)
#   CLASSCOND_STEPS      LatentLM training steps (default: the `classcond-digits` preset's 1000)
#   CLASSCOND_PER_CLASS  images generated per class and sample set (default 100: 1,000 per set)
#   CLASSCOND_REPORT     the report JSON (default $CLASSCOND_DIR/report.json; the README's figures:
#                        bench/results/classcond_demo.json)
#   CLASSCOND_GRID       the grid of CFG 3 digits, a row per class (default $CLASSCOND_DIR/grid.png)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${CLASSCOND_DIR:-runs/classcond}"
VAE_STEPS="${CLASSCOND_VAE_STEPS:-250}"
STEPS="${CLASSCOND_STEPS:-1000}"
PER_CLASS="${CLASSCOND_PER_CLASS:-100}"
REPORT="${CLASSCOND_REPORT:-$OUT/report.json}"
GRID="${CLASSCOND_GRID:-$OUT/grid.png}"
WARMUP=$(( STEPS / 10 < 20 ? STEPS / 10 : 20 ))
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
DEMO="$PY -m latentlm_mcore.demo.classcond"
start=$SECONDS

TOTAL=9
source scripts/demo_stages.sh
mkdir -p "$OUT"

stage 1 "digits as image folders -> $OUT/digits/{train,heldout}/<digit>/"
if [ -f "$OUT/digits/done.json" ]; then skip "$OUT/digits"; else
  $DEMO digits --out "$OUT/digits" --image-size 16  # the quickstart σ-VAE's input size
fi

stage 2 "σ-VAE ($VAE_STEPS steps, the quickstart's) -> $OUT/sigma_vae"
demo_sigma_vae "$OUT/digits/train" "$OUT/digits/heldout" "$OUT/sigma_vae" "$VAE_STEPS"

stage 3 "class documents (convert.py imagefolder) and their pre-encoding (classes:10) -> $OUT/data"
for split in train heldout; do
  if [ "$OUT/data/$split/manifest.json" -nt "$OUT/sigma_vae/sigma_vae.pt" ]; then skip "$OUT/data/$split"; continue; fi
  mkdir -p "$OUT/raw"
  $PY data_prep/convert.py imagefolder --input "$OUT/digits/$split" --image-root "$OUT/digits" \
    --output "$OUT/raw/$split.jsonl"
  rm -rf "$OUT/data/$split"
  $PY tools/preprocess_interleaved.py --input "$OUT/raw/$split.jsonl" --image-root "$OUT/digits" \
    --vae "$OUT/sigma_vae/sigma_vae.pt" --tokenizer classes:10 --output "$OUT/data/$split" --no-progress
done

train() {  # $1 = save folder, then overrides
  local save=$1; shift
  $PY -m torch.distributed.run --standalone --nproc-per-node 2 pretrain/pretrain_latentlm.py \
    --preset classcond-digits --data "$OUT/data/train" --eval-data "$OUT/data/heldout" --save "$save" \
    --proportions class=1 --condition-dropout 0.1 --num-workers 1 --log-interval 50 --tensorboard false "$@"
}
done_at() { [ "$(cat "$1/latest" 2>/dev/null)" = "$(printf 'iter_%07d' "$2")" ] && [ "$1/latest" -nt "$OUT/data/train/manifest.json" ]; }

stage 4 "pretraining (preset classcond-digits, $STEPS steps, TP=2 on 2 processes, EMA) -> $OUT/model"
if done_at "$OUT/model" "$STEPS"; then skip "$OUT/model/$(cat "$OUT/model/latest")"; else
  train "$OUT/model" --save-interval 250 --eval-interval 250 --eval-iters 2 \
    --train.train-steps "$STEPS" --train.warmup-steps "$WARMUP"
fi

stage 5 "the model at initialisation (one step at learning rate 0: the initial weights) -> $OUT/model_init"
if done_at "$OUT/model_init" 1; then skip "$OUT/model_init"; else
  train "$OUT/model_init" --eval-interval 1 --eval-iters 1 --train.train-steps 1 --train.warmup-steps 0 \
    --train.lr 0 --train.min-lr 0
fi

stage 6 "generation: $PER_CLASS digits per class at CFG 3, CFG 1 (EMA weights) and from the initial model"
classes=()
for c in 0 1 2 3 4 5 6 7 8 9; do for _ in $(seq "$PER_CLASS"); do classes+=(--class "$c"); done; done
generate() {  # $1 = sample set, $2 = cfg, $3 = the model's save folder, then more generate.py arguments
  local name=$1 cfg=$2 model=$3; shift 3
  if [ "$OUT/samples/$name/samples.json" -nt "$model/latest" ]; then skip "$OUT/samples/$name"; return; fi
  $PY tools/generate.py --checkpoint "$model" "$@" --task class-to-image "${classes[@]}" --cfg-scale "$cfg" --diffusion-steps 20 \
    --seed 0 --output "$OUT/samples/$name" | tail -n 1
}
generate cfg3 3 "$OUT/model" --use-ema
generate cfg1 1 "$OUT/model" --use-ema
generate init 3 "$OUT/model_init"

stage 7 "anchors: σ-VAE reconstructions of the held-out digits (the FID floor) -> $OUT/recon, $PER_CLASS real training digits per class -> $OUT/real_train"
if [ "$OUT/recon/done.json" -nt "$OUT/sigma_vae/sigma_vae.pt" ]; then skip "$OUT/recon"; else
  $DEMO reconstruct --vae "$OUT/sigma_vae/sigma_vae.pt" --images "$OUT/digits/heldout" --out "$OUT/recon"
fi
# real digits in the generated sets' number: FID's bias depends on the image count, so this is the floor a
# set of $PER_CLASS per class is read against (the 180 reconstructions are fewer)
if grep -qs "\"per_class\": $PER_CLASS}" "$OUT/real_train/done.json"; then skip "$OUT/real_train"; else
  rm -rf "$OUT/real_train"
  $DEMO real-subset --images "$OUT/digits/train" --per-class "$PER_CLASS" --out "$OUT/real_train"
fi

stage 8 "FID against the held-out real digits (TF-Inception, the 16px images resized to 299 inside it)"
# Inception at 299 px is most of this stage: every core for it (the training stages keep one thread a process);
# the reference features are computed once and reused for every set.
export OMP_NUM_THREADS="$(nproc)"
mkdir -p "$OUT/fid"
if [ ! -f "$OUT/fid/reference.npz" ]; then
  $PY tools/evaluate_images.py --reference "$OUT/digits/heldout" --save-reference "$OUT/fid/reference.npz"
fi
for name in recon real_train cfg3 cfg1 init; do
  images="$OUT/samples/$name/images"; report="$OUT/fid/$name.json"
  [ "$name" = recon ] && { images="$OUT/recon"; report="$OUT/fid/reconstruction.json"; }
  [ "$name" = real_train ] && images="$OUT/real_train"
  if [ "$report" -nt "$images" ]; then skip "$report"; continue; fi
  $PY tools/evaluate_images.py --images "$images" --reference "$OUT/fid/reference.npz" --output "$report" >/dev/null
done

stage 9 "report: classifier accuracy per requested class + FIDs -> $REPORT, grid -> $GRID"
$DEMO report --run "$OUT" --output "$REPORT" --grid "$GRID" --setting vae_steps="$VAE_STEPS" \
  --setting steps="$STEPS" --setting per_class="$PER_CLASS" --setting diffusion_steps=20

echo
echo "=== classcond demo finished in $(( SECONDS - start ))s"
echo "    generated digits (a row per class, CFG 3): $GRID"
echo "    report:                                    $REPORT"
