#!/usr/bin/env bash
# Data-parallel scaling from 1 to 2 ranks on this machine, same global batch everywhere
# (2k micro-batches of the config's batch_size per step):
#   1x1   one process, 1 thread,           grad_accum 2k   (the per-rank peer)
#   1x2   one process, 2 threads,          grad_accum 2k   (the same cores used by threads)
#   2x1   mpirun -np 2, 1 thread per rank, grad_accum k    (all-reduce overlapped with backward)
#   2x1b  as 2x1 with the all-reduce after backward (allreduce_overlap=false)
# Each round runs every layout once (interleaved, so load drift hits all alike); the figure of a
# layout is its median over rounds. Synthetic tokens (`dlcm bench train`): the cost of a step
# does not depend on token values.
#
# usage: bash scripts/bench_mpi.sh [--config FILE] [--k K] [--rounds N] [--steps N] [--set key=value]...
set -euo pipefail
cd "$(dirname "$0")/.."
DLCM=${DLCM:-build/dlcm}
CONFIG=configs/baseline-small.json
K=1
ROUNDS=3
STEPS=3
SETS=()
while (($#)); do
  case "$1" in
    --config) CONFIG=$2; shift 2 ;;
    --k) K=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --set) SETS+=(--set "$2"); shift 2 ;;
    *) echo "bench_mpi.sh: unknown argument '$1' (see the usage line at the top of the script)" >&2; exit 2 ;;
  esac
done
command -v mpirun >/dev/null || { echo "bench_mpi.sh: mpirun not found (apt-get install openmpi-bin)" >&2; exit 2; }
[ -x "$DLCM" ] || { echo "bench_mpi.sh: $DLCM not built (bash scripts/setup.sh)" >&2; exit 2; }
MPIRUN=(mpirun --oversubscribe)
[ "$(id -u)" -eq 0 ] && MPIRUN+=(--allow-run-as-root)
K2=$((2 * K))
BENCH=(bench train --no-torch --R 0 --config "$CONFIG" --steps "$STEPS" --repeats 1 "${SETS[@]}")

run() {  # layout -> tokens/s and all-reduce share on stdout
  local out
  case "$1" in
    1x1) out=$(OMP_NUM_THREADS=1 "$DLCM" "${BENCH[@]}" --set grad_accum=$K2) ;;
    1x2) out=$(OMP_NUM_THREADS=2 "$DLCM" "${BENCH[@]}" --set grad_accum=$K2) ;;
    2x1) out=$(env -u OMP_NUM_THREADS "${MPIRUN[@]}" -np 2 "$DLCM" "${BENCH[@]}" --set grad_accum=$K) ;;
    2x1b) out=$(env -u OMP_NUM_THREADS "${MPIRUN[@]}" -np 2 "$DLCM" "${BENCH[@]}" --set grad_accum=$K --set allreduce_overlap=false) ;;
  esac
  local tps cpu share tpc
  # the table row "  dlcm engine fp32  <wall tok/s> <MFU>% ... | <tok/CPU-second>"
  tps=$(awk '$1 == "dlcm" && $2 == "engine" {print $4; exit}' <<<"$out")
  tpc=$(awk '$1 == "dlcm" && $2 == "engine" {print $NF; exit}' <<<"$out")
  cpu=$(awk -v t="$tpc" 'BEGIN { if (t > 0) printf "%.3f", 1000 / t }')
  share=$(sed -n 's/^gradient all-reduce: \([0-9.]*\)%.*/\1/p' <<<"$out")
  [ -n "$tps" ] && [ -n "$cpu" ] || { echo "bench_mpi.sh: layout $1 failed:" >&2; echo "$out" >&2; exit 1; }
  echo "$tps $cpu ${share:--}"
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "config $CONFIG ${SETS[*]}, global batch $K2 micro-batches, $STEPS timed steps per run, $ROUNDS rounds"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
declare -A TPS CPU SHARE
LAYOUTS=(1x1 1x2 2x1 2x1b)
for ((r = 1; r <= ROUNDS; r++)); do
  for l in "${LAYOUTS[@]}"; do
    read -r t c s < <(run "$l")
    TPS[$l]+="$t "
    CPU[$l]+="$c "
    SHARE[$l]+="$s "
    w=""; [ "$s" != - ] && w=", all-reduce wait $s% of the step"
    echo "round $r $l: $t tokens/s, $c CPU-s per 1k tokens$w"
  done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A M C
printf '\n%-6s %10s %18s %16s\n' layout tokens/s CPU-s/1k_tokens all-reduce_wait
for l in "${LAYOUTS[@]}"; do
  M[$l]=$(tr ' ' '\n' <<<"${TPS[$l]}" | grep . | median)
  C[$l]=$(tr ' ' '\n' <<<"${CPU[$l]}" | grep . | median)
  w=$(tr ' ' '\n' <<<"${SHARE[$l]}" | grep -v -- - | grep . | median || true)
  printf '%-6s %10.0f %18.3f %16s\n' "$l" "${M[$l]}" "${C[$l]}" "${w:+$w%}"
done
awk -v a="${M[1x1]}" -v b="${M[1x2]}" -v c="${M[2x1]}" -v d="${M[2x1b]}" \
    -v ca="${C[1x1]}" -v cb="${C[1x2]}" -v cc="${C[2x1]}" -v cd="${C[2x1b]}" 'BEGIN {
  printf "\nscaling 1 -> 2 ranks (1 thread each), wall clock: %.2fx, efficiency %.0f%%  (2x1 / (2 * 1x1))\n", c / a, 50 * c / a
  printf "scaling 1 -> 2 ranks, CPU time per token: efficiency %.0f%%  (1x1 / 2x1)\n", 100 * ca / cc
  printf "2 ranks x 1 thread vs 1 process x 2 threads: wall %.2f, CPU efficiency %.2f  (2x1 / 1x2, 1x2 / 2x1)\n", c / b, cb / cc
  printf "overlapped vs after-backward all-reduce: wall %.2f, CPU %.2f  (2x1 / 2x1b, 2x1b / 2x1)\n", c / d, cd / cc }'
