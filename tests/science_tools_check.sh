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

# 4. the lr phase sweeps the design and its control; the ablations flip a switch the design
#    already has on and skip a value it already has
bash scripts/science.sh --data "$tmp/p" --out "$tmp/sci" --phase lr --design sg_incl_rope_w2 \
  --bin "$bin" --dry-run > "$tmp/plan" 2>&1
for run in sg_incl_rope_w2_lr1e-3 sg_incl_rope_w2_lr4e-3 nopath_w2_lr2e-3 baseline_lr1e-3; do
  grep -q "lr/$run:" "$tmp/plan" || fail "lr plan lacks $run"
done
bash scripts/science.sh --data "$tmp/p" --out "$tmp/sci" --phase ablations --design sg_incl_rope_w2 \
  --bin "$bin" --dry-run > "$tmp/plan" 2>&1
grep -q "ablations/sg_incl_rope_w2_router_smooth_grad_false:" "$tmp/plan" || fail "smooth_grad not flipped"
grep "sg_incl_rope_w2_router_kind_word " "$tmp/plan" | grep -q -- "--set router.kind=word --set router.smooth_grad=false" \
  || fail "a rule router (word) keeps smooth_grad on, which the config refuses"
grep "sg_incl_rope_w2_router_smooth_grad_false " "$tmp/plan" | grep -q -- "--set router.smooth_grad=true .*--set router.smooth_grad=false" \
  || fail "the flipped switch does not come after the design's own setting (the last --set wins)"
bash scripts/science.sh --data "$tmp/p" --out "$tmp/sci" --phase ablations --design fixed_incl_rope_w2 \
  --bin "$bin" --dry-run > "$tmp/plan" 2>&1
grep -q "ablation router.kind=fixed: fixed_incl_rope_w2 already has it, skipped" "$tmp/plan" || fail "router.kind=fixed not skipped"
if bash scripts/science.sh --data "$tmp/p" --phase ablations --design nosuch --dry-run 2>"$tmp/err"; then
  fail "unknown design accepted by the ablations phase"; fi
grep -q "unknown design 'nosuch'" "$tmp/err" || fail "ablations, unknown design: unexpected message"

# 5. science_report --best-lr: a design's own sweep, else mean_shifted's (DLCM) or the baseline's
for r in foo_lr1e-3:5.0 foo_lr4e-3:4.9 mean_shifted_lr2e-3:4.8 mean_shifted_lr4e-3:4.85 baseline_lr1e-3:5.1 baseline_lr2e-3:5.2; do
  mkdir -p "$tmp/rep/lr/${r%%:*}"; echo "{\"val_loss\": ${r#*:}}" > "$tmp/rep/lr/${r%%:*}/eval.json"
done
mkdir -p "$tmp/rep/lr/foo_lr2e-3"  # not evaluated: ignored
for q in foo:4e-3 bar:2e-3 dlcm:2e-3 baseline:1e-3 baseline_extras:1e-3; do
  got=$($py "$src/scripts/science_report.py" --out "$tmp/rep" --best-lr "${q%%:*}") || fail "--best-lr ${q%%:*} failed"
  [ "$got" = "${q#*:}" ] || fail "--best-lr ${q%%:*}: got $got, expected ${q#*:}"
done
# 6. science_report --design: the design minus every other design, paired by seed
for r in foo_s1:4.0 foo_s2:4.2 nopath_s1:4.1 nopath_s2:4.3 nopath_s3:4.4 baseline_s1:3.9; do
  mkdir -p "$tmp/rep/main/${r%%:*}"; echo "{\"val_loss\": ${r#*:}}" > "$tmp/rep/main/${r%%:*}/eval.json"
done
$py "$src/scripts/science_report.py" --out "$tmp/rep" --design foo > "$tmp/report" || fail "--design foo failed"
grep -qF "| nopath | 2 | -0.1000 +/- 0.0000 | s1 -0.1000, s2 -0.1000 |" "$tmp/report" || fail "paired nopath row: $(cat "$tmp/report")"
grep -qF "| baseline | 1 | +0.1000 | s1 +0.1000 |" "$tmp/report" || fail "paired baseline row"
if $py "$src/scripts/science_report.py" --out "$tmp/rep" --design bar >/dev/null 2>"$tmp/err"; then fail "--design without runs succeeded"; fi
grep -q "no evaluated main-phase run of it" "$tmp/err" || fail "--design bar: unexpected message"
if $py "$src/scripts/science_report.py" --out "$tmp/nothing" --best-lr foo 2>"$tmp/err"; then fail "--best-lr without runs succeeded"; fi
grep -q "no evaluated lr-phase run for foo" "$tmp/err" || fail "--best-lr without runs: unexpected message"
# 7. the CE-by-row-position table, for the runs whose eval has it
mkdir -p "$tmp/rp/design/a" "$tmp/rp/design/b"
echo '{"val_loss": 4.0, "val_ce_by_row_position": {"from": [0, 16], "to": [16, 40], "ce": [4.5, 3.9], "tokens": [30, 70]}}' > "$tmp/rp/design/a/eval.json"
echo '{"val_loss": 4.1}' > "$tmp/rp/design/b/eval.json"
$py "$src/scripts/science_report.py" --out "$tmp/rp" > "$tmp/report" || fail "report with row positions failed"
grep -qF "| run | positions 0-16 | positions 16-40 |" "$tmp/report" || fail "row-position header: $(cat "$tmp/report")"
grep -qF "| a | 4.5000 | 3.9000 |" "$tmp/report" || fail "row-position row"
grep -q "^| b | 4" "$tmp/report" || fail "run b missing from the design table"
[ "$(grep -c '^| b |' "$tmp/report")" = 1 ] || fail "run b without row positions appears in the row-position table"
echo "science_tools_check: ok"
