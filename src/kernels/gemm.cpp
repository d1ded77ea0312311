#include "kernels/gemm.h"

#include <dnnl.h>

namespace dlcm::ops {

void gemm(bool trans_a, bool trans_b, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
          const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  if (M == 0 || N == 0) return;
  dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A, lda,
                                B, ldb, beta, C, ldc);
  DLCM_CHECK(st == dnnl_success, "oneDNN sgemm failed with status ", int(st), " (M=", M,
             " N=", N, " K=", K, ")");
}

void linear_forward(float* y, const float* x, const float* W, i64 N, i64 in, i64 out) {
  gemm(false, true, N, out, in, 1.0f, x, in, W, in, 0.0f, y, out);
}

void linear_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, i64 N,
                     i64 in, i64 out) {
  if (dx) gemm(false, false, N, in, out, 1.0f, dy, out, W, in, 1.0f, dx, in);
  if (dW) gemm(true, false, out, in, N, 1.0f, dy, out, x, in, 1.0f, dW, in);
}

}  // namespace dlcm::ops
