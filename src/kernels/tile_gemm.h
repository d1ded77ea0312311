// Register-blocked small matrix product used inside the attention kernels (tiles of at most
// 64 columns): C[M,N] = (acc ? C : 0) + alpha * A(M,K) B[K,N] with A(r,k) = A[r*rsa + k*csa]
// (any strides, so transposed tiles are read in place), row k of B at B + k*ldb (contiguous),
// rows of C ldc apart. Shared by the causal attention and the compact concept attention.
#pragma once
#include "core/common.h"

namespace dlcm::ops {

void tile_mm(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb, i64 M,
             i64 N, i64 K, float alpha, bool acc);

// tile_mm with both operands rounded to bfloat16 (nearest even, as the BF16 GEMMs round) and
// FP32 accumulation on AMX tiles (any sizes: packed into zero-padded 32 x 32 tiles per call).
// The attention kernels' generic fallback when the GEMMs run in BF16 and
// ops::amx_bf16_usable() (kernels/isa.h); their main paths keep operands in tile layout
// themselves (kernels/amx.h). It throws elsewhere (no AMX, or kernels below the avx512 level).
void tile_mm_amx(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb,
                 i64 M, i64 N, i64 K, float alpha, bool acc);

}  // namespace dlcm::ops
