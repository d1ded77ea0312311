#!/usr/bin/env bash
# The router sweep of docs/dlcm.md: short runs of configs/dlcm-small.json over the Bernoulli
# sharpening temperature alpha and the Global Parser weight lambda, each followed by a full
# validation pass (thresholded boundaries, tau = 0.5) that reports the realized compression.
# Resumable: finished runs are skipped, interrupted ones resumed.
#   bash scripts/sweep_router.sh [DATA_DIR] [STEPS] ["alpha:lambda ..."]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/prepared}
STEPS=${2:-200}
GRID=${3:-"0.5:0.03 0.25:0.03 0.1:0.03 0.1:0.1"}
B=${BUILD_DIR:-build}
OUT=runs/sweep-router
mkdir -p "$OUT"
for cell in $GRID; do
  a=${cell%%:*}; l=${cell##*:}
  run="$OUT/a${a}-l${l}-s${STEPS}"
  if [ -f "$run/eval.json" ]; then echo "[sweep] $run done"; continue; fi
  resume="--overwrite"; [ -f "$run/checkpoint/trainer_state.json" ] && resume="--resume"
  "$B/dlcm" train --config configs/dlcm-small.json --data "$DATA" --out "$run" --steps "$STEPS" \
    --set router.alpha="$a" --set aux_weight="$l" --set train.eval_every=0 $resume --quiet
  "$B/dlcm" eval --ckpt "$run" --data "$DATA" --out "$run/eval.json" >/dev/null
  echo "[sweep] $run: $(tr -d '\n ' < "$run/eval.json")"
done
# table: alpha, lambda, last logged training F (sampled) and thresholded compression, validation
/usr/bin/python3 - "$OUT" "$STEPS" <<'PY'
import json, sys, glob, os
out, steps = sys.argv[1], sys.argv[2]
print("| alpha | lambda | train compression (sampled) | train compression (tau) | val loss | val compression (tau) |")
print("|---|---|---|---|---|---|")
for run in sorted(glob.glob(f"{out}/a*-l*-s{steps}")):
    ev = os.path.join(run, "eval.json")
    if not os.path.exists(ev):
        continue
    e = json.load(open(ev))
    logs = [json.loads(l) for l in open(os.path.join(run, "train_log.jsonl")) if '"F"' in l]
    last = logs[-1]
    name = os.path.basename(run)
    a, l = name.split("-")[0][1:], name.split("-")[1][1:]
    print(f"| {a} | {l} | {last['compression']:.2f} | {last['compression_thresholded']:.2f} | "
          f"{e['val_loss']:.4f} | {e.get('val_compression', 0):.2f} |")
PY
