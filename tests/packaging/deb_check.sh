#!/bin/bash
# The Debian package (docs/install.md): `cpack -G DEB` in the build folder, its Depends (from
# dpkg-shlibdeps) name oneDNN and SentencePiece, and the files extracted into a scratch root run
# `dlcm --version` and a tiny prepare + train + generate (the binary links the project's
# libraries statically: no LD_LIBRARY_PATH).
#   deb_check.sh BUILD_DIR SOURCE_DIR WORK_DIR
set -euo pipefail
BUILD=$1 SRC=$2 WORK=$3
rm -rf "$WORK"
. "$SRC/tests/packaging/tiny_run.sh"
(cd "$BUILD" && cpack -G DEB -B "$WORK/cpack" > "$WORK/cpack.log" 2>&1) || { cat "$WORK/cpack.log"; exit 1; }
deb=$(ls "$WORK"/cpack/dlcm_*.deb)
dpkg-deb -f "$deb" Package Version Depends | tee "$WORK/control.txt"
grep -q "^Package: dlcm$" "$WORK/control.txt"
grep -q "^Depends:.*libdnnl" "$WORK/control.txt" || { echo "Depends lacks libdnnl"; exit 1; }
grep -q "^Depends:.*libsentencepiece" "$WORK/control.txt" || { echo "Depends lacks libsentencepiece"; exit 1; }
dpkg-deb -x "$deb" "$WORK/root"
for f in usr/bin/dlcm usr/include/dlcm/dlcm.h usr/lib/cmake/dlcm/dlcmConfig.cmake usr/lib/pkgconfig/dlcm.pc; do
  [ -e "$WORK/root/$f" ] || { echo "not in the package: $f"; exit 1; }
done
dlcm="$WORK/root/usr/bin/dlcm"
"$dlcm" --version | tee "$WORK/version.txt"
grep -q "^dlcm 0\.1" "$WORK/version.txt"
export OMP_NUM_THREADS=2
"$dlcm" prepare --input "$WORK/corpus.txt" --out "$WORK/data" --tokenizer bytes --val-fraction 0.1 > "$WORK/prepare.log" 2>&1
"$dlcm" train --quiet --no-final-eval --config "$WORK/cfg.json" --data "$WORK/data" --out "$WORK/run" > "$WORK/train.log" 2>&1
"$dlcm" generate --ckpt "$WORK/run" --prompt "the" --max-new-tokens 8 --temperature 0 > "$WORK/generate.log" 2>&1 \
  || { cat "$WORK/generate.log"; exit 1; }
echo "deb check passed"
