#!/bin/sh
# Portable build (kernels/isa.h): outside the avx2 and avx512 kernel variants, no function of
# the given binaries may contain an AVX instruction (VEX/EVEX-encoded: mnemonics v*, ymm/zmm or
# mask registers), or the binary would die with an illegal instruction on a CPU without AVX.
# Catches an out-of-line copy of an inline function compiled for AVX-512 that the linker kept for
# every caller (the ODR hazard of compiling one source several times with different targets).
# Needs the full symbol table: in a stripped file (the wheel's module, an installed binary) the
# local functions' code is attributed to the exported symbol before it.
# Allowed besides the variants: gemm.cpp's target-attribute row converters, called only when
# ops::isa() is avx512 (convert_row_avx512bf16 also needs the CPU's AVX512-BF16).
# Usage: isa_baseline_check.sh BINARY...
set -eu
status=0
for bin in "$@"; do
  if [ -z "$(nm "$bin" 2>/dev/null | head -1)" ]; then
    echo "$bin: no symbol table (stripped?): check the build tree's unstripped file"
    status=1
    continue
  fi
  bad=$(objdump -d --no-show-raw-insn -C "$bin" | awk '
    /^[0-9a-f]+ <.*>:$/ { fn = $0; next }
    /^ +[0-9a-f]+:\t/ {
      split($0, part, "\t"); insn = part[2]
      if (insn ~ /^v[a-z]/ || insn ~ /%[yz]mm[0-9]/ || insn ~ /%k[0-7]/) {
        if (fn ~ /isa_avx2::|isa_avx512::|convert_row_avx512bf16|round_row_f32_avx512|widen_row_avx512/) inside++
        else n[fn]++
      }
    }
    END {
      for (g in n) print n[g] " AVX instructions in " g
      # the pattern itself works: the avx512 variant is there and matched
      if (inside == 0) print "no AVX instruction inside the kernel variants either (not a portable build?)"
    }')
  if [ -n "$bad" ]; then
    echo "$bin: AVX code outside the dispatched kernel variants:"
    echo "$bad" | sort -rn | head -40
    status=1
  else
    echo "$bin: no AVX code outside the avx2/avx512 kernel variants"
  fi
done
exit $status
