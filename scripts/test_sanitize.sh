#!/usr/bin/env bash
# The tests that read external input or manage files, built with gcc under AddressSanitizer +
# UBSan (build-asan/) and run: safetensors/config/checkpoint I/O (test_io), data preparation,
# shards and tokenizers (test_data), run folders, non-finite guard and fault tests
# (test_reliability), benchmark files (test_eval's task readers), the GGUF writer and export
# (test_gguf, without the llama.cpp runs), the HTTP server's request handling (test_serve: hostile
# requests, every field with every kind of value, API key, disconnects, full queue, timeouts),
# the inference streams' caches and slots (test_stream, test_dlcm_stream: every design, a slot's
# length and reset, prefix rows, the concept lists; the server indexes them from requests), the
# generation loop that fills a stream's slots from a list of prompts (test_generate), and
# the kernels (test_ops: the op table at every kernel level, where the guards after outputs see
# only writes past them, not reads past an input or a scratch buffer's overflow).
# Only these targets are built (the library is compiled once, -O0). scripts/test.sh builds them
# (--build-only) while the main suite runs and runs them after it.
set -euo pipefail
cd "$(dirname "$0")/.."
build_only=0
case "${1:-}" in
  --build-only) build_only=1 ;;
  "") ;;
  *) echo "usage: scripts/test_sanitize.sh [--build-only]" >&2; exit 2 ;;
esac
B=${ASAN_BUILD_DIR:-build-asan}
targets=(test_io test_data test_reliability test_eval test_gguf test_serve test_stream
         test_dlcm_stream test_generate test_ops)
[[ -f tests/test_config.cpp ]] && targets+=(test_config)
launcher=()
command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
# -O0 -g1, with Ninja where it is installed: this build is CI's longest phase, and the runs take
# seconds. Build times measured one after another (2 vCPUs, Intel model 167, no ccache):
# -O1 -g1 make 6m37s, -O0 -g1 make 4m26s, -O0 -g1 Ninja 3m25s; the runs 22 s -> 33 s. -O0 hides
# nothing from the sanitizers (ASan checks every access the code makes at -O0); -g1 keeps the
# line tables and function names a report prints; Ninja compiles a target's objects before the
# libraries it links are built, so both cores stay busy to the end.
gen=()
[[ ! -f "$B/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
cmake "${gen[@]}" -S . -B "$B" -DCMAKE_BUILD_TYPE=Sanitize "${launcher[@]}" \
  -DCMAKE_CXX_FLAGS_SANITIZE="-O0 -g1 $san" \
  -DCMAKE_EXE_LINKER_FLAGS_SANITIZE="-fsanitize=address,undefined" > /dev/null
cmake --build "$B" -j"${JOBS:-$(nproc)}" --target dlcm "${targets[@]}"
((build_only)) && exit 0
# oneDNN and OpenMP keep per-process caches until exit: not leaks of ours.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# test_eval: the task readers only (its model-scoring tests add nothing under sanitizers);
# test_gguf: not the llama.cpp runs (node and llama.cpp are not ours to sanitize); test_ops:
# everything, but the op table without its finite differences (DLCM_OPS_TABLE_FD=0: they check
# the double reference, test code, and at -O0 would double the run, about 2.5 min without them).
filter_for() {
  case "$1" in
    test_eval) echo "--gtest_filter=EvalTasks.*" ;;
    test_gguf) echo "--gtest_filter=Gguf.*:GgufExport.*" ;;
    test_serve) echo "--gtest_filter=*.EchoLogprobs*:Serve.Hostile*:Serve.EveryField*:Serve.ApiKey*:Serve.AClientThatHangs*:Serve.AFullQueue*:Serve.ARequestPastTheTimeout*:Serve.ModelsHealth*" ;;
    *) echo "" ;;
  esac
}
for t in "${targets[@]}"; do
  echo "[sanitize] $t"
  DLCM_OPS_TABLE_FD=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$B/$t" --gtest_brief=1 \
    $(filter_for "$t")
done
