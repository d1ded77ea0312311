#!/bin/sh
# The issue-20 research scripts: the copy-task corpus generator, the copy probe on a checkpoint
# trained on it, and scripts/science.sh's plan (its --dry-run). usage: science_tools_check.sh DLCM SRC
set -eu
bin=$1 src=$2 py=/usr/bin/python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "science_tools_check: $*" >&2; exit 1; }

# 1. corpus: every line is WORD " .... " WORD with WORD from a 16-word list; deterministic
$py "$src/scripts/make_copy_corpus.py" --out "$tmp/c.txt" --docs 80 --lines 6 --vocab 16 --gap 4 --seed 3
$py "$src/scripts/make_copy_corpus.py" --out "$tmp/c2.txt" --docs 80 --lines 6 --vocab 16 --gap 4 --seed 3
cmp -s "$tmp/c.txt" "$tmp/c2.txt" || fail "make_copy_corpus.py is not deterministic"
$py - "$tmp/c.txt" <<'PY' || fail "copy corpus lines are not WORD ' .... ' WORD from 16 words"
import re, sys
lines = [l for l in open(sys.argv[1]).read().split("\n") if l]
words = set()
for l in lines:
    m = re.fullmatch(r"([a-z]{8}) \.{4} ([a-z]{8})", l)
    assert m and m.group(1) == m.group(2), l
    words.add(m.group(1))
assert len(lines) == 480 and len(words) <= 16, (len(lines), len(words))
PY
if $py "$src/scripts/make_copy_corpus.py" --out "$tmp/x.txt" --gap -1 2>/dev/null; then fail "--gap -1 accepted"; fi

# 2. the probe on a DLCM trained two steps on it (windows of 2: the token path reaches 4 tokens)
"$bin" prepare --input "$tmp/c.txt" --out "$tmp/p" --tokenizer bytes --val-fraction 0.2 >/dev/null 2>&1
"$bin" train --config "$src/configs/dlcm-small.json" --data "$tmp/p" --out "$tmp/run" --steps 2 \
  --set vocab_size=260 --set train.seq_len=64 --set train.batch_size=2 --set enc_window=2 \
  --set dec_window=2 --set train.eval_every=0 --no-final-eval --quiet >/dev/null 2>&1
$py "$src/scripts/copy_probe.py" --ckpt "$tmp/run" --data "$tmp/p" --width 8 --gap 4 --rows 2 \
  --json "$tmp/probe.json" >/dev/null
$py - "$tmp/probe.json" <<'PY' || fail "copy_probe.py report incomplete"
import json, math, sys
r = json.load(open(sys.argv[1]))
n = r["count_by_role"]
assert n["second_copy"] > 0 and n["first_letter"] > 0, n
assert all(math.isfinite(v) for v in r["ce_by_role"].values()), r["ce_by_role"]
assert r["compression"] >= 1 and len(r["boundary_rate_by_line_position"]) == 8 + 4 + 2 + 8
heads = r["copy_query_attention_by_head"]["z_null"]
assert len(heads) == 4 and all(0 <= v <= 1 for v in heads), heads
PY
# a layout that does not match the corpus is refused with the flags named
if $py "$src/scripts/copy_probe.py" --ckpt "$tmp/run" --data "$tmp/p" --width 8 --gap 3 --rows 2 \
     >/dev/null 2>"$tmp/err"; then fail "a wrong --gap was accepted"; fi
grep -q -- "--gap 3 do not match" "$tmp/err" || fail "wrong --gap: unexpected message: $(cat "$tmp/err")"

# 3. science.sh plans the main phase with the chosen design's own no-path control
cd "$src"
bash scripts/science.sh --data "$tmp/p" --out "$tmp/sci" --phase main --design first_incl_w2 --seeds 1 \
  --bin "$bin" --dry-run > "$tmp/plan" 2>&1
for run in first_incl_w2_s1 baseline_s1 nopath_w2_s1 baseline_extras_s1; do
  grep -q "training 2500 steps" "$tmp/plan" && grep -q "main/$run:" "$tmp/plan" || fail "plan lacks $run"
done
grep -q "enc_window=2 --set dec_window=2 --set train.seed=1" "$tmp/plan" || fail "nopath_w2 lacks its windows"
if bash scripts/science.sh --data "$tmp/p" --out "$tmp/sci" --phase main --design nosuch --dry-run \
     2>"$tmp/err"; then fail "unknown design accepted"; fi
grep -q "unknown design 'nosuch'" "$tmp/err" || fail "unknown design: unexpected message"
test ! -e "$tmp/sci/main" || fail "--dry-run created run folders"
echo "science_tools_check: ok"
