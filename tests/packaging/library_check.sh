#!/bin/bash
# The installed tree as a consumer meets it (docs/library.md): `cmake --install` into a
# build-local prefix, examples/library configured and built as its own CMake project with
# find_package(dlcm), then run: it trains a tiny DLCM through the API and uses it; and the
# same program built with pkg-config (dlcm.pc).
#   library_check.sh BUILD_DIR SOURCE_DIR WORK_DIR
set -euo pipefail
BUILD=$1 SRC=$2 WORK=$3
rm -rf "$WORK"
. "$SRC/tests/packaging/tiny_run.sh"
cmake --install "$BUILD" --prefix "$WORK/prefix" > "$WORK/install.log"
for f in bin/dlcm include/dlcm/dlcm.h lib/cmake/dlcm/dlcmConfig.cmake \
         lib/cmake/dlcm/dlcmConfigVersion.cmake lib/pkgconfig/dlcm.pc lib/libdlcm_core.a; do
  [ -e "$WORK/prefix/$f" ] || { echo "not installed: $f"; exit 1; }
done
[ ! -e "$WORK/prefix/dlcm" ] || { echo "the python component was installed by a plain install"; exit 1; }
"$WORK/prefix/bin/dlcm" prepare --input "$WORK/corpus.txt" --out "$WORK/data" --tokenizer bytes \
  --val-fraction 0.1 > "$WORK/prepare.log" 2>&1
launcher=()
command -v ccache > /dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$SRC/examples/library" -B "$WORK/example" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$WORK/prefix" "${launcher[@]}" > "$WORK/configure.log"
cmake --build "$WORK/example" -j2 > "$WORK/build.log"
OMP_NUM_THREADS=2 "$WORK/example/dlcm_example" "$WORK/cfg.json" "$WORK/data" "$WORK/run" | tee "$WORK/example.log"
grep -q "^trained to step 6 ([1-9][0-9]* log records)" "$WORK/example.log"
grep -q "^dlcm model, 18 tokens: 'the concept model'" "$WORK/example.log"
grep -q "^logits: 4680 = 18 x 260" "$WORK/example.log"
grep -q "^concepts: [1-9]" "$WORK/example.log"
grep -q "^generated [0-9]* bytes in [1-9]" "$WORK/example.log"
# The same program built with pkg-config (lib/pkgconfig/dlcm.pc finds its prefix itself).
PKG_CONFIG_PATH="$WORK/prefix/lib/pkgconfig" pkg-config --cflags --libs dlcm > "$WORK/pc_flags.txt"
${CXX:-c++} -O1 "$SRC/examples/library/main.cpp" -o "$WORK/pc_example" $(cat "$WORK/pc_flags.txt")
OMP_NUM_THREADS=2 "$WORK/pc_example" "$WORK/cfg.json" "$WORK/data" "$WORK/pc_run" > "$WORK/pc_example.log"
grep -q "^logits: 4680 = 18 x 260" "$WORK/pc_example.log"
echo "library check passed"
