#!/usr/bin/env bash
# Issue 20's experiments as one resumable command: does the concept path carry information,
# for which design, and does the DLCM still beat its controls when it must use it?
#
#   bash scripts/science.sh --data DIR [--out runs/science] [--phase lr|design|main|ablations|all]
#        [--short-steps N] [--main-steps N] [--ablation-steps N] [--seeds "1 2 3"]
#        [--train-only] [--design NAME] [--designs "A B ..."] [--lr X] [--precision fp32|bf16] [--threads T] [--dry-run] [--bin build/dlcm]
#        [--set key=value]...   (added to every run, e.g. vocab_size=260 for a bytes-tokenizer corpus)
#
# Phases (each run trains into its own folder; finished runs are skipped, interrupted ones
# resume with `dlcm train --resume`, so re-running the same command picks up where it stopped):
#   lr        3-point learning-rate sweep (1e-3, 2e-3, 4e-3) at --short-steps of the baseline,
#             mean_shifted, the chosen design and its no-path control (the main phase uses each
#             design's best; a design without a sweep takes mean_shifted's or the baseline's)
#   design    every design of SPEC 4.9 (or those of --designs) at --short-steps, each followed by a full-validation
#             `dlcm eval --concept-usage` (delta CE with concepts nulled and shuffled, |Wo att|/|H|)
#   main      the chosen design (--design) vs the baseline vs the two controls (DLCM without its
#             concept path; baseline with the DLCM's token-path extras), one run per seed, at
#             --main-steps (default 2500 x 8 x 256 = 5.1M tokens)
#   ablations section 3's ablations of the chosen design at one seed, --ablation-steps
#             (default 1250 = 2.6M tokens); a switch the design already has on is turned off
#             instead, a value it already has is skipped
# Every run ends with a full pass over the validation split (no subset), written to eval.json
# (--train-only: train now, evaluate on a later run of the same command).
# Tables: `python3 scripts/science_report.py --out DIR` (markdown, docs/science.md).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="" OUT=runs/science BIN=${BUILD_DIR:-build}/dlcm PHASE=all DRY=0 TRAIN_ONLY=0
ONLY="" SHORT=300 MAIN=2500 ABL=1250 SEEDS="1 2 3" DESIGN="first_incl_w16" LR="" PREC=bf16 THREADS=""
EXTRA_SETS=()
usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --phase) PHASE=$2; shift 2 ;;
    --short-steps) SHORT=$2; shift 2 ;;
    --main-steps) MAIN=$2; shift 2 ;;
    --ablation-steps) ABL=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --design) DESIGN=$2; shift 2 ;;
    --designs) ONLY=$2; shift 2 ;;
    --lr) LR=$2; shift 2 ;;
    --precision) PREC=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --train-only) TRAIN_ONLY=1; shift ;;
    --bin) BIN=$2; shift 2 ;;
    --set) EXTRA_SETS+=("$2"); shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "science.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$DATA" ] || { echo "science.sh: --data DIR (a 'dlcm prepare' folder) is required" >&2; exit 2; }
[ -d "$DATA" ] || { echo "science.sh: --data $DATA: no such folder" >&2; exit 2; }
[ -x "$BIN" ] || { echo "science.sh: $BIN not built (run: bash scripts/setup.sh)" >&2; exit 2; }
case "$PHASE" in lr|design|main|ablations|all) ;; *) echo "science.sh: --phase $PHASE: expected lr, design, main, ablations or all" >&2; exit 2 ;; esac

DLCM=configs/dlcm-small.json BASE=configs/baseline-small.json
# Designs: name -> "config|--set overrides" (SPEC 4.9 and the issue's controls). wN: sliding
# windows of N tokens in each encoder and decoder layer; the 2 + 2 layers together reach 4(N - 1)
# tokens back (60 for w16, 12 for w4, 4 for w2), so farther context must come through concepts.
declare -A DESIGNS=(
  [baseline]="$BASE|"
  [mean_shifted]="$DLCM|"
  [first_shifted]="$DLCM|concept_repr=first"
  [first_incl]="$DLCM|concept_repr=first concept_visibility=inclusive"
  [prefix_incl]="$DLCM|concept_repr=prefix_mean concept_visibility=inclusive"
  [mean_shifted_w16]="$DLCM|enc_window=16 dec_window=16"
  [first_incl_w16]="$DLCM|concept_repr=first concept_visibility=inclusive enc_window=16 dec_window=16"
  [nopath]="$DLCM|concept_path=false"
  [nopath_w16]="$DLCM|concept_path=false enc_window=16 dec_window=16"
  # w4 / w2: the token path reaches 12 / 4 tokens; anything farther must come through the
  # concepts. A test of whether the concept path can carry information at all when it must.
  [first_incl_w4]="$DLCM|concept_repr=first concept_visibility=inclusive enc_window=4 dec_window=4"
  [mean_shifted_w4]="$DLCM|enc_window=4 dec_window=4"
  [nopath_w4]="$DLCM|concept_path=false enc_window=4 dec_window=4"
  [first_incl_w2]="$DLCM|concept_repr=first concept_visibility=inclusive enc_window=2 dec_window=2"
  [mean_shifted_w2]="$DLCM|enc_window=2 dec_window=2"
  [nopath_w2]="$DLCM|concept_path=false enc_window=2 dec_window=2"
  # with RoPE in the concept attention (xattn_rope): the design that passes the copy-task
  # control (docs/science.md)
  [first_incl_rope_w2]="$DLCM|concept_repr=first concept_visibility=inclusive xattn_rope=true enc_window=2 dec_window=2"
  [mean_shifted_rope_w2]="$DLCM|xattn_rope=true enc_window=2 dec_window=2"
  [first_incl_rope_w4]="$DLCM|concept_repr=first concept_visibility=inclusive xattn_rope=true enc_window=4 dec_window=4"
  [first_incl_rope_w16]="$DLCM|concept_repr=first concept_visibility=inclusive xattn_rope=true enc_window=16 dec_window=16"
  # the two designs whose concepts pay off on real text with 2-token windows (docs/science.md):
  # RoPE plus boundaries every 4 tokens, or plus a router the LM loss trains (smooth_grad)
  [fixed_incl_rope_w2]="$DLCM|concept_repr=first concept_visibility=inclusive xattn_rope=true router.kind=fixed router.stride=4 enc_window=2 dec_window=2"
  [fixed_incl_rope_w4]="$DLCM|concept_repr=first concept_visibility=inclusive xattn_rope=true router.kind=fixed router.stride=4 enc_window=4 dec_window=4"
  [fixed_incl_rope_w16]="$DLCM|concept_repr=first concept_visibility=inclusive xattn_rope=true router.kind=fixed router.stride=4 enc_window=16 dec_window=16"
  [sg_incl_rope_w2]="$DLCM|concept_repr=first concept_visibility=inclusive xattn_rope=true router.smooth_grad=true enc_window=2 dec_window=2"
  [sg_incl_rope_w4]="$DLCM|concept_repr=first concept_visibility=inclusive xattn_rope=true router.smooth_grad=true enc_window=4 dec_window=4"
  [sg_incl_rope_w16]="$DLCM|concept_repr=first concept_visibility=inclusive xattn_rope=true router.smooth_grad=true enc_window=16 dec_window=16"
  [mean_shifted_rope]="$DLCM|xattn_rope=true"
  # The baseline with the DLCM's token-path extras (encoder.norm + cross FFN): the main phase's
  # control for "a DLCM beats the baseline only through its extra token-path parameters".
  [baseline_extras]="$BASE|baseline_extras=true"
)
DESIGN_ORDER="baseline mean_shifted first_shifted first_incl prefix_incl mean_shifted_w16 first_incl_w16 nopath nopath_w16 first_incl_w4 mean_shifted_w4 nopath_w4 first_incl_w2 mean_shifted_w2 nopath_w2 first_incl_rope_w2 mean_shifted_rope_w2 first_incl_rope_w4 first_incl_rope_w16 mean_shifted_rope fixed_incl_rope_w2 fixed_incl_rope_w4 fixed_incl_rope_w16 sg_incl_rope_w2 sg_incl_rope_w4 sg_incl_rope_w16"

[ -n "${DESIGNS[$DESIGN]:-}" ] || { echo "science.sh: unknown design '$DESIGN' (known: $DESIGN_ORDER baseline_extras)" >&2; exit 2; }

run() { echo "+ $*"; ((DRY)) || "$@"; }

ckpt_step() {
  local st="$1/checkpoint/trainer_state.json"
  [ -f "$st" ] || { echo 0; return; }
  grep -o '"step": *[0-9]*' "$st" | head -1 | grep -o '[0-9]*$'
}

# train_eval DIR STEPS NAME [extra --set k=v ...]: train (or resume), then a full-validation eval.
train_eval() {
  local dir=$1 steps=$2 name=$3; shift 3
  local spec=${DESIGNS[$name]:-}
  [ -n "$spec" ] || { echo "science.sh: unknown design '$name' (known: $DESIGN_ORDER baseline_extras)" >&2; exit 2; }
  local cfg=${spec%%|*} sets=() kv
  for kv in ${spec#*|} "$@" "${EXTRA_SETS[@]}"; do sets+=(--set "$kv"); done
  sets+=(--set "train.precision=$PREC" --set train.eval_every=0 --set "train.ckpt_every=250")
  [ -n "$THREADS" ] && sets+=(--set "train.threads=$THREADS")
  local have; have=$(ckpt_step "$dir")
  if [ -f "$dir/eval.json" ]; then
    echo "[science] $dir: done"
    return
  fi
  local args=(train --config "$cfg" --data "$DATA" --out "$dir" --steps "$steps" --no-final-eval "${sets[@]}" --quiet)
  if [ "$have" -ge "$steps" ]; then :
  elif [ "$have" -gt 0 ]; then echo "[science] $dir: resuming at step $have"; run "$BIN" "${args[@]}" --resume
  else echo "[science] $dir: training $steps steps"; run "$BIN" "${args[@]}" --overwrite  # no checkpoint yet: start afresh
  fi
  ((TRAIN_ONLY)) && return
  local ev=(eval --ckpt "$dir" --data "$DATA" --out "$dir/eval.json")
  [[ "$cfg" == "$DLCM" ]] && ev+=(--concept-usage)
  run "$BIN" "${ev[@]}"
}

lr_of() {  # the learning rate the lr phase chose for a design (or --lr); designs without
  # their own sweep take mean_shifted's (DLCM) or the baseline's, as science_report.py says
  if [ -n "$LR" ]; then echo "$LR"; return; fi
  ((DRY)) && [ ! -d "$OUT/lr" ] && { echo 2e-3; return; }
  /usr/bin/python3 scripts/science_report.py --out "$OUT" --best-lr "$1" 2>/dev/null || echo 2e-3
}
# the no-path control with the design's own token windows (w16, w4, w2 or none)
control=nopath; [[ $DESIGN =~ _(w[0-9]+)$ ]] && control="nopath_${BASH_REMATCH[1]}"

((DRY)) || mkdir -p "$OUT"
if [[ $PHASE == lr || $PHASE == all ]]; then
  for name in baseline mean_shifted "$DESIGN" "$control"; do
    for lr in 1e-3 2e-3 4e-3; do train_eval "$OUT/lr/${name}_lr$lr" "$SHORT" "$name" "train.lr=$lr"; done
  done
fi
if [[ $PHASE == design || $PHASE == all ]]; then
  for name in ${ONLY:-$DESIGN_ORDER}; do train_eval "$OUT/design/$name" "$SHORT" "$name"; done
fi
if [[ $PHASE == main || $PHASE == all ]]; then
  for seed in $SEEDS; do
    for name in "$DESIGN" baseline "$control" baseline_extras; do
      lrname=$name; [[ $name == baseline_extras ]] && lrname=baseline  # the same architecture
      train_eval "$OUT/main/${name}_s$seed" "$MAIN" "$name" "train.seed=$seed" "train.lr=$(lr_of $lrname)"
    done
  done
fi
if [[ $PHASE == ablations || $PHASE == all ]]; then
  spec=" ${DESIGNS[$DESIGN]#*|} "
  for abl in "router.kind=fixed" "router.kind=word" "aux_kind=sequence" "router.kind=raw" \
             "smoother=false" "router.smooth_grad=true"; do
    # a design that already has the setting: flip a switch that is on, skip any other value
    if [[ $spec == *" $abl "* ]]; then
      if [[ $abl == *=true ]]; then abl=${abl%=true}=false
      else echo "[science] ablation $abl: $DESIGN already has it, skipped"; continue; fi
    fi
    tag=$(echo "$abl" | tr '=.' '__')
    extra=()  # a rule router has nothing for the LM loss to train: smooth_grad goes with it
    [[ $abl == router.kind=fixed || $abl == router.kind=word ]] && [[ $spec == *" router.smooth_grad=true "* ]] \
      && extra=(router.smooth_grad=false)
    train_eval "$OUT/ablations/${DESIGN}_$tag" "$ABL" "$DESIGN" "$abl" "${extra[@]}"
  done
fi
echo "[science] done: /usr/bin/python3 scripts/science_report.py --out $OUT"
