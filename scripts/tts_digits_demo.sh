#!/usr/bin/env bash
# The spoken-digits text-to-speech demo (paper §3.3, issue 13 item 5) on 2 CPU processes:
#   environment -> espeak-ng digits corpus -> audio σ-VAE -> speech shards -> tts-tiny (DP=2) -> generation
#   of each digit in each voice (training voices + the held-out one) -> report (recognizer, speaker similarity)
#
#   bash scripts/tts_digits_demo.sh
#
# Re-running resumes: a stage whose output is complete (and newer than its input) is skipped, and training
# continues from its latest checkpoint. Settings (environment variables):
#   TTS_DEMO_DIR          where everything goes (default runs/tts_digits_demo)
#   TTS_DEMO_PHRASES      digit phrases besides the ten digits in the corpus (default 30)
#   TTS_DEMO_VAE_STEPS    audio σ-VAE steps (default 2400)
#   TTS_DEMO_STEPS        tts-tiny steps (default: the preset's 1000)
#   TTS_DEMO_REPORT       also write the figures to the repository (bench/results, docs/) when 1 (default 0)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${TTS_DEMO_DIR:-runs/tts_digits_demo}"
PHRASES="${TTS_DEMO_PHRASES:-30}"
VAE_STEPS="${TTS_DEMO_VAE_STEPS:-2400}"  # 600 stayed unintelligible (README: the σ-VAE recipe search, run J)
STEPS="${TTS_DEMO_STEPS:-1000}"
WARMUP=$(( STEPS / 10 < 20 ? STEPS / 10 : 20 ))
LATENT_DIM=32  # the demo σ-VAE's (README: Speech, deviations)
VAE_STRIDES=8,5,10  # 400x: 40 Hz latents, and a 2 kHz stage after the first instead of 8 kHz (1.8x faster steps)
VAE_MEL_CLAMP=1e-3  # the training mel loss's floor above digital silence (README: the σ-VAE recipe search)
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
start=$SECONDS

TOTAL=7
source scripts/demo_stages.sh

stage 1 "environment (.venv, espeak-ng)"
bash scripts/setup_env.sh
mkdir -p "$OUT"

stage 2 "spoken digits corpus (espeak-ng) -> $OUT/corpus"
if [ -f "$OUT/corpus/heldout_voice.jsonl" ]; then skip "$OUT/corpus"; else
  $PY data_prep/speech_digits.py --out "$OUT/corpus" --phrases "$PHRASES"
fi

stage 3 "audio σ-VAE ($VAE_STEPS steps, reconstruction losses only) -> $OUT/audio_vae"
if [ -f "$OUT/audio_vae/audio_vae.pt" ] && grep -qs "\"iteration\": $VAE_STEPS, \"split\": \"eval\"" "$OUT/audio_vae/metrics.jsonl"; then
  skip "$OUT/audio_vae/audio_vae.pt"
else
  # one process: every core for it (the LM stage keeps one thread a process)
  OMP_NUM_THREADS="$(nproc)" $PY pretrain/train_audio_vae.py --preset tiny --model.latent-dim "$LATENT_DIM" --model.strides "$VAE_STRIDES" \
    --mel-clamp "$VAE_MEL_CLAMP" \
    --train-data "$OUT/corpus/train.jsonl" --eval-data "$OUT/corpus/heldout.jsonl" --out-dir "$OUT/audio_vae" \
    --train-steps "$VAE_STEPS" --batch-size 8 --crop-seconds 0.5 --lr 3e-3 --warmup-steps 20 \
    --log-interval 20 --eval-interval "$VAE_STEPS" --save-interval 100 --eval-utterances 16 --tensorboard false
fi

stage 4 "speech shards: tokens + audio σ-VAE latents -> $OUT/data"
if [ "$OUT/data/manifest.json" -nt "$OUT/audio_vae/audio_vae.pt" ]; then skip "$OUT/data"; else
  rm -rf "$OUT/data"
  $PY tools/preprocess_interleaved.py --input "$OUT/corpus/train.jsonl" --audio-root "$OUT/corpus" \
    --audio-vae "$OUT/audio_vae/audio_vae.pt" --tokenizer cl100k_base:8192 --output "$OUT/data"
fi

stage 5 "training tts-tiny ($STEPS steps, data-parallel on 2 processes) -> $OUT/model"
if [ "$(cat "$OUT/model/latest" 2>/dev/null)" = "$(printf 'iter_%07d' "$STEPS")" ] \
   && [ "$OUT/model/latest" -nt "$OUT/data/manifest.json" ]; then
  skip "$OUT/model/$(cat "$OUT/model/latest")"
else
  $PY -m torch.distributed.run --standalone --nproc-per-node 2 pretrain/pretrain_latentlm.py --preset tts-tiny \
    --model.latent-dim "$LATENT_DIM" --data "$OUT/data" --save "$OUT/model" --proportions speech=1 \
    --num-workers 1 --log-interval 10 --save-interval 100 --tensorboard false \
    --train.train-steps "$STEPS" --train.warmup-steps "$WARMUP"
fi

stage 6 "generation: each digit in each voice it was prompted with -> $OUT/samples"
if [ "$OUT/samples/speech.json" -nt "$OUT/model/latest" ]; then skip "$OUT/samples"; else
  mapfile -t args < <($PY -m latentlm_mcore.demo.tts_digits prompts --corpus "$OUT/corpus" --out "$OUT/prompts.json")
  $PY tools/generate.py --checkpoint "$OUT/model" --task text-to-speech "${args[@]}" --max-seconds 3 --seed 0 \
    --output "$OUT/samples"
fi

stage 7 "report: recognizer accuracy (real / reconstructed / generated / teacher-forced), speaker similarity -> $OUT/report.json"
# what limits the generated speech, the σ-VAE's latents or the LM (demo/tts_diagnosis.py): one forward pass per utterance
$PY -m latentlm_mcore.demo.tts_diagnosis --checkpoint "$OUT/model" --corpus "$OUT/corpus" --output "$OUT/diagnosis.json" > /dev/null
extra="{\"date\": \"$(date -u +%F)\", \"audio_vae_steps\": $VAE_STEPS, \"tts_steps\": $STEPS, \"phrases\": $PHRASES, \"latent_dim\": $LATENT_DIM, \"diagnosis\": $(cat "$OUT/diagnosis.json")}"
$PY -m latentlm_mcore.demo.tts_digits report --corpus "$OUT/corpus" --vae "$OUT/audio_vae/audio_vae.pt" \
  --prompts "$OUT/prompts.json" --generated "$OUT/samples" --output "$OUT/report.json" --png "$OUT/mel.png" \
  --extra "$extra"
if [ "${TTS_DEMO_REPORT:-0}" = 1 ]; then
  cp "$OUT/report.json" bench/results/tts_digits_demo.json
  cp "$OUT/mel.png" docs/tts_digits_mel.png
fi

echo
echo "=== spoken digits demo finished in $(( SECONDS - start ))s"
echo "    generated speech:  $OUT/samples/<i>.wav (texts and voices: $OUT/prompts.json)"
echo "    mel spectrograms:  $OUT/mel.png (real above generated)"
echo "    report:            $OUT/report.json"
