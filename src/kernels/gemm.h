// Row-major GEMM through oneDNN: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
#pragma once
#include "core/common.h"

namespace dlcm::ops {

void gemm(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
          const float* B, i64 ldb, float beta, float* C, i64 ldc);

// Linear layer with PyTorch weight layout W[out, in], no bias.
//   forward : y[N,out] = x[N,in] W^T          (beta = 0: overwrites y)
//   backward: dx[N,in] += dy W   (skipped when dx == nullptr)
//             dW[out,in] += dy^T x
void linear_forward(float* y, const float* x, const float* W, i64 N, i64 in, i64 out);
void linear_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, i64 N,
                     i64 in, i64 out);

}  // namespace dlcm::ops
