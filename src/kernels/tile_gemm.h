// Register-blocked small matrix product used inside the attention kernels (tiles of at most
// 64 columns): C[M,N] = (acc ? C : 0) + alpha * A(M,K) B[K,N] with A(r,k) = A[r*rsa + k*csa]
// (any strides, so transposed tiles are read in place), row k of B at B + k*ldb (contiguous),
// rows of C ldc apart. Shared by the causal attention and the compact concept attention.
#pragma once
#include "core/common.h"

namespace dlcm::ops {

void tile_mm(float* C, i64 ldc, const float* A, i64 rsa, i64 csa, const float* B, i64 ldb, i64 M,
             i64 N, i64 K, float alpha, bool acc);

}  // namespace dlcm::ops
