# Shared by the CPU demos (quickstart.sh, classcond_demo.sh); sourced, not run. Expects PY, start, TOTAL.

stage() { echo; echo "=== [$1/$TOTAL] $2 ($(( SECONDS - start ))s elapsed)"; }
skip() { echo "    done already: $1"; }

# The quickstart's σ-VAE recipe on 16 px digits: demo_sigma_vae TRAIN_DATA EVAL_DATA OUT_DIR STEPS.
# Skipped when OUT_DIR holds the σ-VAE of a finished run of STEPS steps (its final eval is logged).
demo_sigma_vae() {
  local train="$1" eval="$2" out="$3" steps="$4"
  if [ -f "$out/sigma_vae.pt" ] && grep -qs "\"iteration\": $steps, \"split\": \"eval\"" "$out/metrics.jsonl"; then
    skip "$out/sigma_vae.pt"
    return
  fi
  $PY pretrain/train_sigma_vae.py --preset quickstart --train-data "$train" --eval-data "$eval" --out-dir "$out" \
    --train-steps "$steps" --batch-size 64 --lr 1e-3 --warmup-steps $(( steps / 10 )) --crop-min-scale 1.0 \
    --log-interval 10 --eval-interval "$steps" --save-interval 100 --num-workers 0 --stats-samples 512 \
    --tensorboard false
}
