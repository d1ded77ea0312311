#!/usr/bin/env bash
# A dlcm that runs on another x86-64 Linux machine without this project's Debian packages: the
# stripped binary, the shared libraries it loads (all but the C and C++ runtimes, which a newer
# distribution provides compatibly), and a launcher that starts it through the system's loader
# with the bundle's libraries. Made to measure issue 19 on CPUs these hosts do not have (the
# Emerald Rapids host of a GPU machine, docs/performance.md, session 26).
#
#   bash scripts/portable_bundle.sh --dir DIR          # the bundle as a folder
#   bash scripts/portable_bundle.sh --out FILE.tar.xz  # the same, packed (xz -9, ~28 MB)
#   options: --binary PATH (default build/dlcm)
#
# On the other machine: DIR/dlcm ARGS... The loader's --library-path reaches dlcm alone, so the
# programs it starts (the PyTorch peer of `dlcm bench train --torch`) keep their own libraries.
# `bench train/gemm --torch` read the peer's script from python/ of the checkout dlcm was built
# from; elsewhere, set DLCM_SOURCE_DIR to a copy of the checkout.
set -euo pipefail

out="" dir="" binary="build/dlcm"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a file name}"; shift 2 ;;
    --dir) dir="${2:?--dir needs a folder}"; shift 2 ;;
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "portable_bundle.sh: unknown argument '$1' (expected --dir DIR or --out FILE.tar.xz, --binary PATH)" >&2; exit 2 ;;
  esac
done
if [ -z "$out" ] && [ -z "$dir" ]; then
  echo "portable_bundle.sh: give --dir DIR or --out FILE.tar.xz" >&2
  exit 2
fi
if [ ! -x "$binary" ]; then
  echo "portable_bundle.sh: $binary is not an executable (build first: cmake --build build)" >&2
  exit 1
fi

work="$dir"
if [ -z "$work" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
if [ -e "$work" ] && [ -n "$(ls -A "$work" 2>/dev/null)" ]; then
  echo "portable_bundle.sh: $work exists and is not empty" >&2
  exit 1
fi
mkdir -p "$work/lib"

# The runtimes every target has (and must use its own of): the loader, glibc's parts, libgcc_s,
# libstdc++.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread\.so|libdl\.so|librt\.so|libgcc_s\.so|libstdc\+\+\.so)'
n=0
while read -r name _ path _; do
  [ -n "${path:-}" ] && [ -f "$path" ] || continue
  if [[ "$name" =~ $skip ]]; then continue; fi
  cp -L "$path" "$work/lib/$name"
  n=$((n + 1))
done < <(ldd "$binary" | grep '=>')
if ldd "$binary" | grep -q 'not found'; then
  echo "portable_bundle.sh: $binary has libraries ldd cannot find:" >&2
  ldd "$binary" | grep 'not found' >&2
  exit 1
fi

cp "$binary" "$work/dlcm.bin"
strip "$work/dlcm.bin" 2>/dev/null || true
cat > "$work/dlcm" <<'EOF'
#!/bin/sh
# dlcm with the libraries beside it (scripts/portable_bundle.sh)
here=$(cd "$(dirname "$0")" && pwd)
exec /lib64/ld-linux-x86-64.so.2 --library-path "$here/lib" "$here/dlcm.bin" "$@"
EOF
chmod +x "$work/dlcm"
echo "portable_bundle.sh: $binary and $n libraries in $work" >&2

if [ -n "$out" ]; then
  tar -C "$work" -cf - . | xz -9 -T0 > "$out"
  echo "portable_bundle.sh: packed into $out ($(du -h "$out" | cut -f1)); unpack with tar -xJf and run ./dlcm" >&2
fi
