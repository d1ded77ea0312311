// Included by each kernel source compiled once per instruction-set level (CMakeLists.txt:
// DLCM_ISA_SOURCES), after all its other includes and before its code. Sets the level's code
// generation and names the namespace its functions go into, so that the variants of one
// function never share a symbol:
//   DLCM_ISA_LEVEL 0 | 1 | 2 -> isa_scalar | isa_avx2 | isa_avx512 (portable build), the target
//     set by `#pragma GCC target` for the rest of the file only: functions of headers included
//     above (the standard library, core/) keep the baseline target, so their out-of-line copies,
//     which the linker merges across the variants, never contain AVX instructions;
//   DLCM_ISA_NATIVE -> isa_native (DLCM_NATIVE=ON: -march=native for the whole build).
// DLCM_AVX512 is defined where the AVX-512 intrinsic paths are compiled. Headers with inline
// vector code (kernels/simd.h) are included after this one, inside the namespace.
#pragma once

// Headers first, so that their inline functions keep the baseline target.
#include <immintrin.h>

#include "core/common.h"
#include "kernels/dlcm_ops.h"
#include "kernels/kernel_list.h"

#if defined(DLCM_ISA_NATIVE)
#define DLCM_ISA_NS isa_native
#if defined(__AVX512F__)
#define DLCM_AVX512 1
#endif
#elif DLCM_ISA_LEVEL == 2
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define DLCM_ISA_NS isa_avx512
#define DLCM_AVX512 1
#elif DLCM_ISA_LEVEL == 1
#pragma GCC target("avx2,fma,f16c")
#define DLCM_ISA_NS isa_avx2
#elif DLCM_ISA_LEVEL == 0
#define DLCM_ISA_NS isa_scalar
#else
#error "kernel sources are compiled with DLCM_ISA_LEVEL=0|1|2 or DLCM_ISA_NATIVE (CMakeLists.txt)"
#endif

// The kernels of this variant, declared in its namespace: calls between kernels (tile_mm from
// the attention files) stay inside the variant.
namespace dlcm::ops::DLCM_ISA_NS {
#define DLCM_DECLARE_KERNEL(ret, name, params, args) ret name params;
DLCM_KERNEL_OPS(DLCM_DECLARE_KERNEL)
#undef DLCM_DECLARE_KERNEL
}  // namespace dlcm::ops::DLCM_ISA_NS
