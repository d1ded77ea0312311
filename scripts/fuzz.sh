#!/usr/bin/env bash
# Builds the libFuzzer harnesses of fuzz/ (clang, AddressSanitizer + UBSan) in build-fuzz/ and
# runs each one for N seconds on its seed corpus (fuzz/corpus/<name>/, read only; new inputs go
# to build-fuzz/corpus/<name>/).
#   scripts/fuzz.sh                 20 s per harness, FUZZ_PAR (default nproc) harnesses at a time
#   scripts/fuzz.sh --seconds 3600  the long run (docs/reliability.md)
#   scripts/fuzz.sh --only config   one harness
#   scripts/fuzz.sh --build-only    build the harnesses, run none
# Exits non-zero on the first finding; the input that triggered it is left in
# build-fuzz/crash-<name>-*; turn it into a regression test in tests/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=20
only=""
build_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --build-only) build_only=1; shift ;;
    *) echo "usage: scripts/fuzz.sh [--seconds N] [--only NAME] [--build-only]" >&2; exit 2 ;;
  esac
done
CXX_FUZZ=${CXX_FUZZ:-$(command -v clang++ || command -v clang++-14 || true)}
if [[ -z "$CXX_FUZZ" ]]; then
  echo "fuzz.sh: clang++ not found (apt-get install clang); fuzzing skipped" >&2
  exit 0
fi
B=${FUZZ_BUILD_DIR:-build-fuzz}
mkdir -p "$B"
cmake -S fuzz -B "$B" -DCMAKE_CXX_COMPILER="$CXX_FUZZ" -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$B/configure.log" 2>&1 ||
  { cat "$B/configure.log"; exit 1; }
cmake --build "$B" -j"${FUZZ_JOBS:-2}" > "$B/build.log" 2>&1 || { tail -50 "$B/build.log"; exit 1; }
((build_only)) && { echo "fuzz.sh: harnesses built in $B"; exit 0; }
names="safetensors config tokenizer_meta shard data_meta tasks trainer_state hf_config train_log"
[[ -n "$only" ]] && names="$only"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# The harnesses are single-threaded: run FUZZ_PAR of them at a time (default: one per core), each
# for the full N seconds, so a 2-core machine fuzzes as much in half the wall time.
par=${FUZZ_PAR:-$(nproc)}
declare -A started=()
finish() {  # wait for one harness; stop at its finding
  local pid n rc=0
  wait -n -p pid || rc=$?
  n=${started[$pid]}; unset "started[$pid]"
  if ((rc != 0)); then
    tail -60 "$B/fuzz_$n.log"
    echo "fuzz.sh: fuzz_$n found a problem; input saved as $B/crash-$n-*" >&2
    ((${#started[@]})) && kill "${!started[@]}" 2>/dev/null
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$B/fuzz_$n.log" | grep -o '[0-9]*$' || echo "?")
  echo "fuzz_$n: $runs inputs in $seconds s, no finding"
}
for n in $names; do
  mkdir -p "$B/corpus/$n"
  ((${#started[@]} >= par)) && finish
  # -rss_limit_mb: a parser that allocates from a size field it did not bound is a finding.
  "$B/fuzz_$n" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$B/crash-$n-" "$B/corpus/$n" "fuzz/corpus/$n" \
    > "$B/fuzz_$n.log" 2>&1 &
  started[$!]=$n
done
while ((${#started[@]})); do finish; done
