#!/bin/bash
# scripts/portable_bundle.sh: the bundle holds the binary, its libraries (not the C/C++
# runtimes) and a launcher; the launcher runs `dlcm --version` and a tiny prepare + train +
# generate with an empty environment, every library the binary loads comes from the bundle
# except the runtimes, and the launcher sets no LD_LIBRARY_PATH for the programs dlcm starts.
# DLCM_SOURCE_DIR pointing nowhere makes `bench gemm --torch` name it; bad arguments are named.
#   portable_bundle_check.sh BUILD_DIR SOURCE_DIR WORK_DIR
set -euo pipefail
BUILD=$1 SRC=$2 WORK=$3
rm -rf "$WORK"
. "$SRC/tests/packaging/tiny_run.sh"
B="$WORK/bundle"
bash "$SRC/scripts/portable_bundle.sh" --dir "$B" --binary "$BUILD/dlcm"
for f in dlcm dlcm.bin lib/libdnnl.so.2 lib/libgomp.so.1; do
  [ -e "$B/$f" ] || { echo "not in the bundle: $f"; exit 1; }
done
for f in libc.so.6 libstdc++.so.6 libgcc_s.so.1 libm.so.6; do
  [ ! -e "$B/lib/$f" ] || { echo "a runtime in the bundle: $f"; exit 1; }
done
! grep -q LD_LIBRARY_PATH "$B/dlcm" || { echo "the launcher sets LD_LIBRARY_PATH"; exit 1; }
run() { env -i PATH=/usr/bin:/bin OMP_NUM_THREADS=2 "$@"; }
run "$B/dlcm" --version | tee "$WORK/version.txt"
grep -q "^dlcm 0\.1" "$WORK/version.txt"
# every library that is not a runtime is loaded from the bundle
run LD_DEBUG=libs "$B/dlcm" --version 2> "$WORK/ld.log" > /dev/null
grep "calling init:" "$WORK/ld.log" | awk '{print $NF}' > "$WORK/loaded.txt"
grep -q "^$B/lib/libdnnl.so.2$" "$WORK/loaded.txt" || { echo "libdnnl not from the bundle:"; cat "$WORK/loaded.txt"; exit 1; }
if grep -v "^$B/lib/" "$WORK/loaded.txt" | grep -v -E '/(ld-linux-x86-64|libc|libm|libpthread|libdl|librt|libgcc_s|libstdc\+\+)\.so' ; then
  echo "libraries above loaded from outside the bundle"; exit 1
fi
run "$B/dlcm" prepare --input "$WORK/corpus.txt" --out "$WORK/data" --tokenizer bytes --val-fraction 0.1 > "$WORK/prepare.log" 2>&1
run "$B/dlcm" train --quiet --no-final-eval --config "$WORK/cfg.json" --data "$WORK/data" --out "$WORK/run" > "$WORK/train.log" 2>&1 \
  || { cat "$WORK/train.log"; exit 1; }
run "$B/dlcm" generate --ckpt "$WORK/run" --prompt "the" --max-new-tokens 8 --temperature 0 > "$WORK/generate.log" 2>&1 \
  || { cat "$WORK/generate.log"; exit 1; }
# the PyTorch peer's script: DLCM_SOURCE_DIR is named when it points nowhere
if run DLCM_SOURCE_DIR="$WORK/nowhere" "$B/dlcm" bench gemm --torch /usr/bin/python3 --repeats 1 > "$WORK/peer.log" 2>&1; then
  echo "bench gemm ran with DLCM_SOURCE_DIR pointing nowhere"; exit 1
fi
grep -q "DLCM_SOURCE_DIR" "$WORK/peer.log" || { cat "$WORK/peer.log"; exit 1; }
grep -q "$WORK/nowhere/python/bench_torch_gemm.py" "$WORK/peer.log" || { cat "$WORK/peer.log"; exit 1; }
# bad arguments
if bash "$SRC/scripts/portable_bundle.sh" --bogus > "$WORK/bad.log" 2>&1; then echo "--bogus accepted"; exit 1; fi
grep -q "unknown argument '--bogus'" "$WORK/bad.log" || { cat "$WORK/bad.log"; exit 1; }
if bash "$SRC/scripts/portable_bundle.sh" --dir "$B" --binary "$BUILD/dlcm" > "$WORK/bad2.log" 2>&1; then
  echo "a non-empty --dir accepted"; exit 1
fi
grep -q "is not empty" "$WORK/bad2.log" || { cat "$WORK/bad2.log"; exit 1; }
echo "portable bundle check passed"
