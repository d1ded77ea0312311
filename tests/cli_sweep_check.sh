#!/bin/sh
# scripts/cli_sweep.py on a DLCM trained two steps on a small byte-level corpus: every option of
# every subcommand with each odd value, no run killed by a signal, no sanitizer report, no
# `internal:` check (docs/reliability.md). usage: cli_sweep_check.sh DLCM SRC
set -eu
bin=$1 src=$2 py=/usr/bin/python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$py - "$tmp/corpus.txt" <<'PY'
import random, sys
r = random.Random(5)
words = ["a", "sweep", "of", "every", "flag", "finds", "what", "the", "tests", "miss"]
with open(sys.argv[1], "w") as f:
    for d in range(300):
        f.write(" ".join(r.choice(words) for _ in range(14)) + ".\n\f")
PY
"$bin" prepare --input "$tmp/corpus.txt" --out "$tmp/data" --tokenizer bytes >/dev/null 2>&1
"$bin" config --config "$src/configs/dlcm-small.json" --set vocab_size=260 --set train.seq_len=64 \
  --set train.batch_size=2 --set train.eval_every=0 --set train.eval_batches=1 > "$tmp/dlcm.json"
"$bin" train --config "$tmp/dlcm.json" --data "$tmp/data" --out "$tmp/run" --steps 2 \
  --no-final-eval --quiet >/dev/null 2>&1
cd "$tmp"
$py "$src/scripts/cli_sweep.py" --dlcm "$bin" --ckpt "$tmp/run" --data "$tmp/data" \
  --config "$tmp/dlcm.json" --timeout 60
