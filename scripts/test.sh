#!/usr/bin/env bash
# The test command: set-up (idempotent) then every CTest test, the ASan+UBSan subset and a short
# fuzzing run.
set -euo pipefail
cd "$(dirname "$0")/.."
# each phase's wall time, so a slow CI run shows where its minutes went
phase() { echo "[test] $1: $((SECONDS - t0)) s"; t0=$SECONDS; }
t0=$SECONDS
bash scripts/setup.sh
phase "set-up and build"
# The ASan+UBSan build and the fuzz harnesses compile while CTest runs, at the lowest priority:
# CTest keeps about one of two cores busy (user + system time 110% of its wall time on the 2-vCPU
# Intel host, session 52), so the builds take the idle core and yield it whenever a test wants
# it. Their own session, so that a failing CTest stops them too (kill of the process group);
# a new session is a new scheduler autogroup, among which Linux shares the CPU equally whatever
# a process's nice value, so the group's own niceness is set too (without it CTest ran 2x
# slower beside the builds).
BUILD=${BUILD_DIR:-build}
bg_log="$BUILD/background-builds.log"
setsid nice -n 19 bash -c '{ echo 19 > /proc/self/autogroup; } 2>/dev/null || true
  bash scripts/test_sanitize.sh --build-only && bash scripts/fuzz.sh --build-only' \
  > "$bg_log" 2>&1 &
bg=$!
trap 'kill -- -"$bg" 2>/dev/null || true' EXIT
(cd "$BUILD" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} ctest --output-on-failure -j1 --timeout 900)
phase "CTest (the ASan and fuzz builds beside it)"
wait "$bg" || { tail -60 "$bg_log"; echo "test.sh: the ASan or fuzz build failed ($bg_log)" >&2; exit 1; }
trap - EXIT
phase "rest of the ASan and fuzz builds"
# Reliability (docs/reliability.md): the input- and file-handling tests and the kernels' op
# table under ASan + UBSan, then every fuzz harness briefly (FUZZ_SECONDS each; the long run
# is scripts/fuzz.sh --seconds N). Both scripts find their builds up to date.
bash scripts/test_sanitize.sh
phase "ASan+UBSan tests"
bash scripts/fuzz.sh --seconds "${FUZZ_SECONDS:-20}"
phase "fuzz runs"
