#!/usr/bin/env bash
# BF16 mixed precision against FP32: the same short training run twice (same data, seed and
# schedule), then the validation loss of both final checkpoints over the same validation
# batches (evaluation runs in FP32). Prints both losses and their relative difference.
#   bash scripts/bf16_check.sh [CONFIG] [STEPS] [DATA] [OUT]
# defaults: configs/baseline-small.json, 200 steps, /work/main/data/prepared (else
# data/prepared), runs/bf16-check.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/baseline-small.json}
STEPS=${2:-200}
DATA=${3:-}
if [ -z "$DATA" ]; then
  DATA=data/prepared
  [ -f /work/main/data/prepared/train.bin ] && DATA=/work/main/data/prepared
fi
OUT=${4:-runs/bf16-check}
EVAL_LIMIT=${EVAL_LIMIT:-}  # validation batches (empty: the whole split)
limit=()
[[ -n "$EVAL_LIMIT" ]] && limit=(--limit "$EVAL_LIMIT")
mkdir -p "$OUT"
for p in fp32 bf16; do
  echo "[bf16_check] training $CONFIG for $STEPS steps in $p"
  start=$(date +%s)
  ./build/dlcm train --config "$CONFIG" --data "$DATA" --out "$OUT/$p" --steps "$STEPS" \
    --set train.precision=$p --set train.eval_every=0 --set train.ckpt_every=0 --quiet --overwrite
  echo "[bf16_check] $p: $(( $(date +%s) - start )) s"
  ./build/dlcm eval --ckpt "$OUT/$p" --data "$DATA" "${limit[@]}" --out "$OUT/$p/eval.json" >/dev/null
done
/usr/bin/python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
r = {p: json.load(open(f"{out}/{p}/eval.json")) for p in ("fp32", "bf16")}
a, b = r["fp32"]["val_loss"], r["bf16"]["val_loss"]
print(f"[bf16_check] validation loss fp32 {a:.4f}, bf16 {b:.4f}, relative difference {100 * (b - a) / a:+.2f}% "
      f"({r['fp32'].get('val_tokens', '?')} tokens)")
PY
