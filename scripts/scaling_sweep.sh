#!/usr/bin/env bash
# The compression-aware scaling-law sweep (issue 8, SPEC 8) as one resumable command:
# for each base size and each (P, R), `dlcm plan` proposes a dlcm config with the base
# baseline's forward FLOPs per token and backbone share P; each config is trained into its own
# run folder (finished runs are skipped, interrupted ones continue with `dlcm train --resume`);
# then `dlcm scaling fit` fits the law to every dlcm run and `dlcm scaling allocate` reports
# the best P for a few budgets. Re-running the same command picks up where it stopped.
#
#   bash scripts/scaling_sweep.sh --data data/prepared [--out runs/scaling]
#        [--bases "configs/scaling/base-xs.json configs/scaling/base-s.json"]
#        [--P "0.3 0.5 0.7"] [--R "2 4 8"] [--steps N] [--set key=value]...
#        [--budgets "1e14 1e15"] [--fit-arg ARG]... [--baseline-only] [--dry-run] [--bin build/dlcm]
#
# --baseline-only trains only the base configs and fits those (P = 0, R = 1; the concept term
# is switched off with --fix A_con=0): a check of the whole pipeline that needs no dlcm model.
# --dry-run prints what would run.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="" OUT=runs/scaling BIN=build/dlcm STEPS="" DRY=0 BASELINE_ONLY=0
BASES="configs/scaling/base-xs.json configs/scaling/base-s.json"
PS="0.3 0.5 0.7" RS="2 4 8" BUDGETS="1e14 1e15"
SETS=() FIT_ARGS=()
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --bases) BASES=$2; shift 2 ;;
    --P) PS=$2; shift 2 ;;
    --R) RS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --set) SETS+=(--set "$2"); shift 2 ;;
    --budgets) BUDGETS=$2; shift 2 ;;
    --fit-arg) FIT_ARGS+=("$2"); shift 2 ;;
    --baseline-only) BASELINE_ONLY=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --bin) BIN=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "scaling_sweep.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$DATA" ] || { echo "scaling_sweep.sh: --data DIR (a 'dlcm prepare' folder) is required" >&2; exit 2; }
[ -d "$DATA" ] || { echo "scaling_sweep.sh: --data $DATA: no such folder" >&2; exit 2; }
[ -x "$BIN" ] || { echo "scaling_sweep.sh: $BIN not built (run: bash scripts/setup.sh)" >&2; exit 2; }
for b in $BASES; do [ -f "$b" ] || { echo "scaling_sweep.sh: --bases: no such config $b" >&2; exit 2; }; done

run() { echo "+ $*"; ((DRY)) || "$@"; }

# Step reached by a run folder's checkpoint (0 when none).
ckpt_step() {
  local st="$1/checkpoint/trainer_state.json"
  [ -f "$st" ] || { echo 0; return; }
  grep -o '"step": *[0-9]*' "$st" | head -1 | grep -o '[0-9]*$'
}

# The run's target steps: --steps, else the config's train.steps.
target_steps() {
  if [ -n "$STEPS" ]; then echo "$STEPS"; return; fi
  [ -f "$1" ] || return 0  # dry run: not planned yet
  tr -d ' \n' < "$1" | grep -o '"steps":[0-9]*' | head -1 | grep -o '[0-9]*$'
}

train_run() {  # DIR CONFIG
  local dir=$1 cfg=$2 want have
  want=$(target_steps "$cfg")
  have=$(ckpt_step "$dir")
  local args=(train --config "$cfg" --data "$DATA" --out "$dir" --no-final-eval "${SETS[@]}")
  [ -n "$STEPS" ] && args+=(--steps "$STEPS")
  if [ -n "$want" ] && [ "$have" -ge "$want" ]; then
    echo "[sweep] $dir: finished ($have steps), skipped"
  elif [ "$have" -gt 0 ]; then
    echo "[sweep] $dir: resuming at step $have"
    run "$BIN" "${args[@]}" --resume
  else
    echo "[sweep] $dir: training"
    run "$BIN" "${args[@]}" --overwrite  # no checkpoint yet: nothing to keep
  fi
}

((DRY)) || mkdir -p "$OUT"
fit_runs=()
for base in $BASES; do
  size=$(basename "$base" .json)
  train_run "$OUT/${size}_baseline" "$base"
  if ((BASELINE_ONLY)); then fit_runs+=("$OUT/${size}_baseline"); continue; fi
  for P in $PS; do
    for R in $RS; do
      dir="$OUT/${size}_P${P}_R${R}"
      if [ ! -f "$dir/config.json" ]; then
        ((DRY)) || mkdir -p "$dir"
        echo "+ $BIN plan --match $base --R $R --P $P ${SETS[*]} --out $dir/config.json"
        ((DRY)) || "$BIN" plan --match "$base" --R "$R" --P "$P" "${SETS[@]}" --out "$dir/config.json" > "$dir/plan.txt"
      fi
      train_run "$dir" "$dir/config.json"
      fit_runs+=("$dir")
    done
  done
done

if ((BASELINE_ONLY)); then FIT_ARGS+=(--fix A_con=0 --fix g=0 --fix d2=1 --fix t_con=1); fi
run "$BIN" scaling fit "${fit_runs[@]}" --out "$OUT/fit" "${FIT_ARGS[@]}"
for C in $BUDGETS; do
  for R in $(if ((BASELINE_ONLY)); then echo 1; else echo $RS; fi); do
    if ((DRY)); then
      echo "+ $BIN scaling allocate --fit $OUT/fit/scaling_fit.json --flops $C --R $R"
    elif ((BASELINE_ONLY)); then
      "$BIN" scaling predict --fit "$OUT/fit/scaling_fit.json" --N 1e6 --D 1e8 --R 1 --P 0 | tee "$OUT/fit/predict_example.txt"
    else
      "$BIN" scaling allocate --fit "$OUT/fit/scaling_fit.json" --flops "$C" --R "$R" | tee "$OUT/fit/allocate_C${C}_R${R}.txt"
    fi
  done
done
echo "[sweep] done: $OUT/fit/scaling_fit.{json,md,svg}"
