#!/usr/bin/env bash
# The test command: set-up (idempotent) then every CTest test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
(cd "${BUILD_DIR:-build}" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} ctest --output-on-failure -j1 --timeout 900)
# Reliability (docs/reliability.md): the input- and file-handling tests under ASan + UBSan,
# then every fuzz harness briefly (FUZZ_SECONDS each; the long run is scripts/fuzz.sh --seconds N).
bash scripts/test_sanitize.sh
bash scripts/fuzz.sh --seconds "${FUZZ_SECONDS:-20}"
