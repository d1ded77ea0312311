#!/usr/bin/env bash
# The test command: set-up (idempotent) then every CTest test.
set -euo pipefail
cd "$(dirname "$0")/.."
# each phase's wall time, so a slow CI run shows where its minutes went
phase() { echo "[test] $1: $((SECONDS - t0)) s"; t0=$SECONDS; }
t0=$SECONDS
bash scripts/setup.sh
phase "set-up and build"
(cd "${BUILD_DIR:-build}" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} ctest --output-on-failure -j1 --timeout 900)
phase "CTest"
# Reliability (docs/reliability.md): the input- and file-handling tests and the kernels' op
# table under ASan + UBSan, then every fuzz harness briefly (FUZZ_SECONDS each; the long run
# is scripts/fuzz.sh --seconds N).
bash scripts/test_sanitize.sh
phase "ASan+UBSan build and tests"
bash scripts/fuzz.sh --seconds "${FUZZ_SECONDS:-20}"
phase "fuzz build and runs"
